// Scratch layouts and loop shapes shared by the kernels: the phase-split input rows of the
// column kernels (ColPlan, fill_rows), the channels-last rows of the narrow-plane kernels
// (LastRows), and the register-block iterations (channel, pixel and tap blocks, row pairs).
#pragma once

#include "plan.h"
#include "scratch.h"
#include "vec.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

namespace tokenmix_cpu {

// f(scalar_t{}) for the tensor dtype t (float32, float64, bfloat16, float16): the kernels'
// entry points instantiate their templates for each.
template <typename F>
at::Tensor dispatch_floating(at::ScalarType t, F&& f) {
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t, "tokenmix_cpu", [&] { out = f(scalar_t{}); });
  return out;
}

// A call's output, a new tensor of the given sizes in the dtype and device of its first input
// a, with the data of a, of b (the weight, or correlate's k) and of the output:
//   const auto [y, xd, wd, yd] = new_output<scalar_t>(x, w, {B, C, Ho, Wo});
template <typename scalar_t>
struct NewOutput {
  at::Tensor tensor;
  const scalar_t* a;
  const scalar_t* b;
  scalar_t* out;
};
template <typename scalar_t>
NewOutput<scalar_t> new_output(const at::Tensor& a, const at::Tensor& b, at::IntArrayRef sizes) {
  at::Tensor t = at::empty(sizes, a.options());
  return {t, a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), t.data_ptr<scalar_t>()};
}

// The sizes of one call, named once (as ATen's depthwise convolution kernels take an Arguments
// struct): the activation (x, y or q: B x C x . x .) in G groups of Cg channels, the weight
// (B|1, G, K*K, Ho|1, Wo|1; correlate has none), and the plan's geometry. Built by an op's entry
// point, passed to its kernels.
struct Args {
  const Plan& plan;
  int64_t B, C, G, Cg;  // batch, channels, groups, channels per group
  int64_t H, W, Ho, Wo;  // input and output size
  int64_t Kh, Kw, KK;    // kernel size and taps
  int64_t s;             // column stride
  bool zero_border;
  int64_t wB, wHW, wW;   // the weight's batch (1 or B), plane size (Ho * Wo or 1) and row width

  Args(const at::Tensor& act, int64_t groups, const Plan& p)
      : plan(p), B(act.size(0)), C(act.size(1)), G(groups), Cg(C / G), H(p.H), W(p.W), Ho(p.Ho), Wo(p.Wo), Kh(p.Kh),
        Kw(p.Kw), KK(p.Kh * p.Kw), s(p.col_stride), zero_border(p.zero_border), wB(0), wHW(0), wW(0) {}
  Args(const at::Tensor& act, const at::Tensor& w, const Plan& p) : Args(act, w.size(1), p) {
    wB = w.size(0), wHW = w.size(3) * w.size(4), wW = w.size(4);
  }
};

// Column layout of the input-side scratch: input column col lives at phase
// (col + pad_cols) % s, index (col + pad_cols) / s of a row of s phases of phase_width entries each.
struct ColPlan {
  int64_t Kw, Wo, W, s, pad_cols, phase_width, fast_begin, fast_end, block_width;
  std::vector<int64_t> tap_offset;  // per v: phase * phase_width + e_v (scratch offset of output column 0)
  // per phase f (s > 1): input columns col0[f] + k*s, k < cnt[f], go to scratch dst0[f] + k
  std::vector<int64_t> col0, cnt, dst0;
  std::vector<int64_t> fpos;  // scatter fill: scratch offset of element k of a channel's rows
  const int64_t* cols;
  // fill_rows scatters (stride > 2, or 2 on rows under 12 columns) rather than copying rows
  bool scatter() const { return s > 2 || (s == 2 && W < 12); }
  // fpos for up to rows_read rows of rowstride s * phase_width: a channel's rows_read*W contiguous source elements
  // go to fpos[k] in one loop (per-row loops cost more than the copy on 7-column rows)
  void plan_fill(int64_t rows_read) {
    if (!scatter()) return;
    fpos.resize(rows_read * W);
    for (int64_t k = 0; k < rows_read * W; ++k) fpos[k] = (k / W) * s * phase_width + pos(k % W);
  }
  bool all_fast() const { return fast_begin == 0 && fast_end >= Wo; }  // no column for the scalar path
  int64_t pos(int64_t col) const {
    int64_t q = col + pad_cols;
    return (q % s) * phase_width + q / s;
  }
};

