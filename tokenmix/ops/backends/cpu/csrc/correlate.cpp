// correlate: out[b, g, t, i, j] = sum over c in g of q[b, c, i, j] * k[b, c, src_t(i, j)].
// Column kernels (corr_block, corr_block2) keeping up to 8 taps in registers; channels-last
// (correlate_cl) for the narrowest planes; the scratch-free tail (correlate_tail) for the
// planes whose memory the other tasks borrow as scratch (lent_planes).
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

// The operands of the column kernels (corr_block, corr_block2) for one input row: the row in
// the phase-split scratch (channel c's at ks + c * cstride), the q rows (channel c's at
// qs + c * qstep; the second output row's q2 further) of Cg channels, and the pitch of the
// result rows (tap tv's row at r + tv * rstep). The kernels take TV taps at a time, tap tv's
// column at tap_offset[tv].
template <typename acc_t>
struct CorrBlock {
  const acc_t* ks;
  int64_t cstride;
  const acc_t* qs;
  int64_t qstep, q2, Cg, rstep;
};

// TV taps of one output row, columns [j0, j0 + L), into result_rows.
template <typename acc_t, int TV>
__attribute__((noinline)) void corr_block(const CorrBlock<acc_t>& a, const int64_t* tap_offset, acc_t* result_rows,
                                          int64_t j0) {
  using V = typename Vec<acc_t>::type;
  V acc[TV];
  for (int tv = 0; tv < TV; ++tv) acc[tv] = V{};
  for (int64_t c = 0; c < a.Cg; ++c) {
    const V qv = loadu(a.qs + c * a.qstep + j0);
    const acc_t* kc = a.ks + c * a.cstride + j0;
    for (int tv = 0; tv < TV; ++tv) acc[tv] = fmadd(qv, loadu(kc + tap_offset[tv]), acc[tv]);
  }
  for (int tv = 0; tv < TV; ++tv) storeu(result_rows + tv * a.rstep + j0, acc[tv]);
}

// Two output rows i and i + 1 that read input row ks with tap rows u0 and u1: a0 / a1 hold TV
// taps of each row, and each input vector loaded feeds both (8 accumulators, 2 query vectors, 1
// input vector in registers for TV = 4). r0 / r1: the two rows' results of the first tap.
template <typename acc_t, int TV>
__attribute__((noinline)) void corr_block2(const CorrBlock<acc_t>& a, const int64_t* tap_offset, acc_t* r0, acc_t* r1,
                                           int64_t j0) {
  using V = typename Vec<acc_t>::type;
  V a0[TV], a1[TV];
  for (int tv = 0; tv < TV; ++tv) a0[tv] = a1[tv] = V{};
  for (int64_t c = 0; c < a.Cg; ++c) {
    const V q0 = in_register(loadu(a.qs + c * a.qstep + j0)), q1 = in_register(loadu(a.qs + a.q2 + c * a.qstep + j0));
    const acc_t* kc = a.ks + c * a.cstride + j0;
    for (int tv = 0; tv < TV; ++tv) {
      const V kv = in_register(loadu(kc + tap_offset[tv]));
      a0[tv] = fmadd(q0, kv, a0[tv]);
      a1[tv] = fmadd(q1, kv, a1[tv]);
    }
  }
  for (int tv = 0; tv < TV; ++tv) storeu(r0 + tv * a.rstep + j0, a0[tv]), storeu(r1 + tv * a.rstep + j0, a1[tv]);
}

// A block of L output columns of NT taps of one tap row, for correlate_tail: out[m * ostep + l]
// = sum over c of q[c * qstep + l] * k[c * kstep + col_offset[m] + l * s], one fused multiply-add
// chain per output in channel order, in the accumulation type. S = 1 or 2: s compiled in
// (stride 2 loads 2L elements and keeps the even ones: the caller makes sure the odd last one
// is inside the tensor); S = -1: any s, each tap's lanes outside the row's W columns read as
// zeros (a zero border's edge blocks, as the column kernels' zero padding: the same chains),
// with masked loads (the 16-bit types: a plain load with the lanes cleared where it stays
// inside k's tensor [kbeg, kend), else lane by lane). The 16-bit types store lane by lane.
template <typename scalar_t>
struct TailBlock {
  const scalar_t* q;
  int64_t qstep;
  const scalar_t* k;
  int64_t kstep, Cg;
  const int64_t* col_offset;
  int64_t s;
  scalar_t* out;
  int64_t ostep;
  int64_t col0, W;  // S = -1: the block's first input column (tap offset 0) and the row width
  const scalar_t *kbeg, *kend;
};

