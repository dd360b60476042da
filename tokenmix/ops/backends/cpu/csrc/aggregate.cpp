// aggregate: y[b, c, i, j] = sum over taps t of w[b, g(c), t, i, j] * x[b, c, src_t(i, j)].
// Column kernels (agg_block, agg_block2) over phase-split scratch rows, two output rows at once
// where it can; channels-last kernels (aggregate_cl) for narrow planes. Also runs
// aggregate_transpose at column stride 1 with a zero border, as an aggregate over the mirrored
// window with the weights taken at their source pixels (SourceWeights).
#include "kernels.h"
#include "layout.h"
#include "scratch.h"
#include "vec.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace tokenmix_cpu {
namespace {

// The operands of the column kernels (agg_block, agg_block2) for one block of CB channels:
// phase-split scratch rows (channel c's at x_rows + c * cstride, scratch rows rowstride apart,
// tap column v at tap_offset[v]), the weights of the first output row (tap t's row at
// wb + t * tap_pitch; the second row's wrow further), the outputs (channel c's row at
// out_rows + c * block_width; the second row's out_row_pitch further). weight_prefetch /
// out_prefetch > 0: also prefetch the weights / outputs that many elements ahead (the next
// row, when they are read / written in place).
template <typename acc_t>
struct AggBlock {
  const acc_t* x_rows;
  int64_t cstride, rowstride;
  const acc_t* wb;
  int64_t tap_pitch, wrow;
  acc_t* out_rows;
  int64_t block_width, out_row_pitch;
  int64_t Kw;
  const int64_t* tap_offset;
  int64_t weight_prefetch, out_prefetch;
};

// acc[c] += the Kw taps of one tap row for channel c: weights at wr (taps tap_pitch apart),
// the scratch input row at xr.
template <typename acc_t, int CB, typename V = typename Vec<acc_t>::type>
__attribute__((always_inline)) inline void agg_taps(const AggBlock<acc_t>& a, V (&acc)[CB], const acc_t* xr, const acc_t* wr) {
  for (int64_t v = 0; v < a.Kw; ++v) {
    const V wv = loadu(wr + v * a.tap_pitch);
    if (a.weight_prefetch) __builtin_prefetch(wr + v * a.tap_pitch + a.weight_prefetch, 0, 3);
    const acc_t* xp = xr + a.tap_offset[v];
    for (int c = 0; c < CB; ++c) acc[c] += wv * loadu(xp + c * a.cstride);
  }
}

// One vector of output columns [j0, j0 + L) of one output row for CB channels over all taps
// (scratch_row_of_tap[u]: the scratch row of tap row u, or -1).
template <typename acc_t, int CB>
__attribute__((noinline)) void agg_block(const AggBlock<acc_t>& a, const int64_t* scratch_row_of_tap, int64_t Kh, int64_t j0) {
  using V = typename Vec<acc_t>::type;
  V acc[CB];
  for (int c = 0; c < CB; ++c) acc[c] = V{};
  for (int64_t u = 0; u < Kh; ++u) {
    if (scratch_row_of_tap[u] < 0) continue;
    const acc_t* xr = a.x_rows + scratch_row_of_tap[u] * a.rowstride + j0;
    const acc_t* wr = a.wb + u * a.Kw * a.tap_pitch + j0;
    agg_taps(a, acc, xr, wr);
  }
  if (a.out_prefetch)
    for (int c = 0; c < CB; ++c) __builtin_prefetch(a.out_rows + c * a.block_width + j0 + a.out_prefetch, 1, 3);
  for (int c = 0; c < CB; ++c) storeu(a.out_rows + c * a.block_width + j0, acc[c]);
}

// Two output rows at once, over the steps of row_steps (key: scratch input row): where both
// rows read a scratch row, each input vector is loaded once for two FMAs (12 accumulators, 2
// weight vectors, 1 input vector in registers for CB = 6).
template <typename acc_t, int CB>
__attribute__((noinline)) void agg_block2(const AggBlock<acc_t>& a, const int64_t* steps, int64_t nsteps, int64_t j0) {
  using V = typename Vec<acc_t>::type;
  V a0[CB], a1[CB];
  for (int c = 0; c < CB; ++c) a0[c] = a1[c] = V{};
  for_steps(
      steps, nsteps,
      [&](int64_t key, int64_t u0, int64_t u1) {
        const acc_t* xr = a.x_rows + key * a.rowstride + j0;
        const acc_t* w0r = a.wb + u0 * a.Kw * a.tap_pitch + j0;
        const acc_t* w1r = a.wb + a.wrow + u1 * a.Kw * a.tap_pitch + j0;
        for (int64_t v = 0; v < a.Kw; ++v) {
          const V w0 = loadu(w0r + v * a.tap_pitch), w1 = loadu(w1r + v * a.tap_pitch);
          if (a.weight_prefetch)
            __builtin_prefetch(w0r + v * a.tap_pitch + a.weight_prefetch, 0, 3), __builtin_prefetch(w1r + v * a.tap_pitch + a.weight_prefetch, 0, 3);
          const acc_t* xp = xr + a.tap_offset[v];
          for (int c = 0; c < CB; ++c) {
            const V xv = in_register(loadu(xp + c * a.cstride));
            a0[c] += w0 * xv;
            a1[c] += w1 * xv;
          }
        }
      },
      [&](int64_t key, int64_t u, auto row) {  // a row read by one of the two only
        V(&acc)[CB] = decltype(row)::value ? a1 : a0;
        const acc_t* xr = a.x_rows + key * a.rowstride + j0;
        const acc_t* wr = a.wb + decltype(row)::value * a.wrow + u * a.Kw * a.tap_pitch + j0;
        agg_taps(a, acc, xr, wr);
      });
  if (a.out_prefetch)
    for (int c = 0; c < CB; ++c)
      __builtin_prefetch(a.out_rows + c * a.block_width + j0 + a.out_prefetch, 1, 3),
          __builtin_prefetch(a.out_rows + a.out_row_pitch + c * a.block_width + j0 + a.out_prefetch, 1, 3);
  for (int c = 0; c < CB; ++c)
    storeu(a.out_rows + c * a.block_width + j0, a0[c]), storeu(a.out_rows + a.out_row_pitch + c * a.block_width + j0, a1[c]);
}

// Weights at the source pixel (aggregate's source_weights mode): the weight of output (i, j) and tap
// (u, v) is the one stored at the pixel that tap reads, w[u * Kw + v][rows[u][i]][cols[v][j]],
// and 0 where that pixel is outside the image. This is the stride-1 zero-border
// aggregate_transpose written as an aggregate of y (see aggregate_transpose_impl). Its columns
// are affine, cols[v][j] = j + shift[v] on [lo[v], hi[v]) and -1 elsewhere, so each tap row of
// the weights is one shifted copy, zero-filled at the ends.
struct SourceWeights {
  int64_t Kw, Wo;
  std::vector<int64_t> lo, hi, shift;
  SourceWeights() : Kw(0), Wo(0) {}
  explicit SourceWeights(const Plan& plan) : Kw(plan.Kw), Wo(plan.Wo), lo(Kw), hi(Kw), shift(Kw) {
    const int64_t* cols = plan.cols.data();
    for (int64_t v = 0; v < Kw; ++v) {
      const int64_t* c = cols + v * Wo;
      int64_t a = 0;
      while (a < Wo && c[a] < 0) ++a;
      int64_t e = a;
      while (e < Wo && c[e] >= 0) ++e;
      lo[v] = a, hi[v] = e, shift[v] = a < Wo ? c[a] - a : 0;
      for (int64_t j = 0; j < Wo; ++j)
        TORCH_CHECK(j >= a && j < e ? c[j] == j + shift[v] : c[j] < 0, "tokenmix: source weights need affine columns");
    }
  }
  // rows [ia, ib) of the taps of one (batch, group), wg: its weights (args: the call's sizes);
  // tap t of row i goes to dst + t * tstride + (i - ia) * rstride: Wo entries, or
  // Wo rounded up to whole vectors (zeros past Wo) when per-pixel weights are already in the
  // accumulation type (masked vector loads: one or two per row on narrow planes, where
  // per-row fills and copies would cost more than the FMAs)
  template <typename scalar_t, typename acc_t>
  void copy(acc_t* dst0, int64_t tstride, int64_t rstride, const scalar_t* wg, const Args& args, int64_t ia, int64_t ib) const {
    constexpr int L = Vec<acc_t>::N;
    const int64_t KK = args.KK, wHW = args.wHW, wW = args.wW, Ho = args.Ho;
    const int64_t* rows = args.plan.rows.data();
    for (int64_t t = 0; t < KK; ++t) {
      const int64_t u = t / Kw, v = t % Kw, a = lo[v], e = hi[v];
      for (int64_t i = ia; i < ib; ++i) {
        acc_t* dst = dst0 + t * tstride + (i - ia) * rstride;
        const int64_t r = rows[u * Ho + i];
        if (r < 0 || e <= a) {
          std::fill(dst, dst + Wo, acc_t(0));
          continue;
        }
        if constexpr (std::is_same<scalar_t, acc_t>::value) {
          if (wHW > 1) {
            const acc_t* src = wg + t * wHW + r * wW + shift[v];
            for (int64_t j = 0; j < Wo; j += L) {
              if (src + j >= wg && src + j + L <= wg + KK * wHW) {
                storeu(dst + j, keep_lanes(src + j, a - j, e - j));
              } else {
                for (int64_t k = j; k < j + L; ++k) dst[k] = k >= a && k < e ? src[k] : acc_t(0);
              }
            }
            continue;
          }
        }
        std::fill(dst, dst + a, acc_t(0));
        if (wHW == 1)
          std::fill(dst + a, dst + e, static_cast<acc_t>(wg[t]));
        else
          convert(dst + a, wg + t * wHW + r * wW + a + shift[v], e - a);
        std::fill(dst + e, dst + Wo, acc_t(0));
      }
    }
  }
};

// Output rows under a vector (Wo < L) waste lanes when vectorised over columns (half of them
// at Wo = 4), and the per-task copies around the FMAs dominate. When a group's channels fill
// whole vectors (Cg % L == 0), vectorise over channels instead: each task copies its input rows
// channels-last into scratch, (row, W + 1 columns, Cg), column W left zero for taps outside the
// image, and every output pixel sums, per tap, the broadcast weight times its input pixel's
// channel vectors. Indices come straight from the tables (any geometry, both borders).
// NP consecutive output pixels of one row x NB channel vectors over all taps (NP * NB
// independent accumulators: one pixel's 2 would wait on the FMA latency), reading the taps of
// t from x_rows; out + p * ostep: pixel p's channels.
template <typename scalar_t, typename acc_t, int NB, int NP>
__attribute__((noinline)) void agg_pixels_cl(const acc_t* x_rows, PixelTaps<scalar_t> a, acc_t* out, int64_t ostep) {
  using V = typename Vec<acc_t>::type;
  constexpr int L = Vec<acc_t>::N;
  V acc[NP][NB];
  for (int p = 0; p < NP; ++p)
    for (int k = 0; k < NB; ++k) acc[p][k] = V{};
  for (int64_t u = 0; u < a.Kh; ++u) {
    if (a.rr[u] < 0) continue;
    const acc_t* xr = x_rows + a.rr[u];
    const scalar_t* wr = a.w + u * a.Kw * a.wstep;
    for (int64_t v = 0; v < a.Kw; ++v) {
      for (int p = 0; p < NP; ++p) {
        const acc_t* xp = xr + a.cidx[p * a.Kw + v];
        const V wv = splat(static_cast<acc_t>(wr[v * a.wstep + p * a.wpix]));
        for (int k = 0; k < NB; ++k) acc[p][k] += wv * loadu(xp + k * L);
      }
    }
  }
  for (int p = 0; p < NP; ++p)
    for (int k = 0; k < NB; ++k) storeu(out + p * ostep + k * L, acc[p][k]);
}

// The same sums for NP pixels whose taps read the columns p * S + v of a row (tap v of pixel
// p, unit dilation): a zero border's pixels, whose rows keep their zero padding. With K and S
// known at compile time the loop runs over the block's S * (NP - 1) + K columns, loading each
// column's channel vectors once for every (pixel, tap) that reads it (K * NP / (S * (NP - 1) +
// K) multiply-adds per load: 2.15 at K = 7, S = 2, NP = 4) and reading no column table; the
// column pitch is CG, the group's channels. Loads, not multiply-adds, bound the general kernel
// above (a column offset, a weight and NB input vectors per NB multiply-adds). Each pixel still
// adds its taps in the order (u, v), so the results are bit-identical to agg_pixels_cl's.
// x_rows + rr[u] + c0: the block's first column in tap row u's scratch row; w + (u * K + v) * wstep
// + p: the weight of tap (u, v) of pixel p; out + p * CG: pixel p's channels.
template <typename scalar_t, typename acc_t, int CG, int NP, int K, int S>
__attribute__((noinline)) void agg_pixels_cl_affine(const acc_t* x_rows, const int64_t* rr, int64_t c0, int64_t Kh,
                                                    const scalar_t* w, int64_t wstep, acc_t* out) {
  using AV = AffineVec<acc_t, CG>;
  using V = typename AV::type;
  constexpr int L = AV::L, NB = AV::NB, NC = S * (NP - 1) + K;
  V acc[NP][NB];
  for (int p = 0; p < NP; ++p)
    for (int k = 0; k < NB; ++k) acc[p][k] = V{};
  for (int64_t u = 0; u < Kh; ++u) {
    if (rr[u] < 0) continue;
    const acc_t* xr = x_rows + rr[u] + c0;
    const scalar_t* wv[K];
    for (int v = 0; v < K; ++v) wv[v] = w + (u * K + v) * wstep;
    static_for<NC>([&](auto c) {
      V xv[NB];
      for (int k = 0; k < NB; ++k) xv[k] = in_register(AV::load(xr + c * CG + k * L));
      static_for<NP>([&](auto p) {
        constexpr int v = decltype(c)::value - decltype(p)::value * S;
        if constexpr (v >= 0 && v < K) {
          const V wvv = AV::splat(static_cast<acc_t>(wv[v][decltype(p)::value]));
          for (int k = 0; k < NB; ++k) acc[decltype(p)::value][k] += wvv * xv[k];
        }
      });
    });
  }
  for (int p = 0; p < NP; ++p)
    for (int k = 0; k < NB; ++k) AV::store(out + p * CG + k * L, acc[p][k]);
}

template <typename scalar_t>
at::Tensor aggregate_cl(const at::Tensor& x, const at::Tensor& w, const Args& args, bool source_weights) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int L = Vec<acc_t>::N;
  const int64_t B = args.B, C = args.C, G = args.G, Cg = args.Cg, H = args.H, W = args.W, Ho = args.Ho, Wo = args.Wo;
  const int64_t Kh = args.Kh, Kw = args.Kw, KK = args.KK, s = args.s, wB = args.wB, wHW = args.wHW;
  const int64_t* rows = args.plan.rows.data();
  const int64_t* cols = args.plan.cols.data();
  const int64_t* col_offset = args.plan.col_offset.data();
  const auto [y, xd, wd, yd] = new_output<scalar_t>(x, w, {B, C, Ho, Wo});
  const int64_t ch = chunk_rows(B * G, Ho, 16), nch = ceil_div(Ho, ch);
  const int64_t max_rows_read = max_row_span(rows, Kh, Ho, ch);
  const LastRows lr = LastRows::for_taps(W, Cg, col_offset, s, Kw, Wo, args.zero_border);
  const int64_t pitch = lr.pitch, wpix = wHW == 1 ? 0 : 1;  // static weights: one per tap
  const std::vector<int64_t> cidx = lr.tap_columns(cols, Kw, Wo, col_offset, s), xoff = lr.elements(max_rows_read),
                             pix = strided(ch * Wo, Cg);  // pix: output pixels in the packed buffer
  const bool affine = affine_cl<scalar_t>(Cg, source_weights || wpix == 1, Kw, s, col_offset, args.zero_border);
  // source_weights: the task's weights, copied from the source pixels as (K*K, ch, Wo)
  const SourceWeights sw = source_weights ? SourceWeights(args.plan) : SourceWeights();
  const EdgeColumns edges(args.plan, args.zero_border && !source_weights);
  const int64_t wpitch = round_up(Wo, L), tap_pitch = ch * wpitch;
  ThreadScratch scratch(bytes_of({max_rows_read * pitch, ch * Wo * Cg, source_weights ? KK * tap_pitch : 0}, sizeof(acc_t)));
  for_each_task(B * G * nch, G, nch, scratch, [&](Carver& cv, TaskRange tasks) {
    Buf<acc_t> x_rows = cv.take<acc_t>(max_rows_read * pitch), out_rows = cv.take<acc_t>(ch * Wo * Cg),
               shifted_weights = cv.take<acc_t>(source_weights ? KK * tap_pitch : 0);
    std::vector<int64_t> rr(Kh);
    for (const Task task : tasks) {
      const int64_t b = task.batch, g = task.group, i0 = task.chunk * ch, i1 = std::min(Ho, i0 + ch);
      const auto span = row_span(rows, Kh, Ho, i0, i1);
      const int64_t rmin = span.first, rows_read = span.second;
      const scalar_t* xg = xd + ((b * C + g * Cg) * H + rmin) * W;
      to_last(x_rows.data(), xoff.data(), xg, H * W, Cg, rows_read * W);
      const scalar_t* wg = wd + ((wB == 1 ? 0 : b) * G + g) * KK * wHW;
      scalar_t* yg = yd + (b * C + g * Cg) * Ho * Wo;
      if (source_weights) sw.copy(shifted_weights.data(), tap_pitch, wpitch, wg, args, i0, i1);
      // the kernels multiply the weights of taps outside the image by a zero column: a
      // non-finite weight there gives a non-finite output, computed again without those taps
      // (rr: row i's scratch rows)
      auto fix_edges = [&](int64_t i, acc_t* orow) {
        if (edges.finite(orow, Wo, Cg)) return;
        edges.for_each(Wo, [&](int64_t j) {
          for (int64_t c = 0; c < Cg; ++c) {
            acc_t& o = orow[j * Cg + c];
            if (std::isfinite(o)) continue;
            acc_t acc = 0;
            for (int64_t u = 0; u < Kh; ++u) {
              if (rr[u] < 0) continue;
              for (int64_t v = 0; v < Kw; ++v)
                if (cols[v * Wo + j] >= 0)
                  acc += static_cast<acc_t>(wg[(u * Kw + v) * wHW + (i * Wo + j) * wpix]) * x_rows[rr[u] + cidx[j * Kw + v] + c];
            }
            o = acc;
          }
        });
      };
      for (int64_t i = i0; i < i1; ++i) {
        for (int64_t u = 0; u < Kh; ++u) {
          const int64_t r = rows[u * Ho + i];
          rr[u] = r >= 0 ? (r - rmin) * pitch : -1;
        }
        acc_t* orow = out_rows.data() + (i - i0) * Wo * Cg;
        if constexpr (std::is_same<scalar_t, float>::value) {
          if (affine) {
            with_affine(Cg, Kw, s, [&](auto cg, auto kc, auto sc) {
              constexpr int CG = decltype(cg)::value, KA = decltype(kc)::value, SA = decltype(sc)::value;
              affine_blocks<AffineVec<acc_t, CG>::NP>(Wo, [&](auto np, int64_t j) {
                constexpr int NP = decltype(np)::value;
                if (source_weights)
                  agg_pixels_cl_affine<acc_t, acc_t, CG, NP, KA, SA>(x_rows.data(), rr.data(), cidx[j * Kw], Kh,
                                                                     shifted_weights.data() + (i - i0) * wpitch + j, tap_pitch,
                                                                     orow + j * CG);
                else
                  agg_pixels_cl_affine<scalar_t, acc_t, CG, NP, KA, SA>(x_rows.data(), rr.data(), cidx[j * Kw], Kh,
                                                                        wg + i * Wo + j, wHW, orow + j * CG);
              });
            });
            continue;
          }
        }
        pixel_blocks(Wo, Cg / L, [&](auto np, auto nb, int64_t j, int64_t k) {
          constexpr int NB = decltype(nb)::value, NP = decltype(np)::value;
          acc_t* o = orow + j * Cg + k * L;
          if (source_weights)
            agg_pixels_cl<acc_t, acc_t, NB, NP>(x_rows.data() + k * L,
                                                {.rr = rr.data(), .cidx = cidx.data() + j * Kw, .Kh = Kh, .Kw = Kw,
                                                 .w = shifted_weights.data() + (i - i0) * wpitch + j, .wstep = tap_pitch, .wpix = 1},
                                                o, Cg);
          else
            agg_pixels_cl<scalar_t, acc_t, NB, NP>(x_rows.data() + k * L,
                                                   {.rr = rr.data(), .cidx = cidx.data() + j * Kw, .Kh = Kh, .Kw = Kw,
                                                    .w = wg + (i * Wo + j) * wpix, .wstep = wHW, .wpix = wpix},
                                                   o, Cg);
        });
      }
      if (edges.any && !all_finite(out_rows.data(), (i1 - i0) * Wo * Cg))
        for (int64_t i = i0; i < i1; ++i) {
          for (int64_t u = 0; u < Kh; ++u) {
            const int64_t r = rows[u * Ho + i];
            rr[u] = r >= 0 ? (r - rmin) * pitch : -1;
          }
          fix_edges(i, out_rows.data() + (i - i0) * Wo * Cg);
        }
      from_last(yg + i0 * Wo, Ho * Wo, out_rows.data(), pix.data(), Cg, (i1 - i0) * Wo);
    }
  });
  return y;
}