// Fast output columns [fast_begin, fast_end). Zero border (zero_border): all of [0, Wo), rounded up to whole
// blocks whose tail lanes land in scratch, or ending exactly at Wo (exact_end, for kernels that
// write output rows in place; their last block is shifted left, see for_blocks).
inline ColPlan make_colplan(const Plan& plan, int64_t block, bool exact_end = false) {
  const int64_t W = plan.W, s = plan.col_stride, fast_begin = plan.affine_begin, fast_end = plan.affine_end;
  const bool zero_border = plan.zero_border;
  ColPlan p;
  p.Kw = plan.Kw;
  p.Wo = plan.Wo;
  p.W = W;
  p.s = s;
  p.cols = plan.cols.data();
  const int64_t* off = plan.col_offset.data();
  int64_t mn = 0;
  for (int64_t v = 0; v < p.Kw; ++v) mn = std::min(mn, off[v]);
  p.pad_cols = -mn;
  if (zero_border) {
    p.fast_begin = 0;
    p.fast_end = exact_end ? p.Wo : round_up(p.Wo, block);
  } else if (fast_end - fast_begin >= block) {
    p.fast_begin = fast_begin;
    p.fast_end = fast_end;
  } else {
    p.fast_begin = p.fast_end = 0;  // too narrow for a vector block: everything through the scalar path
  }
  p.block_width = round_up(std::max(p.Wo, p.fast_end), block);
  int64_t max_shift = 0;
  for (int64_t v = 0; v < p.Kw; ++v) max_shift = std::max(max_shift, (off[v] + p.pad_cols) / s);
  p.phase_width = std::max(p.block_width + max_shift, (W - 1 + p.pad_cols) / s + 1) + 1;
  for (int64_t f = 0; f < s; ++f) {
    const int64_t idx = ceil_div(std::max<int64_t>(p.pad_cols - f, 0), s);
    const int64_t col = idx * s + f - p.pad_cols;
    p.col0.push_back(col);
    p.cnt.push_back(col < W ? (W - 1 - col) / s + 1 : 0);
    p.dst0.push_back(f * p.phase_width + idx);
  }
  p.tap_offset.resize(p.Kw);
  for (int64_t v = 0; v < p.Kw; ++v) {
    int64_t q = off[v] + p.pad_cols;
    p.tap_offset[v] = (q % s) * p.phase_width + q / s;
  }
  return p;
}

// Block start columns covering [fast_begin, fast_end): full blocks, the last one shifted left to end at fast_end
// (recomputes a few columns; every fast path writes, never accumulates, so that is exact).
template <typename F>
inline void for_blocks(const ColPlan& p, int64_t block, F&& f) {
  if (p.fast_end <= p.fast_begin) return;
  int64_t j0 = p.fast_begin;
  for (; j0 + block <= p.fast_end; j0 += block) f(j0);
  if (j0 < p.fast_end) f(p.fast_end - block);
}

inline bool in_fast(const ColPlan& p, int64_t j) { return j >= p.fast_begin && j < p.fast_end; }

// Range of valid source rows read by output rows [i0, i1): (rmin, count).
inline std::pair<int64_t, int64_t> row_span(const int64_t* rows, int64_t Kh, int64_t Ho, int64_t i0, int64_t i1) {
  int64_t rmin = INT64_MAX, rmax = -1;
  for (int64_t u = 0; u < Kh; ++u)
    for (int64_t i = i0; i < i1; ++i) {
      int64_t r = rows[u * Ho + i];
      if (r >= 0) rmin = std::min(rmin, r), rmax = std::max(rmax, r);
    }
  return rmax >= 0 ? std::make_pair(rmin, rmax - rmin + 1) : std::make_pair<int64_t, int64_t>(0, 0);
}

inline int64_t max_row_span(const int64_t* rows, int64_t Kh, int64_t Ho, int64_t ch) {
  int64_t m = 0;
  for (int64_t i0 = 0; i0 < Ho; i0 += ch) m = std::max(m, row_span(rows, Kh, Ho, i0, std::min(Ho, i0 + ch)).second);
  return m;
}