template <typename scalar_t, int NT, int S>
__attribute__((noinline)) void tail_block(const TailBlock<scalar_t>& a) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = typename Vec<acc_t>::type;
  constexpr int L = Vec<acc_t>::N;
  constexpr bool same = std::is_same<scalar_t, acc_t>::value;
  V acc[NT];
  int64_t lo[NT], hi[NT];
  for (int m = 0; m < NT; ++m) {
    acc[m] = V{};
    if constexpr (S == -1) {  // lanes l with 0 <= col0 + col_offset[m] + l * s < W
      const int64_t c0 = a.col0 + a.col_offset[m];
      lo[m] = c0 >= 0 ? 0 : ceil_div(-c0, a.s);
      hi[m] = a.W - 1 - c0 >= 0 ? std::min<int64_t>(L, (a.W - 1 - c0) / a.s + 1) : 0;
    }
  }
  for (int64_t c = 0; c < a.Cg; ++c) {
    const V qv = load_acc<1>(a.q + c * a.qstep);
    const scalar_t* kc = a.k + c * a.kstep;
    for (int m = 0; m < NT; ++m) {
      V kv;
      if constexpr (S == 1) {
        kv = load_acc<1>(kc + a.col_offset[m]);
      } else if constexpr (S == 2) {
        kv = load_acc<2>(kc + a.col_offset[m]);
      } else if constexpr (S == -1 && same) {
        kv = masked_step(kc + a.col_offset[m], a.s, lo[m], hi[m]);
      } else if constexpr (S == -1) {  // the 16-bit types
        const scalar_t* p = kc + a.col_offset[m];
        bool loaded = false;
#if defined(__AVX2__)
        if (p >= a.kbeg && p + a.s * L <= a.kend && (a.s == 1 || a.s == 2)) {
          const V all = a.s == 1 ? load_acc<1>(p) : load_acc<2>(p);
          kv = (V)_mm256_and_ps((__m256)all, _mm256_castsi256_ps(lane_range<float>(lo[m], hi[m])));
          loaded = true;
        }
#endif
        for (int l = 0; l < L && !loaded; ++l)
          kv[l] = l >= lo[m] && l < hi[m] ? static_cast<acc_t>(p[l * a.s]) : acc_t(0);
      }
      acc[m] = fmadd(qv, kv, acc[m]);
    }
  }
  for (int m = 0; m < NT; ++m) {
    if constexpr (same) {
      storeu(a.out + m * a.ostep, acc[m]);
    } else {
      for (int l = 0; l < L; ++l) a.out[m * a.ostep + l] = static_cast<scalar_t>(acc[m][l]);
    }
  }
}

