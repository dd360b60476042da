// aggregate_transpose, the adjoint of aggregate in x: a gather (every input pixel sums the
// (tap, output) pairs that read it, from the plan's inverse tables), so results are
// deterministic and need no atomics. Column kernels (tr_block, tr_block2) per stride phase;
// channels-last (aggregate_transpose_cl) scattering into bands of input rows that each task
// owns; at column stride 1 with a zero border, an aggregate over the mirrored window.
#include "kernels.h"
#include "layout.h"
#include "scratch.h"
#include "vec.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace tokenmix_cpu {
namespace {

// x[c, h, col] = sum over (u, i) with rows[u][i] = h and (v, j) with cols[v][j] = col of
// w[t, i, j] * y[c, i, j]. Affine columns: col + pad_cols = s*m + phase_v with j = m - e_v, so for
// a fixed phase the sum over taps is unit-stride in m. Output-side scratch (y and w rows of
// the task) is zero-padded by left_pad on the left so that j = m - e_v outside [0, Wo) reads 0.

// The operands of the column kernels (tr_block, tr_block2) for one block of CB channels: the
// task's y rows (channel c's at ys + c * cplane, row slot ii at ii * padded_row_width, output
// row imin in slot 0) and weight rows (tap t's plane at wb + t * tplane, the same slots), the
// taps vl[0 .. nv) of the phase (tap column v's scratch index of j = m - e_v at m = 0: base[v]),
// the outputs (channel c's phase row at xo + c * out_block_width; the second input row's x2
// further).
template <typename acc_t>
struct TrBlock {
  const acc_t* ys;
  const acc_t* wb;
  int64_t cplane, tplane, padded_row_width, imin;
  const int64_t* vl;
  int64_t nv, Kw;
  const int64_t* base;
  acc_t* xo;
  int64_t out_block_width, x2;
};

// acc[c] += the terms of tap row u with output row slot ii for channel c: the phase's taps,
// phase-row entries [m0, m0 + L).
template <typename acc_t, int CB, typename V = typename Vec<acc_t>::type>
__attribute__((always_inline)) inline void tr_taps(const TrBlock<acc_t>& a, V (&acc)[CB], int64_t ii, int64_t u, int64_t m0) {
  for (int64_t n = 0; n < a.nv; ++n) {
    const int64_t v = a.vl[n], off = ii * a.padded_row_width + a.base[v] + m0;
    const V wv = loadu(a.wb + (u * a.Kw + v) * a.tplane + off);
    for (int c = 0; c < CB; ++c) acc[c] += wv * loadu(a.ys + off + c * a.cplane);
  }
}

// One vector of phase-row entries [m0, m0 + L) for CB channels over the (tap, output row) pairs
// p0 .. p1 of (reader_tap, reader_row).
template <typename acc_t, int CB>
__attribute__((noinline)) void tr_block(const TrBlock<acc_t>& a, const int64_t* reader_tap, const int64_t* reader_row, int64_t p0,
                                        int64_t p1, int64_t m0) {
  using V = typename Vec<acc_t>::type;
  V acc[CB];
  for (int c = 0; c < CB; ++c) acc[c] = V{};
  for (int64_t pp = p0; pp < p1; ++pp) {
    const int64_t u = reader_tap[pp], ii = reader_row[pp] - a.imin;
    tr_taps(a, acc, ii, u, m0);
  }
  for (int c = 0; c < CB; ++c) storeu(a.xo + c * a.out_block_width + m0, acc[c]);
}

// tr_block for two input rows over the steps of row_steps (key: output row).
template <typename acc_t, int CB>
__attribute__((noinline)) void tr_block2(const TrBlock<acc_t>& a, const int64_t* steps, int64_t nsteps, int64_t m0) {
  using V = typename Vec<acc_t>::type;
  V a0[CB], a1[CB];
  for (int c = 0; c < CB; ++c) a0[c] = a1[c] = V{};
  for_steps(
      steps, nsteps,
      [&](int64_t key, int64_t u0, int64_t u1) {
        const int64_t ii = key - a.imin;
        for (int64_t n = 0; n < a.nv; ++n) {
          const int64_t v = a.vl[n], off = ii * a.padded_row_width + a.base[v] + m0;
          const V w0 = loadu(a.wb + (u0 * a.Kw + v) * a.tplane + off), w1 = loadu(a.wb + (u1 * a.Kw + v) * a.tplane + off);
          const acc_t* yp = a.ys + off;
          for (int c = 0; c < CB; ++c) {
            const V yv = in_register(loadu(yp + c * a.cplane));
            a0[c] += w0 * yv;
            a1[c] += w1 * yv;
          }
        }
      },
      [&](int64_t key, int64_t u, auto row) {  // an output row read by one of the two only
        V(&acc)[CB] = decltype(row)::value ? a1 : a0;
        const int64_t ii = key - a.imin;
        tr_taps(a, acc, ii, u, m0);
      });
  for (int c = 0; c < CB; ++c) storeu(a.xo + c * a.out_block_width + m0, a0[c]), storeu(a.xo + a.x2 + c * a.out_block_width + m0, a1[c]);
}

// The same layout for the transpose (gradient of x): a task owns a band of input rows of one
// (batch, group), accumulated channels-last in scratch (rows of W + 1 pixels; taps outside the
// image land in column W, taps on rows outside the band are skipped, and neither is read
// back). Every output row reading the band adds its taps that land there: each output pixel's
// gradient vectors stay in registers while its taps add weight x gradient to their input
// pixels. Each (pixel, tap) product is computed once, in the band of its input row, and every
// input pixel sums its terms in the same order (output row, tap, ...) whatever the bands.
// The taps of t land in the band rows gs; gy + p * gstep: pixel p's gradient channels.
template <typename scalar_t, typename acc_t, int NB, int NP>
__attribute__((noinline)) void tr_pixels_cl(acc_t* gs, PixelTaps<scalar_t> a, const acc_t* gy, int64_t gstep) {
  using V = typename Vec<acc_t>::type;
  constexpr int L = Vec<acc_t>::N;
  V q[NP][NB];
  for (int p = 0; p < NP; ++p)
    for (int k = 0; k < NB; ++k) q[p][k] = loadu(gy + p * gstep + k * L);
  for (int64_t u = 0; u < a.Kh; ++u) {
    if (a.rr[u] < 0) continue;
    acc_t* xr = gs + a.rr[u];
    const scalar_t* wr = a.w + u * a.Kw * a.wstep;
    for (int64_t v = 0; v < a.Kw; ++v) {
      for (int p = 0; p < NP; ++p) {
        acc_t* xp = xr + a.cidx[p * a.Kw + v];
        const V wv = splat(static_cast<acc_t>(wr[v * a.wstep + p * a.wpix]));
        for (int k = 0; k < NB; ++k) storeu(xp + k * L, loadu(xp + k * L) + wv * q[p][k]);
      }
    }
  }
}

// The same scatter for NP pixels whose taps land on the columns p * S + v of a band row (tap v
// of pixel p, unit dilation; the layout and vectors of agg_pixels_cl_affine): each of the
// block's S * (NP - 1) + K columns is loaded and stored once per tap row, with the terms of
// every (pixel, tap) that lands on it added in registers, instead of one load and store per
// term. A column adds its terms in a fixed order (tap row, then block, then v ascending within
// the block): blocks depend on Wo only, so results do not depend on the bands or threads.
// gs + rr[u] + c0: the block's first column in tap row u's band row; gy + p * CG: pixel p's
// gradient channels.
template <typename scalar_t, typename acc_t, int CG, int NP, int K, int S>
__attribute__((noinline)) void tr_pixels_cl_affine(acc_t* gs, const int64_t* rr, int64_t c0, int64_t Kh,
                                                   const scalar_t* w, int64_t wstep, const acc_t* gy) {
  using AV = AffineVec<acc_t, CG>;
  using V = typename AV::type;
  constexpr int L = AV::L, NB = AV::NB, NC = S * (NP - 1) + K;
  V q[NP][NB];
  for (int p = 0; p < NP; ++p)
    for (int k = 0; k < NB; ++k) q[p][k] = AV::load(gy + p * CG + k * L);
  for (int64_t u = 0; u < Kh; ++u) {
    if (rr[u] < 0) continue;
    acc_t* xr = gs + rr[u] + c0;
    const scalar_t* wv[K];
    for (int v = 0; v < K; ++v) wv[v] = w + (u * K + v) * wstep;
    static_for<NC>([&](auto c) {
      V a[NB];
      for (int k = 0; k < NB; ++k) a[k] = AV::load(xr + c * CG + k * L);
      static_for<NP>([&](auto pr) {  // p descending: v = c - p * S ascending
        constexpr int p = NP - 1 - decltype(pr)::value, v = decltype(c)::value - p * S;
        if constexpr (v >= 0 && v < K) {
          const V wvv = AV::splat(static_cast<acc_t>(wv[v][p]));
          for (int k = 0; k < NB; ++k) a[k] += wvv * q[p][k];
        }
      });
      for (int k = 0; k < NB; ++k) AV::store(xr + c * CG + k * L, a[k]);
    });
  }
}

template <typename scalar_t>
at::Tensor aggregate_transpose_cl(const at::Tensor& gy, const at::Tensor& w, const Args& args) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int L = Vec<acc_t>::N;
  const int64_t B = args.B, C = args.C, G = args.G, Cg = args.Cg, H = args.H, W = args.W, Ho = args.Ho, Wo = args.Wo;
  const int64_t Kh = args.Kh, Kw = args.Kw, KK = args.KK, s = args.s, wB = args.wB, wHW = args.wHW;
  const int64_t* col_offset = args.plan.col_offset.data();
  const int64_t* rows = args.plan.rows.data();
  const int64_t* cols = args.plan.cols.data();
  const auto [gx, gyd, wd, gxd] = new_output<scalar_t>(gy, w, {B, C, H, W});
  const LastRows lr = LastRows::for_taps(W, Cg, col_offset, s, Kw, Wo, args.zero_border);
  const int64_t pitch = lr.pitch, wpix = wHW == 1 ? 0 : 1;  // static weights: one per tap
  const int64_t band = chunk_rows(B * G, H, 16), nband = ceil_div(H, band);
  // output rows [olo[k], ohi[k]) read input band k (empty: olo = ohi)
  std::vector<int64_t> olo(nband, Ho), ohi(nband, 0);
  for (int64_t u = 0; u < Kh; ++u)
    for (int64_t i = 0; i < Ho; ++i) {
      const int64_t r = rows[u * Ho + i];
      if (r < 0) continue;
      olo[r / band] = std::min(olo[r / band], i), ohi[r / band] = std::max(ohi[r / band], i + 1);
    }
  int64_t onmax = 0;
  for (int64_t k = 0; k < nband; ++k) onmax = std::max(onmax, ohi[k] - olo[k]);
  const std::vector<int64_t> cidx = lr.tap_columns(cols, Kw, Wo, col_offset, s),
                             xoff = lr.elements(band), pix = strided(onmax * Wo, Cg);
  const bool affine = affine_cl<scalar_t>(Cg, wpix == 1, Kw, s, col_offset, args.zero_border);
  ThreadScratch scratch(bytes_of({band * pitch, onmax * Wo * Cg}, sizeof(acc_t)));
  for_each_task(B * G * nband, G, nband, scratch, [&](Carver& cv, TaskRange tasks) {
    Buf<acc_t> gs = cv.take<acc_t>(band * pitch), gys = cv.take<acc_t>(onmax * Wo * Cg);
    std::vector<int64_t> rr(Kh);
    for (const Task task : tasks) {
      const int64_t b = task.batch, g = task.group, r0 = task.chunk * band, r1 = std::min(H, r0 + band);
      const int64_t i0 = olo[task.chunk], i1 = std::max(ohi[task.chunk], i0);
      std::fill(gs.begin(), gs.begin() + (r1 - r0) * pitch, acc_t(0));
      to_last(gys.data(), pix.data(), gyd + (b * C + g * Cg) * Ho * Wo + i0 * Wo, Ho * Wo, Cg, (i1 - i0) * Wo);
      const scalar_t* wg = wd + ((wB == 1 ? 0 : b) * G + g) * KK * wHW;
      for (int64_t i = i0; i < i1; ++i) {
        for (int64_t u = 0; u < Kh; ++u) {
          const int64_t r = rows[u * Ho + i];
          rr[u] = r >= r0 && r < r1 ? (r - r0) * pitch : -1;
        }
        const acc_t* qrow = gys.data() + (i - i0) * Wo * Cg;
        if constexpr (std::is_same<scalar_t, float>::value) {
          if (affine) {
            with_affine(Cg, Kw, s, [&](auto cg, auto kc, auto sc) {
              constexpr int CG = decltype(cg)::value, KA = decltype(kc)::value, SA = decltype(sc)::value;
              affine_blocks<AffineVec<acc_t, CG>::NP>(Wo, [&](auto np, int64_t j) {
                tr_pixels_cl_affine<scalar_t, acc_t, CG, decltype(np)::value, KA, SA>(
                    gs.data(), rr.data(), cidx[j * Kw], Kh, wg + i * Wo + j, wHW, qrow + j * CG);
              });
            });
            continue;
          }
        }
        pixel_blocks(Wo, Cg / L, [&](auto np, auto nb, int64_t j, int64_t k) {
          tr_pixels_cl<scalar_t, acc_t, decltype(nb)::value, decltype(np)::value>(
              gs.data() + k * L,
              {.rr = rr.data(), .cidx = cidx.data() + j * Kw, .Kh = Kh, .Kw = Kw, .w = wg + (i * Wo + j) * wpix, .wstep = wHW, .wpix = wpix},
              qrow + j * Cg + k * L, Cg);
        });
      }
      from_last(gxd + ((b * C + g * Cg) * H + r0) * W, H * W, gs.data(), xoff.data(), Cg, (r1 - r0) * W);
    }
  });
  return gx;
}