// Copy rows [rmin, rmin + rows_read) of ncg channels (channel stride cstride) into the phase-split
// scratch. Only the positions of image columns are written, and they are the same for every
// task, so the padding around them stays as zeroed once per thread (ThreadScratch::zeroed).
template <typename scalar_t, typename acc_t>
void fill_rows(acc_t* x_rows, int64_t cstride, const scalar_t* src, int64_t ncg, int64_t H, int64_t rmin, int64_t rows_read,
               const ColPlan& p) {
  const int64_t W = p.W, s = p.s, rs = s * p.phase_width;
  for (int64_t c = 0; c < ncg; ++c) {
    const scalar_t* rows = src + (c * H + rmin) * W;
    if (p.scatter()) {
      // other strides and narrow rows: one scattered store per element, positions from plan_fill
      acc_t* dst = x_rows + c * cstride;
      const int64_t* fp = p.fpos.data();
      for (int64_t k = 0; k < rows_read * W; ++k) dst[fp[k]] = static_cast<acc_t>(rows[k]);
      continue;
    }
    for (int64_t rr = 0; rr < rows_read; ++rr) {
      acc_t* dst = x_rows + c * cstride + rr * rs;
      const scalar_t* row = rows + rr * W;
      if (s == 1) {
        convert(dst + p.pad_cols, row, W);
      } else {
        // s == 2: the phase holding the row's first column (f0) interleaves with the other (f1)
        const int f0 = p.col0[0] < p.col0[1] ? 0 : 1, f1 = 1 - f0;
        const int64_t npair = std::min(p.cnt[f0], p.cnt[f1]);
        deinterleave2(dst + p.dst0[f0], dst + p.dst0[f1], row + p.col0[f0], npair);
        if (p.cnt[f0] > npair) dst[p.dst0[f0] + npair] = static_cast<acc_t>(row[p.col0[f0] + 2 * npair]);
      }
    }
  }
}

// Whether the n elements at p are all finite: no element has its exponent bits all set (an
// integer test, 32 bytes at a time for float and double).
template <typename T>
inline bool all_finite(const T* p, int64_t n) {
  if constexpr (std::is_same<T, float>::value || std::is_same<T, double>::value) {
    using U = std::conditional_t<std::is_same<T, float>::value, int32_t, int64_t>;
    constexpr U E = std::is_same<T, float>::value ? U(0x7f800000) : U(0x7ff0000000000000ll);
    typedef U UV __attribute__((vector_size(32)));
    constexpr int L = 32 / sizeof(U);
    UV bad = {};
    int64_t i = 0;
    for (; i + L <= n; i += L) {
      UV b;
      std::memcpy(&b, p + i, sizeof b);
      bad |= (b & E) == E;
    }
    U any = 0;
    for (int l = 0; l < L; ++l) any |= bad[l];
    for (; i < n; ++i) {
      U b;
      std::memcpy(&b, p + i, sizeof b);
      any |= (b & E) == E;
    }
    return any == 0;
  } else {  // float16 (exponent 0x7c00), bfloat16 (0x7f80)
    const uint16_t e = std::is_same<T, at::Half>::value ? 0x7c00 : 0x7f80;
    uint32_t bad = 0;
    for (int64_t i = 0; i < n; ++i) {
      uint16_t b;
      std::memcpy(&b, p + i, sizeof b);
      bad |= (b & e) == e ? 1u : 0u;
    }
    return bad == 0;
  }
}

// The output columns where some tap column reads outside the image (a zero border's edges):
// [0, begin) and [end, Wo). any: there are such columns (and the caller asked for them).
struct EdgeColumns {
  int64_t begin = 0, end = 0;
  bool any = false;
  EdgeColumns(const Plan& plan, bool wanted) : end(plan.Wo) {
    for (int64_t v = 0; v < plan.Kw; ++v)
      begin = std::max(begin, plan.col_valid_begin[v]), end = std::min(end, plan.col_valid_end[v]);
    end = std::max(begin, end);
    any = wanted && (begin > 0 || end < plan.Wo);
  }
  template <typename F>
  void for_each(int64_t Wo, F&& f) const {
    if (!any) return;
    for (int64_t j = 0; j < begin; ++j) f(j);
    for (int64_t j = end; j < Wo; ++j) f(j);
  }
  // Whether the edge columns of a row (Wo columns of `width` elements each, at p) are finite.
  template <typename T>
  bool finite(const T* p, int64_t Wo, int64_t width = 1) const {
    return all_finite(p, begin * width) && all_finite(p + end * width, (Wo - end) * width);
  }
};