// correlate of the planes [p0, p1) of (batch x group) with no scratch at all (the planes
// correlate lent to its other tasks, see lent_planes): q and k are read in place, each output
// row written once. Every result is the same fused multiply-add chain over the channels, in
// channel order from 0, as the column kernels' (corr_block, corr_block2 and the scalar path),
// so the tail is bit-identical to them. Per (plane, output row, tap row):
// - float rows of at most 8 output and 16 input columns (the 7x7 and 14x14 stages): the whole
//   row at once, each tap's k columns picked by a lane permutation of the k row (index tables
//   from the column table, so any border, stride and dilation);
// - else blocks of L output columns (tail_block), each q vector serving up to 8 taps: where
//   every tap column of the block is affine and inside the image (columns [ja, jb)) plain or
//   stride-2 loads; a zero border's edge blocks with masked loads (taps outside the row read 0);
// - the other columns (the clamp border's edges) through the tables.
// The 16-bit types sum in float32, as the column kernels do; they load and store lane by lane.
template <typename scalar_t>
void correlate_tail(const at::Tensor& q_t, const at::Tensor& k_t, const at::Tensor& out_t, int64_t p0, int64_t p1, int64_t Cg,
                    const Plan& plan) {
  const scalar_t* qd = q_t.data_ptr<scalar_t>();
  const scalar_t* kd = k_t.data_ptr<scalar_t>();
  const scalar_t *qend = qd + q_t.numel(), *kend = kd + k_t.numel();
  scalar_t* od = out_t.data_ptr<scalar_t>();
  const int64_t H = plan.H, W = plan.W, Ho = plan.Ho, Wo = plan.Wo, Kh = plan.Kh, Kw = plan.Kw, s = plan.col_stride;
  const int64_t fast_begin = plan.affine_begin, fast_end = plan.affine_end;
  const int64_t* rows = plan.rows.data();
  const int64_t* cols = plan.cols.data();
  const int64_t* col_offset = plan.col_offset.data();
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int L = Vec<acc_t>::N;
  const int64_t KK = Kh * Kw;
  int64_t ja = std::max<int64_t>(fast_begin, 0), jb = std::min(fast_end, Wo);
  for (int64_t v = 0; v < Kw; ++v) {  // in the image: 0 <= j * s + col_offset[v] < W
    ja = std::max(ja, ceil_div(std::max<int64_t>(-col_offset[v], 0), s));
    jb = std::min(jb, W - 1 - col_offset[v] >= 0 ? (W - 1 - col_offset[v]) / s + 1 : 0);
  }
  const bool vec = jb - ja >= L;
  if (!vec) ja = jb = 0;
  // a zero border's table (every column affine, -1 outside the image): the edge blocks mask
  bool zero_affine = Wo >= L;
  for (int64_t v = 0; v < Kw && zero_affine; ++v)
    for (int64_t j = 0; j < Wo; ++j) {
      const int64_t col = j * s + col_offset[v];
      zero_affine = zero_affine && cols[v * Wo + j] == (col >= 0 && col < W ? col : -1);
    }
#if defined(__AVX2__)
  const bool narrow = std::is_same<acc_t, float>::value && Wo <= 8 && W <= 16;
  std::vector<int32_t> pidx(narrow ? Kw * 8 : 0);  // per tap column v, lane j: its input column, -1 = none
  for (int64_t v = 0; v < (narrow ? Kw : 0); ++v)
    for (int64_t j = 0; j < 8; ++j) pidx[v * 8 + j] = j < Wo ? static_cast<int32_t>(cols[v * Wo + j]) : -1;
#else
  const bool narrow = false;
#endif
  // per (plane, output row): its tap rows one after the other, so its q rows and the k rows
  // (shared with the next output row) stay in L1
  at::parallel_for(0, (p1 - p0) * Ho, 1, [&](int64_t a0, int64_t a1) {
    bool q_finite = true;  // of the output row (plane, i), found at its first tap row
    for (int64_t au = a0 * Kh; au < a1 * Kh; ++au) {
      const int64_t pl = p0 + au / (Kh * Ho), i = (au / Kh) % Ho, u = au % Kh;
      if (u == 0) {
        q_finite = true;
        for (int64_t c = 0; c < Cg && q_finite && plan.zero_border; ++c)
          q_finite = all_finite(qd + (pl * Cg + c) * Ho * Wo + i * Wo, Wo);
      }
      const int64_t r = rows[u * Ho + i];
      scalar_t* o = od + ((pl * KK + u * Kw) * Ho + i) * Wo;  // tap (u, v) at o + v * Ho * Wo
      if (r < 0) {
        for (int64_t v = 0; v < Kw; ++v) std::fill(o + v * Ho * Wo, o + v * Ho * Wo + Wo, scalar_t(0));
        continue;
      }
      [&] {  // the row's taps; then the columns they read outside the image are zeroed
        const scalar_t* q = qd + pl * Cg * Ho * Wo + i * Wo;  // channel c at q + c * Ho * Wo
        const scalar_t* k = kd + pl * Cg * H * W + r * W;     // channel c at k + c * H * W
#if defined(__AVX2__)
        if constexpr (std::is_same<acc_t, float>::value) {
          if (narrow) {
            // the n <= 8 elements at p (the 16-bit types converted), zeros after them; reads
            // past them only inside the tensor (end)
            auto row8 = [](const scalar_t* p, int64_t n, const scalar_t* end) {
              if constexpr (std::is_same<scalar_t, float>::value) {
                return _mm256_maskload_ps(p, lane_range<float>(0, n));
              } else {
                if (p + 8 <= end)
                  return _mm256_and_ps((__m256)load_acc<1>(p), _mm256_castsi256_ps(lane_range<float>(0, n)));
                alignas(32) float t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
                for (int64_t j = 0; j < n; ++j) t[j] = static_cast<float>(p[j]);
                return _mm256_load_ps(t);
              }
            };
            for (int64_t v0 = 0; v0 < Kw; v0 += 8)
              with_count<8>(Kw - v0, [&](auto tv) {
                constexpr int NT = decltype(tv)::value;
                __m256i idx[NT], hi[NT], ok[NT];
                for (int m = 0; m < NT; ++m) {
                  const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pidx.data() + (v0 + m) * 8));
                  idx[m] = c;  // permutevar uses the low 3 bits
                  hi[m] = _mm256_cmpgt_epi32(c, _mm256_set1_epi32(7));
                  ok[m] = _mm256_cmpgt_epi32(c, _mm256_set1_epi32(-1));
                }
                __m256 acc[NT];
                for (int m = 0; m < NT; ++m) acc[m] = _mm256_setzero_ps();
                for (int64_t c = 0; c < Cg; ++c) {
                  const __m256 qv = row8(q + c * Ho * Wo, Wo, qend);
                  const scalar_t* kc = k + c * H * W;
                  const __m256 k0 = row8(kc, std::min<int64_t>(W, 8), kend);
                  const __m256 k1 = row8(kc + 8, std::max<int64_t>(W - 8, 0), kend);
                  for (int m = 0; m < NT; ++m) {
                    const __m256 kv = _mm256_blendv_ps(_mm256_permutevar8x32_ps(k0, idx[m]),
                                                       _mm256_permutevar8x32_ps(k1, idx[m]), _mm256_castsi256_ps(hi[m]));
                    acc[m] = _mm256_fmadd_ps(qv, _mm256_and_ps(kv, _mm256_castsi256_ps(ok[m])), acc[m]);
                  }
                }
                for (int m = 0; m < NT; ++m) {
                  alignas(32) float t[8];
                  _mm256_store_ps(t, acc[m]);
                  std::copy(t, t + Wo, o + (v0 + m) * Ho * Wo);
                }
              });
            return;
          }
        }
#endif
        if (vec || zero_affine) {
          auto block = [&](int64_t j0) {
            // stride 2 reads one element past a block's last column: past the tensor only on
            // its very last row, which then goes through masked loads
            const bool two = s == 2 && k + (Cg - 1) * H * W + j0 * s + col_offset[Kw - 1] + 2 * L <= kend;
            const bool edge = j0 < ja || j0 + L > jb;
            for (int64_t v0 = 0; v0 < Kw; v0 += 8)
              with_count<8>(Kw - v0, [&](auto tv) {
                constexpr int NT = decltype(tv)::value;
                const TailBlock<scalar_t> a{.q = q + j0, .qstep = Ho * Wo, .k = k + j0 * s, .kstep = H * W, .Cg = Cg,
                                            .col_offset = col_offset + v0, .s = s, .out = o + v0 * Ho * Wo + j0,
                                            .ostep = Ho * Wo, .col0 = j0 * s, .W = W, .kbeg = kd, .kend = kend};
                if (!edge && s == 1)
                  tail_block<scalar_t, NT, 1>(a);
                else if (!edge && two)
                  tail_block<scalar_t, NT, 2>(a);
                else  // edges, other strides (every lane inside the row: none cleared)
                  tail_block<scalar_t, NT, -1>(a);
              });
          };
          if (zero_affine) {  // blocks over the whole row, the edge ones masked
            int64_t j0 = 0;
            for (; j0 + L <= Wo; j0 += L) block(j0);
            if (j0 < Wo) block(Wo - L);  // the last block shifted left: recomputes a few columns
            return;
          }
          int64_t j0 = ja;
          for (; j0 + L <= jb; j0 += L) block(j0);
          if (j0 < jb) block(jb - L);
        }
        for (int64_t j = 0; j < Wo; ++j) {
          if (j >= ja && j < jb) continue;
          for (int64_t v = 0; v < Kw; ++v) {
            const int64_t col = cols[v * Wo + j];
            acc_t acc = 0;
            if (col >= 0)
              for (int64_t c = 0; c < Cg; ++c)
                acc = std::fma(static_cast<acc_t>(q[c * Ho * Wo + j]), static_cast<acc_t>(k[c * H * W + col]), acc);
            o[v * Ho * Wo + j] = static_cast<scalar_t>(acc);
          }
        }
      }();
      if (!q_finite) zero_outside_columns(o, Ho * Wo, plan);  // else exactly +0 there already
    }
  });
}

