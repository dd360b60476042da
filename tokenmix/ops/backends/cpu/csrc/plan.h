// The geometry of one call, computed once per (window, input size) and cached: the per-axis
// source tables of Window.axis_index (tokenmix/ops/window.py), where the column map is affine
// (the vectorised loops run there; the rest, a clamp border's edges, goes through scalar loops
// over the tables) and, for aggregate_transpose, the inverse maps (for every input row or
// column, the taps and output rows or columns that read it).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/string_view.h>

#include <array>
#include <cstdint>
#include <memory>
#include <vector>

namespace tokenmix_cpu {

// A window's geometry, as the ops' schema passes it: per axis (0 = height, 1 = width) the
// kernel size, stride, dilation and padding, and the border (zero, clamp or reflect).
struct Window {
  std::array<int64_t, 2> kernel_size, stride, dilation, padding;
  bool clamp, reflect;

  // Checked with one-line errors that name the argument (ValueError in Python).
  static Window from_args(at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef dilation,
                          at::IntArrayRef padding, c10::string_view border);
  // The output length along an axis for an input of `length` (checked: the window must fit).
  int64_t output_length(int axis, int64_t length) const;
};

struct Plan {
  int64_t H, W, Ho, Wo;  // input and output size
  int64_t Kh, Kw;        // kernel size
  // rows[u * Ho + i]: source row of tap row u of output row i; cols[v * Wo + j]: source column
  // of tap column v of output column j; -1 = outside the image (zero border only; the reflect
  // border reflects such taps into the image, as F.pad(mode="reflect")).
  std::vector<int64_t> rows, cols;
  // col_offset[v]: where the column map is affine, cols[v][j] = j * col_stride + col_offset[v].
  std::vector<int64_t> col_offset;
  int64_t col_stride;
  // Output columns [affine_begin, affine_end) on which every tap column is affine (the zero
  // border: all of them; the clamp and reflect borders: the longest such run).
  int64_t affine_begin, affine_end;
  // Per tap column v: the output columns [col_valid_begin[v], col_valid_end[v]) whose tap v reads
  // inside the image (all of them on a clamp border); the others read nothing (zero border).
  std::vector<int64_t> col_valid_begin, col_valid_end;
  // Zero border: reads past the image are zero padding, so vector blocks may overrun a row.
  bool zero_border;
  // Whether the window's reach along a row (the padded row the taps sweep, and the column
  // stride) is within a few times the input and output row widths: the kernels' per-thread
  // rows, laid out by stride phase and padded to that reach, are then bounded by the tensors.
  // Otherwise the ops run from the tables alone (tables.cpp), with no scratch.
  bool bounded_layout = true;
  // Input columns [affine_input_begin, affine_input_end) whose every reader is affine or
  // outside the output (aggregate_transpose's vector range on a clamp border).
  int64_t affine_input_begin, affine_input_end;
  // For each input row h, row_readers[2 * a], row_readers[2 * a + 1] = (u, i) with
  // rows[u][i] = h, for a in [row_readers_begin[h], row_readers_begin[h + 1]), sorted by (u, i).
  std::vector<int64_t> row_readers_begin, row_readers;
  // The same for input columns, as (v, j, affine) triples; the clamp and reflect borders only
  // (else empty lists).
  std::vector<int64_t> col_readers_begin, col_readers;
  // At column stride 1 with a zero border: aggregate_transpose as an aggregate of y over the
  // mirrored window (tap u of output row h reads the output row i with rows[u][i] = h), whose
  // plan this is; else null.
  std::shared_ptr<const Plan> mirrored;

  const int64_t* row(int64_t u) const { return rows.data() + u * Ho; }
};

// The plan of a window on an input of H x W, from a cache of bounded size shared by all
// threads.
std::shared_ptr<const Plan> plan_for(const Window& window, int64_t H, int64_t W);

}  // namespace tokenmix_cpu