template <typename scalar_t>
at::Tensor aggregate_impl(const at::Tensor& x, const at::Tensor& w, const Args& args, bool source_weights = false) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int L = Vec<acc_t>::N;
  const int64_t B = args.B, C = args.C, G = args.G, Cg = args.Cg, H = args.H, W = args.W, Ho = args.Ho, Wo = args.Wo;
  const int64_t Kh = args.Kh, Kw = args.Kw, KK = args.KK, s = args.s, wB = args.wB, wHW = args.wHW, wW = args.wW;
  const int64_t block = L;  // one vector of columns per block (measured faster than two)
  // Channels-last on rows under a vector, and at stride > 1 on rows under four vectors (faster
  // there; at stride 1 the column kernels are faster on rows of two or more vectors), and on rows
  // under four vectors whenever the affine kernel covers the plane (faster than the column
  // kernels there, slower on wider rows, which keep them)
  const bool affine = !source_weights && affine_cl<scalar_t>(Cg, wHW > 1, Kw, s, args.plan.col_offset.data(), args.zero_border);
  if ((Wo < L || (!source_weights && s > 1 && Wo < 4 * L) || (affine && Wo < 4 * L)) && Cg % L == 0)
    return aggregate_cl<scalar_t>(x, w, args, source_weights);
  // weights_in_place: weights are read and outputs written in place (no scratch copies) when they are
  // already in the accumulation type and every output row holds a vector (the last block of a
  // row is shifted left to end at Wo, so no read or write leaves the row); with the weights
  // prefetched a row ahead this measured faster than copying them. Narrower rows are packed
  // (below).
  const bool weights_in_place = !source_weights && std::is_same<scalar_t, acc_t>::value && wHW > 1 && Wo >= L;
  const bool output_in_place = weights_in_place || (source_weights && std::is_same<scalar_t, acc_t>::value && Wo >= L);
  ColPlan p = make_colplan(args.plan, block, output_in_place);
  const int64_t* rows = args.plan.rows.data();
  const auto [y, xd, wd, yd] = new_output<scalar_t>(x, w, {B, C, Ho, Wo});
  // source_weights: rows per task such that the task's weight copy stays within about 96 KiB (the
  // transpose's peak memory is output-sized plus this per-thread scratch)
  const int64_t most = source_weights ? std::min<int64_t>(16, std::max<int64_t>(2, (96 << 10) / (KK * p.block_width * sizeof(acc_t)))) : 16;
  const int64_t ch = chunk_rows(B * G, Ho, most), nch = ceil_div(Ho, ch);
  const int64_t block_width = p.block_width, rowstride = s * p.phase_width;
  const SourceWeights sw = source_weights ? SourceWeights(args.plan) : SourceWeights();
  const EdgeColumns edges(args.plan, args.zero_border && !source_weights);

  const int64_t max_rows_read = max_row_span(rows, Kh, Ho, ch), cstride = max_rows_read * rowstride;
  p.plan_fill(max_rows_read);
  // copied weights of a task: (K*K, ch, block_width), so each tap plane streams ch rows
  // (+ one cache line, so the K*K tap rows do not all map to the same L1 sets). Rows under
  // a vector are packed (pitch Wo): a tap's rows are then one contiguous copy, and the lanes
  // past Wo that a block reads (the next rows, or the slack) only reach output columns that
  // are dropped.
  const bool packed = !source_weights && !weights_in_place && wHW > 1 && Wo < L;
  const int64_t wpitch = packed ? Wo : block_width;
  const int64_t tap_pitch = ch * wpitch + 64 / static_cast<int64_t>(sizeof(acc_t));
  ThreadScratch scratch(bytes_of({Cg * max_rows_read * rowstride, weights_in_place ? 0 : KK * tap_pitch, output_in_place ? 0 : 2 * Cg * block_width},
                                 sizeof(acc_t)));

  for_each_task(B * G * nch, G, nch, scratch, [&](Carver& cv, TaskRange tasks) {
    Buf<acc_t> x_rows = cv.take<acc_t>(Cg * max_rows_read * rowstride), weight_rows = cv.take<acc_t>(weights_in_place ? 0 : KK * tap_pitch),
               out_rows = cv.take<acc_t>(output_in_place ? 0 : 2 * Cg * block_width);
    std::vector<int64_t> scratch_row_of_tap(2 * Kh), steps(6 * Kh);
    std::vector<char> used(Kh);
    for (const Task task : tasks) {
      const int64_t b = task.batch, g = task.group, i0 = task.chunk * ch, i1 = std::min(Ho, i0 + ch);
      const auto span = row_span(rows, Kh, Ho, i0, i1);
      const int64_t rmin = span.first, rows_read = span.second;
      if (rows_read > 0) {
        fill_rows<scalar_t, acc_t>(x_rows.data(), cstride, xd + (b * C + g * Cg) * H * W, Cg, H, rmin, rows_read, p);
      }
      // the next task's input rows and (when copied) weights, fetched a slice per row below
      Prefetch pfx, pfw;
      if (task.has_next()) {
        const Task nt = task.next();
        const int64_t nb = nt.batch, ng = nt.group, ni0 = nt.chunk * ch, ni1 = std::min(Ho, ni0 + ch);
        const auto nspan = row_span(rows, Kh, Ho, ni0, ni1);
        pfx = Prefetch(xd + ((nb * C + ng * Cg) * H + nspan.first) * W, Cg, H * W, nspan.second * W);
        if (source_weights && wHW > 1)
          pfw = Prefetch(wd + ((wB == 1 ? 0 : nb) * G + ng) * KK * wHW + nspan.first * wW, KK, wHW, nspan.second * wW);
        else if (!weights_in_place && wHW > 1)
          pfw = Prefetch(wd + ((wB == 1 ? 0 : nb) * G + ng) * KK * wHW + ni0 * Wo, KK, wHW, (ni1 - ni0) * Wo);
      }
      const scalar_t* wg = wd + ((wB == 1 ? 0 : b) * G + g) * KK * wHW;
      scalar_t* yg = yd + (b * C + g * Cg) * Ho * Wo;
      if (packed) {
        for (int64_t t = 0; t < KK; ++t) {
          const scalar_t* src = wg + t * wHW + i0 * Wo;
          acc_t* dst = weight_rows.data() + t * tap_pitch;
          convert(dst, src, (i1 - i0) * Wo);
        }
      } else if (source_weights) {
        sw.copy(weight_rows.data(), tap_pitch, block_width, wg, args, i0, i1);
      } else if (!weights_in_place) {
        for (int64_t t = 0; t < KK; ++t) {
          for (int64_t i = i0; i < i1; ++i) {
            acc_t* dst = weight_rows.data() + t * tap_pitch + (i - i0) * block_width;
            if (wHW == 1) {
              std::fill(dst, dst + Wo, static_cast<acc_t>(wg[t]));
            } else {
              const scalar_t* src = wg + t * wHW + i * Wo;
              convert(dst, src, Wo);
            }  // columns [Wo, block_width) stay zero
          }
        }
      }
      for (int64_t i = i0; i < i1;) {
        const int64_t n = i + 1 < i1 ? 2 : 1;  // output rows computed together
        for (int64_t k = 0; k < n; ++k) {
          pfx.slice(i + k - i0, i1 - i0);
          pfw.slice(i + k - i0, i1 - i0);
        }
        tap_scratch_rows(rows, Kh, Ho, i, n, rmin, scratch_row_of_tap.data());
        // weights of row i + k: tap t at wb + k * wrow + t * wstep + j; outputs of channel c at
        // orow + k * out_row_pitch + c * ostep + j
        const acc_t* wb;
        int64_t wstep, ostep, wrow, out_row_pitch;
        acc_t* orow;
        if (weights_in_place) {
          wb = reinterpret_cast<const acc_t*>(wg) + i * Wo;
          wstep = wHW;
          wrow = Wo;
        } else {
          wb = weight_rows.data() + (i - i0) * wpitch;
          wstep = tap_pitch;
          wrow = wpitch;
        }
        if (output_in_place) {
          orow = reinterpret_cast<acc_t*>(yg) + i * Wo;
          ostep = Ho * Wo;
          out_row_pitch = Wo;
        } else {
          orow = out_rows.data();
          ostep = block_width;
          out_row_pitch = Cg * block_width;
        }
        if (rows_read == 0) {
          for (int64_t k = 0; k < n; ++k)
            for (int64_t c = 0; c < Cg; ++c)
              std::fill(orow + k * out_row_pitch + c * ostep, orow + k * out_row_pitch + c * ostep + Wo, acc_t(0));
        } else {
          // channel blocks outer, column blocks inner: the x rows of one channel block (a few
          // KiB) and the weights of the rows stay in L1 while the blocks sweep the rows
          // in place: the first channel block prefetches the next rows' weights, every block
          // its outputs' next rows
          const int64_t ahead = output_in_place && i + n < Ho ? n * Wo : 0, wahead = weights_in_place ? ahead : 0;
          auto block_operands = [&](int64_t c) {
            return AggBlock<acc_t>{.x_rows = x_rows.data() + c * cstride, .cstride = cstride, .rowstride = rowstride,
                                   .wb = wb, .tap_pitch = wstep, .wrow = wrow, .out_rows = orow + c * ostep,
                                   .block_width = ostep, .out_row_pitch = out_row_pitch, .Kw = Kw,
                                   .tap_offset = p.tap_offset.data(), .weight_prefetch = c == 0 ? wahead : 0,
                                   .out_prefetch = ahead};
          };
          if (n == 2) {
            const int64_t nsteps = row_steps({scratch_row_of_tap.data(), nullptr, Kh}, {scratch_row_of_tap.data() + Kh, nullptr, Kh}, true,
                                             used.data(), steps.data());
            channel_blocks2(Cg, [&](auto channel_block, int64_t c) {
              const AggBlock<acc_t> a = block_operands(c);
              for_blocks(p, block, [&](int64_t j0) { agg_block2<acc_t, decltype(channel_block)::value>(a, steps.data(), nsteps, j0); });
            });
          } else {
            channel_blocks(Cg, [&](auto channel_block, int64_t c) {
              const AggBlock<acc_t> a = block_operands(c);
              for_blocks(p, block, [&](int64_t j0) {
                agg_block<acc_t, decltype(channel_block)::value>(a, scratch_row_of_tap.data(), Kh, j0);
              });
            });
          }
          // output (row i + k, column j, channel c) from its in-image taps alone
          auto pixel = [&](int64_t k, int64_t j, int64_t c) {
            const int64_t* rk = scratch_row_of_tap.data() + k * Kh;
            const acc_t* wk = wb + k * wrow;
            const acc_t* xc = x_rows.data() + c * cstride;
            acc_t acc = 0;
            for (int64_t u = 0; u < Kh; ++u) {
              if (rk[u] < 0) continue;
              for (int64_t v = 0; v < Kw; ++v) {
                int64_t col = p.cols[v * Wo + j];
                if (col < 0) continue;
                acc += wk[(u * Kw + v) * wstep + j] * xc[rk[u] * rowstride + p.pos(col)];
              }
            }
            return acc;
          };
          // scalar path: columns outside the affine range (clamp-border edges)
          for (int64_t k = 0; k < n && !p.all_fast(); ++k)
            for (int64_t j = 0; j < Wo; ++j) {
              if (in_fast(p, j)) continue;
              for (int64_t c = 0; c < Cg; ++c) orow[k * out_row_pitch + c * ostep + j] = pixel(k, j, c);
            }
          // the blocks multiply the weights of taps outside the image by the zero padding: a
          // non-finite weight there gives a non-finite output, computed again without those taps
          for (int64_t k = 0; k < n && edges.any; ++k) {
            bool finite = true;
            for (int64_t c = 0; c < Cg && finite; ++c) finite = edges.finite(orow + k * out_row_pitch + c * ostep, Wo);
            if (finite) continue;
            edges.for_each(Wo, [&](int64_t j) {
              for (int64_t c = 0; c < Cg; ++c) {
                acc_t& o = orow[k * out_row_pitch + c * ostep + j];
                if (!std::isfinite(o)) o = pixel(k, j, c);
              }
            });
          }
        }
        if (!output_in_place)
          for (int64_t k = 0; k < n; ++k) convert_rows(yg + (i + k) * Wo, Ho * Wo, out_rows.data() + k * out_row_pitch, block_width, Cg, Wo);
        i += n;
      }
    }
  });
  return y;
}

}  // namespace

at::Tensor aggregate(const at::Tensor& x, const at::Tensor& w, const Plan& plan) {
  return dispatch_floating(x.scalar_type(), [&](auto type) {
    return aggregate_impl<decltype(type)>(x, w, Args(x, w, plan));
  });
}

at::Tensor aggregate_source_weights(const at::Tensor& y, const at::Tensor& w, const Plan& mirrored) {
  return dispatch_floating(y.scalar_type(), [&](auto type) {
    return aggregate_impl<decltype(type)>(y, w, Args(y, w, mirrored), true);
  });
}

}  // namespace tokenmix_cpu