// The taps of one output row in the channels-last scratch: trow[t] + tcol[j * KKp + t], the
// scratch offset of tap t of pixel j (taps outside the image and the padding taps t >= K*K
// read a zero pixel); only the blocks of 8 taps from tap ta on, up to tap tb, are computed
// (the taps before ta and from the end of the last block on read zeros only).
struct RowTaps {
  const int64_t* trow;
  const int64_t* tcol;
  int64_t KKp, ta, tb;
};

// The taps of Wo pixels of one output row, 8 at a time: each tap's NV channel vectors of the
// pixel's q (the gradient) times its input pixel's, summed over lanes; results at
// out[j * KKp + t], zeros for the taps that ta and tb leave out.
template <typename acc_t>
__attribute__((noinline)) void corr_row_cl(const acc_t* x_rows, RowTaps t, int64_t Wo, const acc_t* q, int64_t NV, acc_t* out) {
  using V = typename Vec<acc_t>::type;
  constexpr int L = Vec<acc_t>::N;
  for (int64_t j = 0; j < Wo; ++j) {
    const acc_t* qj = q + j * NV * L;
    const int64_t* tc = t.tcol + j * t.KKp;
    std::fill(out + j * t.KKp, out + j * t.KKp + t.ta, acc_t(0));
    int64_t t0 = t.ta;
    for (; t0 < t.tb; t0 += 8) {
      V a[8];
      for (int m = 0; m < 8; ++m) a[m] = V{};
      int64_t k = 0;
      for (; k + 2 <= NV; k += 2) {
        const V q0 = in_register(loadu(qj + k * L)), q1 = in_register(loadu(qj + (k + 1) * L));
        for (int m = 0; m < 8; ++m) {
          const acc_t* xp = x_rows + t.trow[t0 + m] + tc[t0 + m] + k * L;
          a[m] += q0 * loadu(xp) + q1 * loadu(xp + L);
        }
      }
      if (k < NV) {
        const V q0 = loadu(qj + k * L);
        for (int m = 0; m < 8; ++m) a[m] += q0 * loadu(x_rows + t.trow[t0 + m] + tc[t0 + m] + k * L);
      }
      lane_sums8(a, out + j * t.KKp + t0);
    }
    std::fill(out + j * t.KKp + t0, out + (j + 1) * t.KKp, acc_t(0));
  }
}