// The results of one output row and tap row, tap column v at r + v * rstep (Wo columns): 0 at the
// columns where tap v reads outside the image (a zero border's taps contribute nothing there,
// whatever q holds: the kernels' zero padding times a non-finite q would not be 0).
template <typename T>
inline void zero_outside_columns(T* r, int64_t rstep, const Plan& plan) {
  for (int64_t v = 0; v < plan.Kw; ++v) {
    T* rv = r + v * rstep;
    std::fill(rv, rv + plan.col_valid_begin[v], T(0));
    std::fill(rv + plan.col_valid_end[v], rv + plan.Wo, T(0));
  }
}

// Channel blocks covering [0, Cg), largest first: f(integral_constant<CB>, c0) for as many
// blocks of each size CB in Sizes (descending, ending in 1) as still fit.
template <int CB, int... Rest, typename F>
inline void channel_blocks_of(int64_t Cg, F&& f, int64_t c = 0) {
  for (; c + CB <= Cg; c += CB) f(std::integral_constant<int, CB>{}, c);
  if constexpr (sizeof...(Rest) > 0)
    channel_blocks_of<Rest...>(Cg, f, c);
  else
    static_assert(CB == 1, "the last block size must be 1 to cover every channel");
}

// Blocks of 12, 8, 4, 1 channels, the register-block sizes of the aggregate and transpose
// kernels (one vector of columns x CB channels in registers, the weight vector reused across
// the channels).
template <typename F>
inline void channel_blocks(int64_t Cg, F&& f) {
  channel_blocks_of<12, 8, 4, 1>(Cg, f);
}

// f(integral_constant<int, n>) for a run-time count 1 <= n <= N (N for larger n): the tap
// counts of the correlate blocks.
template <int N, typename F>
inline void with_count(int64_t n, F&& f) {
  if constexpr (N > 1) {
    if (n < N) return with_count<N - 1>(n, f);
  }
  f(std::integral_constant<int, N>{});
}