template <typename scalar_t>
at::Tensor aggregate_transpose_impl(const at::Tensor& y, const at::Tensor& w, const Args& args) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int L = Vec<acc_t>::N;
  const int64_t B = args.B, C = args.C, G = args.G, Cg = args.Cg, H = args.H, W = args.W, Ho = args.Ho, Wo = args.Wo;
  const int64_t Kh = args.Kh, Kw = args.Kw, KK = args.KK, s = args.s, wB = args.wB, wHW = args.wHW;
  const int64_t affine_in_begin = args.plan.affine_input_begin, affine_in_end = args.plan.affine_input_end;
  // Channels-last (bands of input rows) on rows under four vectors: measured faster than the
  // column kernels there (equal at 256@14x14 stride 1), with less scratch than their per-task row
  // copies. Every row when the affine kernel covers the plane (faster than the source-weights
  // aggregate below).
  const bool affine = affine_cl<scalar_t>(Cg, wHW > 1, Kw, s, args.plan.col_offset.data(), args.zero_border);
  const bool last = (Wo < 4 * L || affine) && Cg % L == 0;
  // Stride 1, zero border: x's gradient is an aggregate of y over the mirrored window, input
  // pixel (r, q) reading y at each output (i, j) whose tap (u, v) reads (r, q), with that
  // output's weight (aggregate_impl's source_weights mode: the weights at the source pixel). It
  // runs the aggregate's two-row kernels on aligned shifted weight copies, with no masked edges
  // (faster than the column and channels-last kernels on the 56x56 and 14x14 planes). Rows of two
  // to four vectors, rows under a vector and the planes of the affine kernel keep the
  // channels-last scatter where it applies (slower with source weights there).
  if (s == 1 && args.zero_border && W >= L && !(last && (Wo >= 2 * L || affine)))
    return aggregate_source_weights(y, w, *args.plan.mirrored);
  if (last) return aggregate_transpose_cl<scalar_t>(y, w, args);
  const int64_t* off = args.plan.col_offset.data();
  const int64_t* row_readers_begin = args.plan.row_readers_begin.data();
  const int64_t* row_readers = args.plan.row_readers.data();  // (n, 2): u, i
  const int64_t* col_readers_begin = args.plan.col_readers_begin.data();
  const int64_t* col_readers = args.plan.col_readers.data();  // (n, 3): v, j, affine
  const int64_t npair = static_cast<int64_t>(args.plan.row_readers.size()) / 2;
  std::vector<int64_t> reader_tap(npair), reader_row(npair);
  for (int64_t a = 0; a < npair; ++a) reader_tap[a] = row_readers[2 * a], reader_row[a] = row_readers[2 * a + 1];

  int64_t mn = 0;
  for (int64_t v = 0; v < Kw; ++v) mn = std::min(mn, off[v]);
  const int64_t pad_cols = -mn;
  std::vector<int64_t> e(Kw), ph(Kw);
  int64_t max_shift = 0;
  for (int64_t v = 0; v < Kw; ++v) {
    e[v] = (off[v] + pad_cols) / s;
    ph[v] = (off[v] + pad_cols) % s;
    max_shift = std::max(max_shift, e[v]);
  }
  const int64_t mw = (W - 1 + pad_cols) / s + 1;  // phase-row length covering every input column
  const int64_t block = L;  // one vector of columns per block
  // fast m range per phase: all of [0, mw) (zero border) or, at stride 1, the clamp or reflect
  // interior (at a larger stride a reflect border's plane goes through the scalar path)
  int64_t m_a = 0, m_b = round_up(mw, block);
  if (!args.zero_border) {
    m_a = affine_in_begin + pad_cols;
    m_b = affine_in_end + pad_cols;
    if (m_b - m_a < block || s > 1) m_a = m_b = 0;
  }
  // stride 1, zero border: only m = col + pad_cols of image columns is needed; a row narrower
  // than a block takes one block from pad_cols (writing a few phase-row entries past the row)
  if (s == 1 && args.zero_border) m_a = pad_cols, m_b = pad_cols + std::max(W, block);
  // the entries of phase f that are image columns: m in [plo[f], plo[f] + pcnt[f]) (pair mode
  // computes only these: at W=14, s=2 one block per phase instead of two)
  std::vector<int64_t> plo(s), pcnt(s);
  int64_t pend = 0;
  for (int64_t f = 0; f < s; ++f) {
    plo[f] = ceil_div(std::max<int64_t>(pad_cols - f, 0), s);
    const int64_t col = plo[f] * s + f - pad_cols;
    pcnt[f] = col < W ? (W - 1 - col) / s + 1 : 0;
    pend = std::max(pend, plo[f] + round_up(pcnt[f], block));
  }
  const int64_t out_block_width = round_up(std::max({mw, m_b, pend}), block);
  // direct: stride 1, one dtype and rows at least a block wide: the blocks store straight into
  // the rows of x (m = col + pad_cols; the zero border's range is exactly the image columns, the last
  // block shifted left to end there), with no phase row, scatter or row copy
  const bool direct = std::is_same<scalar_t, acc_t>::value && s == 1 && W >= block;
  // pair: stride 2, or stride 1 on rows narrower than a block (zero border, so every column is
  // covered by the blocks): each phase keeps its own row, and the rows are interleaved (stride
  // 2) or copied (stride 1) into x at the end, without the scalar scatter
  const bool pair = std::is_same<scalar_t, acc_t>::value && (s == 2 || (s == 1 && !direct)) && args.zero_border;
  const int64_t left_pad = max_shift, padded_row_width = left_pad + std::max(out_block_width, Wo) + 1;
  std::vector<int64_t> base(Kw);  // scratch index of j = m - e_v at m = 0
  for (int64_t v = 0; v < Kw; ++v) base[v] = left_pad - e[v];
  // taps per phase
  std::vector<int64_t> vptr(s + 1, 0), vlist;
  for (int64_t f = 0; f < s; ++f) {
    for (int64_t v = 0; v < Kw; ++v)
      if (ph[v] == f) vlist.push_back(v);
    vptr[f + 1] = static_cast<int64_t>(vlist.size());
  }

  const auto [x, yd, wd, xd] = new_output<scalar_t>(y, w, {B, C, H, W});
  // 16 input rows per task: the y and w rows a task copies (its rows plus the window's reach)
  // are re-read by the next task less often than with 8
  const int64_t ch = chunk_rows(B * G, H, 16), nch = ceil_div(H, ch);

  auto out_span = [&](int64_t h0, int64_t h1) {
    int64_t imin = Ho, imax = -1;
    for (int64_t a = row_readers_begin[h0]; a < row_readers_begin[h1]; ++a) imin = std::min(imin, reader_row[a]), imax = std::max(imax, reader_row[a]);
    return imax >= imin ? std::make_pair(imin, imax - imin + 1) : std::make_pair<int64_t, int64_t>(0, 0);
  };
  // per tap row u: the output rows [first, second) its pairs with input rows [h0, h1) read
  // (empty: first == second)
  auto tap_rows = [&](int64_t h0, int64_t h1, std::vector<std::pair<int64_t, int64_t>>& r) {
    for (auto& q : r) q = {Ho, 0};
    for (int64_t a = row_readers_begin[h0]; a < row_readers_begin[h1]; ++a) {
      auto& q = r[reader_tap[a]];
      q.first = std::min(q.first, reader_row[a]), q.second = std::max(q.second, reader_row[a] + 1);
    }
    for (auto& q : r) q.second = std::max(q.first, q.second);
  };
  int64_t nri_max = 0;
  for (int64_t h0 = 0; h0 < H; h0 += ch) nri_max = std::max(nri_max, out_span(h0, std::min(H, h0 + ch)).second);
  const int64_t cplane = nri_max * padded_row_width, tplane = nri_max * padded_row_width;
  // y and w rows copied per task
  const int64_t ysize = Cg * cplane, wsize = KK * tplane;
  ThreadScratch scratch(
      bytes_of({ysize, wsize, direct ? 0 : (pair ? 2 * s : 1) * Cg * out_block_width, direct || pair ? 0 : Cg * W}, sizeof(acc_t)));

  for_each_task(B * G * nch, G, nch, scratch, [&](Carver& cv, TaskRange tasks) {
    Buf<acc_t> ys = cv.take<acc_t>(ysize), wb = cv.take<acc_t>(wsize),
               xo = cv.take<acc_t>(direct ? 0 : (pair ? 2 * s : 1) * Cg * out_block_width),
               xrow = cv.take<acc_t>(direct || pair ? 0 : Cg * W);
    std::vector<std::pair<int64_t, int64_t>> urows(Kh), nrows(Kh);
    std::vector<Prefetch> pfw(Kh);
    int64_t most = 0;  // the most (tap, output) pairs of an input row
    for (int64_t h = 0; h < H; ++h) most = std::max(most, row_readers_begin[h + 1] - row_readers_begin[h]);
    std::vector<int64_t> steps(6 * most);
    std::vector<char> used(most);
    for (const Task task : tasks) {
      const int64_t b = task.batch, g = task.group, h0 = task.chunk * ch, h1 = std::min(H, h0 + ch);
      const auto span = out_span(h0, h1);
      const int64_t imin = span.first, nri = span.second;
      const scalar_t* wg = wd + ((wB == 1 ? 0 : b) * G + g) * KK * wHW;
      if (nri > 0) {
        // rows land at fixed positions (row slot ii, columns [left_pad, left_pad + Wo)); everything around
        // them stays as zeroed once per thread, which is the zero padding the blocks read
        for (int64_t c = 0; c < Cg; ++c)
          convert_rows(ys.data() + c * cplane + left_pad, padded_row_width, yd + ((b * C + g * Cg + c) * Ho + imin) * Wo, Wo, nri, Wo);
        // weights: only the rows the task's (u, i) pairs read, [urows[u].first, urows[u].second)
        // of the tap row u planes (each weight is read by exactly one input row, so tasks do not
        // copy the same weight twice)
        tap_rows(h0, h1, urows);
        for (int64_t u = 0; u < Kh; ++u)
          for (int64_t t = u * Kw; t < (u + 1) * Kw; ++t)
            for (int64_t i = urows[u].first; i < urows[u].second; ++i) {
              acc_t* dst = wb.data() + t * tplane + (i - imin) * padded_row_width + left_pad;
              if (wHW == 1) {
                std::fill(dst, dst + Wo, static_cast<acc_t>(wg[t]));
              } else {
                const scalar_t* src = wg + t * wHW + i * Wo;
                convert(dst, src, Wo);
              }
            }
      }
      // the next task's y and w rows, fetched a slice per input row below
      Prefetch pfy;
      if (task.has_next()) {
        const Task nt = task.next();
        const int64_t nb = nt.batch, ng = nt.group, nh0 = nt.chunk * ch, nh1 = std::min(H, nh0 + ch);
        const auto next = out_span(nh0, nh1);
        pfy = Prefetch(yd + ((nb * C + ng * Cg) * Ho + next.first) * Wo, Cg, Ho * Wo, next.second * Wo);
        tap_rows(nh0, nh1, nrows);
        for (int64_t u = 0; u < Kh; ++u)
          pfw[u] = wHW > 1 ? Prefetch(wd + (((wB == 1 ? 0 : nb) * G + ng) * KK + u * Kw) * wHW + nrows[u].first * Wo, Kw,
                                      wHW, (nrows[u].second - nrows[u].first) * Wo)
                           : Prefetch();
      } else {
        for (auto& f : pfw) f = Prefetch();
      }
      for (int64_t h = h0; h < h1;) {
        // two input rows at once where the rows are written in place or per phase (direct,
        // pair): both read most of the same output rows, so each y vector feeds two FMAs
        const int64_t n = (direct || pair) && h + 1 < h1 ? 2 : 1;
        for (int64_t k = 0; k < n; ++k) {
          pfy.slice(h + k - h0, h1 - h0);
          for (const auto& f : pfw) f.slice(h + k - h0, h1 - h0);
        }
        // input row h of channel c at xout[c * xstep + col], row h + 1 (n = 2) W further; in
        // direct mode the blocks write column m - pad_cols through bout = xout - pad_cols
        acc_t* xout;
        int64_t xstep;
        if (direct || pair) {
          xout = reinterpret_cast<acc_t*>(xd) + ((b * C + g * Cg) * H + h) * W;
          xstep = H * W;
        } else {
          xout = xrow.data();
          xstep = W;
          std::fill(xrow.begin(), xrow.end(), acc_t(0));
        }
        acc_t* bout = direct ? xout - pad_cols : xo.data();
        const int64_t bstep = direct ? xstep : out_block_width;
        const int64_t x2 = direct ? W : s * Cg * out_block_width;  // the blocks' second row (pair: own phase rows)
        const int64_t p0 = row_readers_begin[h], p2 = row_readers_begin[h + n];
        const int64_t p1 = row_readers_begin[h + 1];
        const int64_t nsteps =
            n == 2 ? row_steps({reader_row.data() + p0, reader_tap.data() + p0, p1 - p0}, {reader_row.data() + p1, reader_tap.data() + p1, p2 - p1}, true,
                               used.data(), steps.data())
                   : 0;
        if (p2 <= p0 && (direct || pair)) {
          for (int64_t k = 0; k < n; ++k)
            for (int64_t c = 0; c < Cg; ++c) std::fill(xout + k * W + c * xstep, xout + k * W + c * xstep + W, acc_t(0));
        } else if (p2 > p0) {
          for (int64_t f = 0; f < s; ++f) {
            const int64_t* vl = vlist.data() + vptr[f];
            const int64_t nv = vptr[f + 1] - vptr[f];
            if (pair) bout = xo.data() + f * Cg * out_block_width;  // this phase's own rows
            if (nv == 0 || m_b <= m_a) {
              if (pair)  // a phase no tap reads
                for (int64_t k = 0; k < n; ++k) std::fill(bout + k * x2, bout + k * x2 + Cg * out_block_width, acc_t(0));
              continue;
            }
            auto run = [&](int64_t m0) {
              auto block_operands = [&](int64_t c) {
                return TrBlock<acc_t>{.ys = ys.data() + c * cplane, .wb = wb.data(), .cplane = cplane, .tplane = tplane,
                                      .padded_row_width = padded_row_width, .imin = imin, .vl = vl, .nv = nv, .Kw = Kw,
                                      .base = base.data(), .xo = bout + c * bstep, .out_block_width = bstep, .x2 = x2};
              };
              if (n == 2) {
                channel_blocks2(Cg, [&](auto channel_block, int64_t c) {
                  tr_block2<acc_t, decltype(channel_block)::value>(block_operands(c), steps.data(), nsteps, m0);
                });
                return;
              }
              channel_blocks(Cg, [&](auto channel_block, int64_t c) {
                tr_block<acc_t, decltype(channel_block)::value>(block_operands(c), reader_tap.data(), reader_row.data(), p0, p2, m0);
              });
            };
            if (pair) {
              for (int64_t m0 = plo[f]; m0 < plo[f] + pcnt[f]; m0 += block) run(m0);
              continue;
            }
            auto for_m = [&](auto&& g) {
              int64_t m0 = m_a;
              for (; m0 + block <= m_b; m0 += block) g(m0);
              if (m0 < m_b) g(m_b - block);
            };
            for_m(run);
            if (direct) continue;
            // scatter the phase row into the input row: col = s*m + f - pad_cols (n = 1 here)
            const int64_t mlo = std::max<int64_t>(m_a, ceil_div(std::max<int64_t>(pad_cols - f, 0), s));
            for (int64_t c = 0; c < Cg; ++c) {
              const acc_t* src = xo.data() + c * out_block_width;
              acc_t* dst = xrow.data() + c * W;
              for (int64_t m = mlo; m < m_b; ++m) {
                const int64_t col = s * m + f - pad_cols;
                if (col >= W) break;
                if (col >= 0) dst[col] = src[m];
              }
            }
          }
          if (pair && s == 1) {  // column col = m - pad_cols
            for (int64_t k = 0; k < n; ++k) convert_rows(xout + k * W, xstep, xo.data() + k * x2 + pad_cols, out_block_width, Cg, W);
          } else if (pair) {
            // column col = 2m + f - pad_cols: even columns from the phase of pad_cols, odd from the other
            const int64_t f0 = pad_cols % 2, m0 = pad_cols / 2, m1 = (pad_cols + 1) / 2;
            for (int64_t k = 0; k < n; ++k)
              for (int64_t c = 0; c < Cg; ++c) {
                const acc_t* pe = xo.data() + k * x2 + (f0 * Cg + c) * out_block_width + m0;
                const acc_t* po = xo.data() + k * x2 + ((1 - f0) * Cg + c) * out_block_width + m1;
                acc_t* dst = xout + k * W + c * xstep;
                interleave2(dst, pe, po, W / 2);
                if (W % 2) dst[W - 1] = pe[W / 2];
              }
          }
          // scalar path: pairs the affine blocks did not cover (clamp-border edges)
          const int64_t blocks_begin = m_b > m_a ? m_a - pad_cols : 0, blocks_end = m_b > m_a ? m_b - pad_cols : 0;
          for (int64_t k = 0; k < n; ++k) {
            acc_t* xk = xout + k * W;
            if (direct)  // the blocks wrote columns [blocks_begin, blocks_end); the scalar path adds to the rest
              for (int64_t c = 0; c < Cg; ++c)
                for (int64_t col = 0; col < W; ++col)
                  if (col < blocks_begin || col >= blocks_end) xk[c * xstep + col] = 0;
            for (int64_t col = 0; col < W; ++col) {
              const bool fast = args.zero_border || (col >= blocks_begin && col < blocks_end);
              for (int64_t a = col_readers_begin[col]; a < col_readers_begin[col + 1]; ++a) {
                const int64_t v = col_readers[3 * a], j = col_readers[3 * a + 1], aff = col_readers[3 * a + 2];
                if (fast && aff) continue;
                for (int64_t pp = row_readers_begin[h + k]; pp < row_readers_begin[h + k + 1]; ++pp) {
                  const int64_t u = reader_tap[pp], ii = reader_row[pp] - imin;
                  const acc_t wv = wb[(u * Kw + v) * tplane + ii * padded_row_width + left_pad + j];
                  for (int64_t c = 0; c < Cg; ++c) xk[c * xstep + col] += wv * ys[c * cplane + ii * padded_row_width + left_pad + j];
                }
              }
            }
          }
        }
        if (!direct && !pair) convert_rows(xd + ((b * C + g * Cg) * H + h) * W, H * W, xrow.data(), W, Cg, W);
        h += n;
      }
    }
  });
  return x;
}

}  // namespace

at::Tensor aggregate_transpose(const at::Tensor& y, const at::Tensor& w, const Plan& plan) {
  return dispatch_floating(y.scalar_type(), [&](auto type) {
    return aggregate_transpose_impl<decltype(type)>(y, w, Args(y, w, plan));
  });
}

}  // namespace tokenmix_cpu