template <typename scalar_t>
at::Tensor correlate_cl(const at::Tensor& q, const at::Tensor& k, const Args& args) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int L = Vec<acc_t>::N;
  const int64_t B = args.B, C = args.C, G = args.G, Cg = args.Cg, H = args.H, W = args.W, Ho = args.Ho, Wo = args.Wo;
  const int64_t Kh = args.Kh, Kw = args.Kw, KK = args.KK, s = args.s;
  const int64_t KKp = round_up(KK + 7, 8);  // a block starting at any tap < K*K fits
  const int64_t* rows = args.plan.rows.data();
  const int64_t* cols = args.plan.cols.data();
  const auto [out, qd, kd, od] = new_output<scalar_t>(q, k, {B, G, KK, Ho, Wo});
  const int64_t ch = chunk_rows(B * G, Ho, 16), nch = ceil_div(Ho, ch);
  const int64_t max_rows_read = max_row_span(rows, Kh, Ho, ch);
  const LastRows lr(W, Cg);
  const int64_t pitch = lr.pitch, zero_row = max_rows_read * pitch;  // never written: zeros
  const std::vector<int64_t> cidx = lr.tap_columns(cols, Kw, Wo), xoff = lr.elements(max_rows_read),
                             qoff = strided(ch * Wo, Cg), roff = strided(ch * Wo, KKp);
  std::vector<int64_t> tcol(Wo * KKp, 0);  // per tap t = u * Kw + v: its column's offset
  for (int64_t j = 0; j < Wo; ++j)
    for (int64_t t = 0; t < KK; ++t) tcol[j * KKp + t] = cidx[j * Kw + t % Kw];
  auto per_thread = [&](int64_t rows_per_task, int64_t rows_read) {
    return bytes_of({(rows_read + 1) * pitch, rows_per_task * Wo * Cg, rows_per_task * Wo * KKp}, sizeof(acc_t));
  };
  const int64_t ch_max = max_chunk_rows(Ho, 16), plane = KK * Ho * Wo;
  const int64_t need = kLendThreads * per_thread(ch_max, max_row_span(rows, Kh, Ho, ch_max));
  const int64_t lent = lent_planes(B * G, plane * sizeof(scalar_t), need);
  ThreadScratch scratch(per_thread(ch, max_rows_read), reinterpret_cast<char*>(od + (B * G - lent) * plane),
                        lent * plane * sizeof(scalar_t));
  for_each_task((B * G - lent) * nch, G, nch, scratch, [&](Carver& cv, TaskRange tasks) {
    Buf<acc_t> x_rows = cv.take<acc_t>((max_rows_read + 1) * pitch), qs = cv.take<acc_t>(ch * Wo * Cg),
               result_rows = cv.take<acc_t>(ch * Wo * KKp);
    std::vector<int64_t> trow(KKp, zero_row);
    for (const Task task : tasks) {
      const int64_t b = task.batch, g = task.group, i0 = task.chunk * ch, i1 = std::min(Ho, i0 + ch);
      const auto span = row_span(rows, Kh, Ho, i0, i1);
      const int64_t rmin = span.first, rows_read = span.second;
      to_last(x_rows.data(), xoff.data(), kd + ((b * C + g * Cg) * H + rmin) * W, H * W, Cg, rows_read * W);
      to_last(qs.data(), qoff.data(), qd + (b * C + g * Cg) * Ho * Wo + i0 * Wo, Ho * Wo, Cg, (i1 - i0) * Wo);
      const bool q_finite = !args.zero_border || all_finite(qs.data(), (i1 - i0) * Wo * Cg);
      for (int64_t i = i0; i < i1; ++i) {
        int64_t ta = KK, tb = 0;  // taps of the first and past the last tap row inside the image
        for (int64_t t = 0; t < KK; ++t) {
          const int64_t r = rows[(t / Kw) * Ho + i];
          trow[t] = r >= 0 ? (r - rmin) * pitch : zero_row;
          if (r >= 0) ta = std::min(ta, t), tb = t + 1;
        }
        ta = std::min(ta, tb);
        corr_row_cl(x_rows.data(), {.trow = trow.data(), .tcol = tcol.data(), .KKp = KKp, .ta = ta, .tb = tb}, Wo,
                    qs.data() + (i - i0) * Wo * Cg, Cg / L, result_rows.data() + (i - i0) * Wo * KKp);
        // taps outside the image: 0, whatever q holds (the zero pixel times a non-finite q is not)
        if (!q_finite) {
          acc_t* res = result_rows.data() + (i - i0) * Wo * KKp;
          for (int64_t u = 0; u < Kh; ++u) {
            const bool inside = rows[u * Ho + i] >= 0;
            for (int64_t v = 0; v < Kw; ++v) {
              const int64_t a = inside ? args.plan.col_valid_begin[v] : Wo, e = inside ? args.plan.col_valid_end[v] : Wo;
              for (int64_t j = 0; j < a; ++j) res[j * KKp + u * Kw + v] = 0;
              for (int64_t j = e; j < Wo; ++j) res[j * KKp + u * Kw + v] = 0;
            }
          }
        }
      }
      from_last(od + (b * G + g) * KK * Ho * Wo + i0 * Wo, Ho * Wo, result_rows.data(), roff.data(), KK, (i1 - i0) * Wo);
    }
  });
  if (lent > 0)
    correlate_tail<scalar_t>(q, k, out, B * G - lent, B * G, Cg, args.plan);
  return out;
}