// f(integral_constant<int, i>) for i = 0, 1, ..., N - 1, unrolled at compile time.
template <int N, typename F, int... I>
inline void static_for_impl(F&& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, typename F>
inline void static_for(F&& f) {
  static_for_impl<N>(f, std::make_integer_sequence<int, N>{});
}

// Channel blocks for the two-row kernels: 6 channels x 2 rows = 12 accumulators (+ 2 weight
// vectors + 1 input vector = 15 of the 16 AVX registers), then 4, 2, 1.
template <typename F>
inline void channel_blocks2(int64_t Cg, F&& f) {
  channel_blocks_of<6, 4, 2, 1>(Cg, f);
}

// One row's (key, tap) entries, for the two-row blocks: entry k of [0, n) has key[k] (the row
// both rows' blocks index: a scratch input row, or an output row for the transpose; < 0 = none)
// and tap row tap[k] (k itself when tap is null).
struct TapList {
  const int64_t* key;
  const int64_t* tap;
  int64_t n;
  int64_t tap_of(int64_t k) const { return tap ? tap[k] : k; }
};

// Steps (key, tap row of row a or -1, tap row of row b or -1) covering each entry of both lists
// once: with match, an entry of b joins the first unpaired entry of a with its key, so a vector
// loaded once feeds both rows' FMAs; without, a's entries come first, then b's. Every step of a
// comes before the entries of b left unpaired. used: scratch of b.n. Returns the step count.
inline int64_t row_steps(TapList a, TapList b, bool match, char* used, int64_t* steps) {
  int64_t n = 0;
  std::fill(used, used + b.n, char(0));
  for (int64_t k = 0; k < a.n; ++k) {
    if (a.key[k] < 0) continue;
    int64_t m = -1;
    for (int64_t t = 0; match && t < b.n && m < 0; ++t)
      if (b.key[t] == a.key[k] && !used[t]) m = t;
    if (m >= 0) used[m] = 1;
    steps[3 * n] = a.key[k], steps[3 * n + 1] = a.tap_of(k), steps[3 * n + 2] = m >= 0 ? b.tap_of(m) : -1, ++n;
  }
  for (int64_t t = 0; t < b.n; ++t)
    if (b.key[t] >= 0 && !used[t]) steps[3 * n] = b.key[t], steps[3 * n + 1] = -1, steps[3 * n + 2] = b.tap_of(t), ++n;
  return n;
}

// The steps of row_steps in order: both(key, u0, u1) where both rows take the step, else
// one(key, u, row) with row an integral_constant (0: the first row, 1: the second), so that a
// kernel picks the accumulators of that row at compile time.
template <typename Both, typename One>
inline void for_steps(const int64_t* steps, int64_t nsteps, Both&& both, One&& one) {
  for (int64_t k = 0; k < nsteps; ++k) {
    const int64_t key = steps[3 * k], u0 = steps[3 * k + 1], u1 = steps[3 * k + 2];
    if (u0 >= 0 && u1 >= 0)
      both(key, u0, u1);
    else if (u0 >= 0)
      one(key, u0, std::integral_constant<int, 0>{});
    else
      one(key, u1, std::integral_constant<int, 1>{});
  }
}

// rr[k * Kh + u] = scratch row (source row - rmin, or -1) of tap row u of output row i + k, k < n.
inline void tap_scratch_rows(const int64_t* rows, int64_t Kh, int64_t Ho, int64_t i, int64_t n, int64_t rmin,
                             int64_t* rr) {
  for (int64_t k = 0; k < n; ++k)
    for (int64_t u = 0; u < Kh; ++u) {
      const int64_t r = rows[u * Ho + i + k];
      rr[k * Kh + u] = r >= 0 ? r - rmin : -1;
    }
}

// Whether, in the step order, every tap row t of the first output row is computed no later than
// tap row t of the second (pos: scratch of 2 * Kh).
inline bool later_rows_later(const int64_t* steps, int64_t nsteps, int64_t Kh, int64_t* pos) {
  std::fill(pos, pos + 2 * Kh, int64_t(-1));
  for (int64_t a = 0; a < nsteps; ++a)
    for (int k = 0; k < 2; ++k)
      if (steps[3 * a + 1 + k] >= 0) pos[k * Kh + steps[3 * a + 1 + k]] = a;
  for (int64_t t = 0; t < Kh; ++t)
    if (pos[t] >= 0 && pos[Kh + t] >= 0 && pos[t] > pos[Kh + t]) return false;
  return true;
}

// Channels-last scratch of a group's rows: rows of left_pad + W + rp pixels of Cg channels (pitch
// elements apart), image column col at left_pad + col; the columns outside the image never hold
// image data (zeros the kernels read for taps outside the image, or where the transpose drops
// them). Column left_pad + W is the zero column the tables send those taps to (rp >= 1); a zero
// border's taps can instead read their own column when left_pad and rp cover the padding
// (affine_columns).
struct LastRows {
  int64_t W, Cg, left_pad, pitch;
  bool padded;  // left_pad and the right padding hold every column a zero border's taps read
  LastRows(int64_t W_, int64_t Cg_, int64_t lp_ = 0, int64_t rp = 1, bool padded_ = false)
      : W(W_), Cg(Cg_), left_pad(lp_), pitch((lp_ + W_ + std::max<int64_t>(rp, 1)) * Cg_), padded(padded_) {}
  // The rows for the taps of a window whose columns are col = j * s + col_offset[v] (zero border,
  // zero_border: with its padding, so every tap reads a column of its own) or given by the tables
  // only (clamp border: every tap is inside the image)
  static LastRows for_taps(int64_t W, int64_t Cg, const int64_t* col_offset, int64_t s, int64_t Kw, int64_t Wo,
                           bool zero_border) {
    if (!zero_border) return LastRows(W, Cg);
    return LastRows(W, Cg, std::max<int64_t>(0, -col_offset[0]), (Wo - 1) * s + col_offset[Kw - 1] - (W - 1), true);
  }
  // [j * Kw + v]: offset of tap column v of output column j within a row: its own column
  // j * s + col_offset[v] when padded, else the table's (the zero column left_pad + W for taps outside the
  // image; col_offset and s are then unused)
  std::vector<int64_t> tap_columns(const int64_t* cols, int64_t Kw, int64_t Wo, const int64_t* col_offset = nullptr,
                                   int64_t s = 1) const {
    std::vector<int64_t> c(Wo * Kw);
    for (int64_t j = 0; j < Wo; ++j)
      for (int64_t v = 0; v < Kw; ++v) {
        const int64_t col = padded ? j * s + col_offset[v] : cols[v * Wo + j];
        c[j * Kw + v] = (left_pad + (col >= 0 || padded ? col : W)) * Cg;
      }
    return c;
  }
  // [k]: offset of element k of a channel's nrows * W contiguous image elements (to_last and
  // from_last positions)
  std::vector<int64_t> elements(int64_t nrows) const {
    std::vector<int64_t> e(nrows * W);
    for (int64_t k = 0; k < nrows * W; ++k) e[k] = (k / W) * pitch + (left_pad + k % W) * Cg;
    return e;
  }
};

// [k] = k * step, k < n: offsets of packed positions (to_last and from_last).
inline std::vector<int64_t> strided(int64_t n, int64_t step) {
  std::vector<int64_t> o(n);
  for (int64_t k = 0; k < n; ++k) o[k] = k * step;
  return o;
}

// The taps of a block of consecutive output pixels of one row, for the channels-last pixel
// kernels (agg_pixels_cl, tr_pixels_cl): rr[u], the scratch row offset (elements) of tap row
// u, or -1; cidx[p * Kw + v], the scratch column offset of tap column v of pixel p;
// w[(u * Kw + v) * wstep + p * wpix], its weight.
template <typename scalar_t>
struct PixelTaps {
  const int64_t* rr;
  const int64_t* cidx;
  int64_t Kh, Kw;
  const scalar_t* w;
  int64_t wstep, wpix;
};

// Register blocks of the channels-last pixel kernels covering Wo pixels x NV channel vectors:
// f(integral_constant NP, integral_constant NB, first pixel, first vector), NP <= 4, NB <= 2.
template <typename F>
inline void pixel_blocks(int64_t Wo, int64_t NV, F&& f) {
  channel_blocks_of<4, 3, 2, 1>(Wo, [&](auto np, int64_t j) {
    channel_blocks_of<2, 1>(NV, [&](auto nb, int64_t k) { f(np, nb, j, k); });
  });
}

// f(integral_constant CG, integral_constant K, integral_constant S) for the channels per group,
// kernel widths and column strides the affine kernels are compiled for; false for the others.
template <typename F>
inline bool with_affine(int64_t Cg, int64_t K, int64_t S, F&& f) {
  auto ks = [&](auto cg) {
    auto k = [&](auto kc) {
      if (S == 1) return f(cg, kc, std::integral_constant<int, 1>{}), true;
      if (S == 2) return f(cg, kc, std::integral_constant<int, 2>{}), true;
      return false;
    };
    if (K == 3) return k(std::integral_constant<int, 3>{});
    if (K == 5) return k(std::integral_constant<int, 5>{});
    if (K == 7) return k(std::integral_constant<int, 7>{});
    return false;
  };
  if (Cg == 8) return ks(std::integral_constant<int, 8>{});
  if (Cg == 16) return ks(std::integral_constant<int, 16>{});
  return false;
}

// Blocks of NP, NP / 2, ..., 1 pixels covering a row of Wo: f(integral_constant np, first pixel).
template <int NP, typename F>
inline void affine_blocks(int64_t Wo, F&& f) {
  if constexpr (NP == 8)
    channel_blocks_of<8, 4, 2, 1>(Wo, f);
  else if constexpr (NP == 4)
    channel_blocks_of<4, 2, 1>(Wo, f);
  else if constexpr (NP == 2)
    channel_blocks_of<2, 1>(Wo, f);
  else
    channel_blocks_of<1>(Wo, f);
}

// Whether the affine channels-last kernels run a plane (every pixel: its rows keep their zero
// padding, LastRows::for_taps): float, a zero border at unit column dilation (tap v at column
// j * s + col_offset[0] + v), per-pixel weights, and channels per group, a kernel width and a column
// stride they are compiled for (with_affine).
template <typename scalar_t>
bool affine_cl(int64_t Cg, bool per_pixel, int64_t Kw, int64_t s, const int64_t* col_offset, bool zero_border) {
  if (!std::is_same<scalar_t, float>::value || !zero_border || !per_pixel) return false;
  for (int64_t v = 0; v < Kw; ++v)
    if (col_offset[v] != col_offset[0] + v) return false;
  return with_affine(Cg, Kw, s, [](auto, auto, auto) {});
}

}  // namespace tokenmix_cpu