template <typename scalar_t>
at::Tensor correlate_impl(const at::Tensor& q, const at::Tensor& k, const Args& args, bool sum_batch, bool sum_space) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int L = Vec<acc_t>::N;
  const int64_t B = args.B, C = args.C, G = args.G, Cg = args.Cg, H = args.H, W = args.W, Ho = args.Ho, Wo = args.Wo;
  const int64_t Kh = args.Kh, Kw = args.Kw, KK = args.KK, s = args.s;
  // rows of at most half a vector (the column layout leaves half the lanes idle): channels-last
  if (2 * Wo <= L && Cg % L == 0 && !sum_batch && !sum_space)
    return correlate_cl<scalar_t>(q, k, args);
  // direct: q rows are read in place (one dtype, rows of a vector or more; the last block of a row
  // is shifted left to end at Wo, so no read leaves the row)
  const bool direct = std::is_same<scalar_t, acc_t>::value && Wo >= L;
  ColPlan p = make_colplan(args.plan, L, direct);
  const int64_t* rows = args.plan.rows.data();
  const int64_t nb = sum_batch ? 1 : B;
  const auto [out, qd, kd, od] = new_output<scalar_t>(q, k, {nb, G, KK, sum_space ? 1 : Ho, sum_space ? 1 : Wo});
  // rows per task: up to 16 where the packed result buffer stays within about 96 KiB (it is
  // part of the scratch the result's last planes lend), fewer rows re-copy more shared input rows
  const int64_t most = std::min<int64_t>(16, std::max<int64_t>(8, (96 << 10) / (KK * Wo * sizeof(acc_t))));
  const int64_t block_width = p.block_width, rowstride = p.s * p.phase_width;
  // packed: per-pixel results go to a per-task buffer of pitch Wo (a block's lanes past Wo land
  // on the next row, which is computed after it, or in the slack), so each tap's rows are one
  // contiguous copy out; measured faster than storing rows in place into the K*K planes. A
  // large float32 result is written with streaming stores (no read of the lines it replaces).
  const bool packed = !sum_batch && !sum_space;
  const bool stream = std::is_same<scalar_t, float>::value && out.numel() * 4 > (8 << 20);
  const bool narrow_in_place = std::is_same<scalar_t, acc_t>::value && packed && Wo < L;
  // scratch per thread for tasks of `rows_per_task` output rows: the input rows they read, two
  // rows of q (when copied), the results (packed: all of the task's; else two rows, for the
  // two-row blocks) and a batch sum's accumulators
  auto per_thread = [&](int64_t rows_per_task) {
    const int64_t rows_read = max_row_span(rows, Kh, Ho, rows_per_task);
    const int64_t tp = packed ? rows_per_task * Wo + L : block_width;
    const int64_t nacc = sum_batch && !sum_space ? KK * rows_per_task * Wo : 0;
    return bytes_of({Cg * rows_read * rowstride, direct ? 0 : 2 * Cg * block_width, KK * tp * (packed ? 1 : 2), nacc},
                    sizeof(acc_t));
  };
  // per-pixel results: the last planes lend the scratch (lent_planes; the tail sums in this
  // kernel's order, so how many it takes may depend on the thread count). Where the threads'
  // scratch needs too many planes, fewer rows per task (halved down to 2: the results do not
  // depend on the chunking) make it fit; the rows per task otherwise only trade row copies.
  int64_t ch = chunk_rows(nb * G, Ho, most), lent = 0;
  const int64_t plane = KK * Ho * Wo, nthreads = std::max<int64_t>(1, at::get_num_threads());
  for (int64_t c = ch; packed; c = std::max<int64_t>(2, (c / 2) & ~int64_t(1))) {
    lent = lent_planes(nb * G, plane * sizeof(scalar_t), nthreads * per_thread(c));
    if (lent > 0) ch = c;
    if (lent > 0 || c <= 2) break;
  }
  const int64_t nch = ceil_div(Ho, ch), ntask = nb * G * nch;
  // spatial sums: one partial per (output row, tap), reduced over the rows in a fixed order
  // afterwards (not per task: the rows per task depend on the thread count, the sums must not)
  at::Tensor part_t;  // (none otherwise: not even an element, the peak is the output's alone)
  double* part = nullptr;
  if (sum_space) {
    part_t = at::zeros({nb * G * Ho * KK}, at::TensorOptions().dtype(at::kDouble));
    part = part_t.data_ptr<double>();
  }
  const int64_t max_rows_read = max_row_span(rows, Kh, Ho, ch), cstride = max_rows_read * rowstride;
  p.plan_fill(max_rows_read);
  const int64_t nacc = sum_batch && !sum_space ? KK * ch * Wo : 0;
  const int64_t rtp = packed ? ch * Wo + L : block_width;  // tap pitch of the result rows
  ThreadScratch scratch(per_thread(ch), reinterpret_cast<char*>(od + (nb * G - lent) * plane),
                        lent * plane * sizeof(scalar_t));

  for_each_task(ntask - lent * nch, G, nch, scratch, [&](Carver& cv, TaskRange tasks) {
    Buf<acc_t> ks = cv.take<acc_t>(Cg * max_rows_read * rowstride), qs = cv.take<acc_t>(direct ? 0 : 2 * Cg * block_width),
               result_rows = cv.take<acc_t>(KK * rtp * (packed ? 1 : 2)), accb = cv.take<acc_t>(nacc);
    std::vector<int64_t> scratch_row_of_tap(2 * Kh), steps(6 * Kh), order(2 * Kh);
    std::vector<char> used(Kh);
    for (const Task task : tasks) {
      const int64_t bb = task.batch, g = task.group, i0 = task.chunk * ch, i1 = std::min(Ho, i0 + ch);
      const auto span = row_span(rows, Kh, Ho, i0, i1);
      const int64_t rmin = span.first, rows_read = span.second;
      std::fill(accb.begin(), accb.end(), acc_t(0));
      const int64_t b0 = sum_batch ? 0 : bb, b1 = sum_batch ? B : bb + 1;
      for (int64_t b = b0; b < b1; ++b) {
        if (rows_read > 0) {
          fill_rows<scalar_t, acc_t>(ks.data(), cstride, kd + (b * C + g * Cg) * H * W, Cg, H, rmin, rows_read, p);
        }
        // what comes next (the next batch element of a batch sum, else the next task): its k and
        // q rows, fetched a slice per row below
        Prefetch pfk, pfq;
        {
          int64_t nb = -1, ng = g, ni0 = i0, ni1 = i1;
          if (b + 1 < b1) {
            nb = b + 1;
          } else if (task.has_next()) {
            const Task nt = task.next();
            nb = sum_batch ? 0 : nt.batch, ng = nt.group;
            ni0 = nt.chunk * ch, ni1 = std::min(Ho, ni0 + ch);
          }
          if (nb >= 0) {
            const auto nspan = row_span(rows, Kh, Ho, ni0, ni1);
            pfk = Prefetch(kd + ((nb * C + ng * Cg) * H + nspan.first) * W, Cg, H * W, nspan.second * W);
            pfq = Prefetch(qd + ((nb * C + ng * Cg) * Ho + ni0) * Wo, Cg, Ho * Wo, (ni1 - ni0) * Wo);
          }
        }
        // a zero border's taps outside the image read the zero padding: exactly +0, unless q is
        // not finite (then zeroed below)
        bool q_finite = true;
        for (int64_t c = 0; c < Cg && q_finite && args.zero_border; ++c)
          q_finite = all_finite(qd + ((b * C + g * Cg + c) * Ho + i0) * Wo, (i1 - i0) * Wo);
        for (int64_t i = i0; i < i1;) {
          const int64_t n = i + 1 < i1 ? 2 : 1;  // output rows computed together
          for (int64_t k = 0; k < n; ++k) {
            pfk.slice(i + k - i0, i1 - i0);
            pfq.slice(i + k - i0, i1 - i0);
          }
          // q row i + k of channel c at qrow[k * q2 + c * qstep + j]; tap t of row i + k of the
          // result at rrow[k * rrow2 + t * rstep + j]
          const acc_t* qrow = qs.data();
          int64_t qstep = block_width, q2 = Cg * block_width;
          // rows under a vector (packed results) are read in place too, where a block's full
          // vector stays inside q: the lanes past Wo only reach results that are overwritten
          const bool over = !direct && narrow_in_place &&
                            ((b * C + g * Cg + Cg - 1) * Ho + i + n - 1) * Wo + L <= q.numel();
          if (direct || over) {
            qrow = reinterpret_cast<const acc_t*>(qd) + ((b * C + g * Cg) * Ho + i) * Wo;
            qstep = Ho * Wo;
            q2 = Wo;
          } else {
            for (int64_t k = 0; k < n; ++k)  // columns [Wo, block_width) stay zero
              convert_rows(qs.data() + k * q2, block_width, qd + ((b * C + g * Cg) * Ho + i + k) * Wo, Ho * Wo, Cg, Wo);
          }
          acc_t* rrow = result_rows.data() + (packed ? (i - i0) * Wo : 0);
          const int64_t rstep = rtp, rrow2 = packed ? Wo : KK * rtp;
          tap_scratch_rows(rows, Kh, Ho, i, n, rmin, scratch_row_of_tap.data());
          // (input row, tap row of row i, of row i + 1): paired where both rows read the row.
          // Blocks that overrun a packed row write into the next row's start, which must then be
          // computed later: (i, t) no later than (i + 1, t). That holds for both borders of
          // Window (rows non-decreasing in i); a geometry where it did not goes one row at a time
          const TapList r0{scratch_row_of_tap.data(), nullptr, Kh}, r1{scratch_row_of_tap.data() + Kh, nullptr, n == 2 ? Kh : 0};
          int64_t nsteps = row_steps(r0, r1, true, used.data(), steps.data());
          if (n == 2 && p.fast_end > Wo && packed && !later_rows_later(steps.data(), nsteps, Kh, order.data()))
            nsteps = row_steps(r0, r1, false, used.data(), steps.data());
          for (int64_t a = 0; a < nsteps; ++a) {
            const int64_t u0 = steps[3 * a + 1], u1 = steps[3 * a + 2];
            const acc_t* kr = ks.data() + steps[3 * a] * rowstride;
            acc_t* rb0 = rrow + u0 * Kw * rstep;
            acc_t* rb1 = rrow + rrow2 + u1 * Kw * rstep;
            const acc_t* qk = u0 >= 0 ? qrow : qrow + q2;  // a row read by one of the two only
            acc_t* rk = u0 >= 0 ? rb0 : rb1;
            const CorrBlock<acc_t> both{.ks = kr, .cstride = cstride, .qs = qrow, .qstep = qstep, .q2 = q2, .Cg = Cg, .rstep = rstep},
                one{.ks = kr, .cstride = cstride, .qs = qk, .qstep = qstep, .q2 = q2, .Cg = Cg, .rstep = rstep};
            const int64_t* tap_offset = p.tap_offset.data();
            for_blocks(p, L, [&](int64_t j0) {
              if (u0 >= 0 && u1 >= 0) {
                // taps in near-equal chunks of at most 6 (7 = 4 + 3)
                const int64_t nchunk = ceil_div(Kw, 6);
                for (int64_t q = 0, v0 = 0; q < nchunk; ++q) {
                  const int64_t v1 = (q + 1) * Kw / nchunk;
                  with_count<6>(v1 - v0, [&](auto tv) {
                    corr_block2<acc_t, decltype(tv)::value>(both, tap_offset + v0, rb0 + v0 * rstep, rb1 + v0 * rstep, j0);
                  });
                  v0 = v1;
                }
                return;
              }
              for (int64_t v0 = 0; v0 < Kw; v0 += 8)
                with_count<8>(Kw - v0, [&](auto tv) {
                  corr_block<acc_t, decltype(tv)::value>(one, tap_offset + v0, rk + v0 * rstep, j0);
                });
            });
          }
          for (int64_t k = 0; k < n; ++k) {
            const acc_t* qk = qrow + k * q2;
            acc_t* rk = rrow + k * rrow2;
            for (int64_t u = 0; u < Kh; ++u) {
              const int64_t r = scratch_row_of_tap[k * Kh + u];
              acc_t* rbu = rk + u * Kw * rstep;
              if (r < 0) {
                for (int64_t v = 0; v < Kw; ++v) std::fill(rbu + v * rstep, rbu + v * rstep + Wo, acc_t(0));
                continue;
              }
              // scalar path: columns outside the affine range (clamp-border edges)
              const acc_t* kr = ks.data() + r * rowstride;
              for (int64_t j = 0; j < Wo && !p.all_fast(); ++j) {
                if (in_fast(p, j)) continue;
                for (int64_t v = 0; v < Kw; ++v) {
                  const int64_t col = p.cols[v * Wo + j];
                  acc_t acc = 0;
                  if (col >= 0) {
                    const int64_t pc = p.pos(col);
                    for (int64_t c = 0; c < Cg; ++c) acc = std::fma(qk[c * qstep + j], kr[c * cstride + pc], acc);
                  }
                  rbu[v * rstep + j] = acc;
                }
              }
              if (!q_finite) zero_outside_columns(rbu, rstep, args.plan);
            }
            // per-pixel results stay in the packed buffer until the task's rows are done (below)
            if (sum_space) {
              double* pt = part + ((task.batch * G + g) * Ho + i + k) * KK;
              for (int64_t t = 0; t < KK; ++t) {
                double sacc = 0;
                const acc_t* r = rk + t * rstep;
                for (int64_t j = 0; j < Wo; ++j) sacc += static_cast<double>(r[j]);
                pt[t] += sacc;
              }
            } else if (sum_batch) {
              for (int64_t t = 0; t < KK; ++t) {
                acc_t* dst = accb.data() + (t * ch + (i + k - i0)) * Wo;
                const acc_t* r = rk + t * rstep;
                for (int64_t j = 0; j < Wo; ++j) dst[j] += r[j];
              }
            }
          }
          i += n;
        }
        if (packed)
          for (int64_t t = 0; t < KK; ++t) {
            scalar_t* dst = od + (((b * G + g) * KK + t) * Ho + i0) * Wo;
            const acc_t* r = result_rows.data() + t * rtp;
            const int64_t n = (i1 - i0) * Wo;
            int64_t j = 0;
#if defined(__AVX2__)
            if constexpr (std::is_same<scalar_t, float>::value) {
              if (stream) {
                float* d = reinterpret_cast<float*>(dst);
                for (; j < n && (reinterpret_cast<uintptr_t>(d + j) & 31); ++j) d[j] = r[j];
                for (; j + 8 <= n; j += 8) _mm256_stream_ps(d + j, _mm256_loadu_ps(r + j));
              }
            }
#endif
            convert(dst + j, r + j, n - j);
          }
#if defined(__AVX2__)
        if (stream) _mm_sfence();  // streaming stores are weakly ordered: drain them in this task
#endif
      }
      if (sum_batch && !sum_space) {
        for (int64_t t = 0; t < KK; ++t)
          convert_rows(od + ((g * KK + t) * Ho + i0) * Wo, Wo, accb.data() + t * ch * Wo, Wo, i1 - i0, Wo);
      }
    }
  });
  if (sum_space) {
    for (int64_t bb = 0; bb < nb; ++bb)
      for (int64_t g = 0; g < G; ++g)
        for (int64_t t = 0; t < KK; ++t) {
          double sacc = 0;
          for (int64_t i = 0; i < Ho; ++i) sacc += part[((bb * G + g) * Ho + i) * KK + t];
          od[(bb * G + g) * KK + t] = static_cast<scalar_t>(sacc);
        }
  }
  if (lent > 0)
    correlate_tail<scalar_t>(q, k, out, nb * G - lent, nb * G, Cg, args.plan);
  return out;
}

}  // namespace

at::Tensor correlate(const at::Tensor& q, const at::Tensor& k, const Plan& plan, int64_t groups, bool sum_batch,
                     bool sum_space) {
  return dispatch_floating(q.scalar_type(), [&](auto type) {
    return correlate_impl<decltype(type)>(q, k, Args(q, groups, plan), sum_batch, sum_space);
  });
}

#ifdef TOKENMIX_TEST_HOOKS
int64_t lent_planes_override(int64_t n) { return lent_override.exchange(n); }
#endif

}  // namespace tokenmix_cpu
