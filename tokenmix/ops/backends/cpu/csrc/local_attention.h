#pragma once

// The CPU kernels of tokenmix::local_attention and tokenmix::local_attention_backward (schemas
// in tokenmix/ops/library.py): fused local self-attention, flash-attention style. The scores
// and probabilities of one output row live in per-thread scratch (K*K x row width), never in
// memory of the size of the kernel.
//
// Tasks are (batch, head) pairs. A task copies the head's keys and values into the phase-split,
// zero-padded rows of the column kernels (ColPlan, fill_rows: tap v of output column j sits at
// tap_offset[v] + j) and its queries into rows padded to whole vectors, then runs its output
// rows in order:
//   forward:  S = scale * q.k_t + bias (out-of-image taps -inf), E = exp(S - max_t S),
//             (bias: the relative position table's entry and the per-pixel row_bias[a] +
//             col_bias[b] of tap t = (a, b), converted a row at a time into scratch)
//             out = sum_t E_t v_t / sum_t E_t,
//             lse = log sum_t exp(S_t)
//   backward: S and P recomputed from lse, dP_t = dout.v_t, D = dout.out, dS = P (dP - D),
//             dq = scale sum_t dS_t k_t, and dk, dv (scaled at the end) accumulated tap by tap
//             into padded rows of the task's own head, so tasks never write the same memory
//             and nothing of the size of the kernel is allocated; d row_bias[a] = sum_b dS
//             and d col_bias[b] = sum_a dS are written per output row.
// Queries and keys have Ck channels (Cgk per head), values and outputs Cv (Cgv per head).
// The vectorised loops run over output columns (a vector of 8 floats or 4 doubles); a clamp
// border's edge columns (where a tap's column is not affine) go through scalar loops over the
// plan's tables. float16 and bfloat16 are computed in float32, the statistics are float32
// (float64 for float64 inputs).
//
// This header holds what the forward (local_attention.cpp) and the backward
// (local_attention_backward.cpp) share: the vector helpers, the call's Layout, the row Kernels,
// the argument checks and the per-pixel biases.

#include "kernels.h"
#include "layout.h"
#include "plan.h"
#include "scratch.h"
#include "vec.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace tokenmix_cpu {
namespace {

// exp of a vector: exp(r) * 2^n with |r| <= ln2 / 2 and a degree-6 polynomial (relative error
// about 2e-7 in float); exactly 0 below -87.3 (so -inf, a masked tap, gives 0) and NaN for NaN.
template <typename V>
inline V vexp(V x) {
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (sizeof(x[0]) == 4 && sizeof(V) == 32) {
    const __m256 xi = (__m256)x;
    const __m256 lo = _mm256_set1_ps(-87.33f), hi = _mm256_set1_ps(88.0f);
    const __m256 below = _mm256_cmp_ps(xi, lo, _CMP_LT_OQ), nan = _mm256_cmp_ps(xi, xi, _CMP_UNORD_Q);
    __m256 xc = _mm256_max_ps(_mm256_min_ps(xi, hi), lo);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.4426950408889634f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    __m256 res = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    res = _mm256_andnot_ps(below, res);
    return (V)_mm256_blendv_ps(res, xi, nan);
  }
#endif
  V y;
  for (int l = 0; l < static_cast<int>(sizeof(V) / sizeof(x[0])); ++l) y[l] = std::exp(x[l]);
  return y;
}

// Narrow rows (7 or 14 output columns at the late SASA stages) between the tensors and the
// scratch rows: float rows go in whole vectors, the last one through an AVX-512 lane mask (no
// read or write past the row's end); other types element by element. A memcpy or a scalar loop
// per row of 7 cost about as much as a tap's multiply-adds there.
// d[k] = s[k] for k < n and 0 for n <= k < n rounded up to whole vectors (d has that room).
template <typename scalar_t, typename acc_t>
inline void load_row(acc_t* __restrict__ d, const scalar_t* __restrict__ s, int64_t n) {
#if defined(__AVX512F__) && defined(__AVX512VL__)
  if constexpr (std::is_same<scalar_t, float>::value && std::is_same<acc_t, float>::value) {
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) _mm256_storeu_ps(d + k, _mm256_loadu_ps(s + k));
    if (k < n) _mm256_storeu_ps(d + k, _mm256_maskz_loadu_ps(static_cast<__mmask8>((1u << (n - k)) - 1), s + k));
    return;
  }
#endif
  constexpr int64_t N = Vec<acc_t>::N;
  convert(d, s, n);
  for (int64_t k = n; k < (n + N - 1) / N * N; ++k) d[k] = acc_t(0);
}

// d[k] = s[k] * f for k < n, converted to the tensor's type.
template <typename scalar_t, typename acc_t>
inline void store_row(scalar_t* __restrict__ d, const acc_t* __restrict__ s, int64_t n, acc_t f) {
#if defined(__AVX512F__) && defined(__AVX512VL__)
  if constexpr (std::is_same<scalar_t, float>::value && std::is_same<acc_t, float>::value) {
    const __m256 fv = _mm256_set1_ps(f);
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) _mm256_storeu_ps(d + k, _mm256_mul_ps(_mm256_loadu_ps(s + k), fv));
    if (k < n) {
      const __mmask8 m = static_cast<__mmask8>((1u << (n - k)) - 1);
      _mm256_mask_storeu_ps(d + k, m, _mm256_mul_ps(_mm256_maskz_loadu_ps(m, s + k), fv));
    }
    return;
  }
#endif
  for (int64_t k = 0; k < n; ++k) d[k] = static_cast<scalar_t>(s[k] * f);
}

// d[2k] = e[k] * f, d[2k+1] = o[k] * f for k < n: a stride-2 row from its two phases, in blocks
// of 8 and 4 pairs (14-column rows are 7 pairs). Scaled on the way: scaling the written row in
// place read back vectors spanning several narrower stores (a store-forwarding stall each).
template <typename T>
inline void interleave2_scaled(T* __restrict__ d, const T* __restrict__ e, const T* __restrict__ o, int64_t n, T f) {
  int64_t k = 0;
#if defined(__AVX2__)
  if constexpr (std::is_same<T, float>::value) {
    const __m256 fv = _mm256_set1_ps(f);
    for (; k + 8 <= n; k += 8) {
      const __m256 a = _mm256_mul_ps(_mm256_loadu_ps(e + k), fv), b = _mm256_mul_ps(_mm256_loadu_ps(o + k), fv);
      const __m256 lo = _mm256_unpacklo_ps(a, b), hi = _mm256_unpackhi_ps(a, b);  // per 128-bit lane
      _mm256_storeu_ps(d + 2 * k, _mm256_permute2f128_ps(lo, hi, 0x20));
      _mm256_storeu_ps(d + 2 * k + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
    }
    if (k + 4 <= n) {
      const __m128 f4 = _mm_set1_ps(f);
      const __m128 a = _mm_mul_ps(_mm_loadu_ps(e + k), f4), b = _mm_mul_ps(_mm_loadu_ps(o + k), f4);
      _mm_storeu_ps(d + 2 * k, _mm_unpacklo_ps(a, b));
      _mm_storeu_ps(d + 2 * k + 4, _mm_unpackhi_ps(a, b));
      k += 4;
    }
  }
#endif
  for (; k < n; ++k) {
    d[2 * k] = e[k] * f;
    d[2 * k + 1] = o[k] * f;
  }
}

inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// The geometry of one call and the layout of a task's scratch.
struct Layout {
  const Plan& plan;
  ColPlan cp;
  int64_t B, Ck, Cv, heads, Cgk, Cgv, H, W, Ho, Wo, Kh, Kw, KK;
  int64_t rs, cs;     // input-side scratch: row stride, channel stride (H rows)
  int64_t Wb;         // output-side row width, whole vectors
  int64_t vb, ve;     // output columns [vb, ve) run in vectors (whole blocks)
  bool rel;           // a relative position table
  int64_t T, Tw;      // its size per head and row width (2Kw - 1)
  std::vector<int64_t> brow, bcol;  // table row of tap row u of output row i [u * Ho + i], column [v * Wo + j]
  std::vector<int64_t> pos;         // scratch position of input column col
  std::vector<int64_t> jlo, jhi;    // per tap column v: output columns whose tap is inside the image

  Layout(const Plan& p, int64_t B_, int64_t Ck_, int64_t Cv_, int64_t heads_, int64_t sh, int64_t dh, int64_t dw,
         int64_t ph, bool rel_, int64_t N)
      : plan(p), cp(make_colplan(p, N)), B(B_), Ck(Ck_), Cv(Cv_), heads(heads_), Cgk(Ck_ / heads_),
        Cgv(Cv_ / heads_), H(p.H), W(p.W), Ho(p.Ho), Wo(p.Wo), Kh(p.Kh), Kw(p.Kw), KK(p.Kh * p.Kw), rel(rel_) {
    cp.plan_fill(H);
    rs = cp.s * cp.phase_width;
    cs = H * rs;
    Wb = cp.block_width;
    if (p.zero_border) {
      vb = 0, ve = Wb;
    } else {
      vb = cp.fast_begin, ve = cp.fast_begin + (cp.fast_end - cp.fast_begin) / N * N;
    }
    Tw = 2 * Kw - 1, T = (2 * Kh - 1) * Tw;
    brow.resize(Kh * Ho), bcol.resize(Kw * Wo);
    const int64_t sw = p.col_stride;
    for (int64_t u = 0; u < Kh; ++u)
      for (int64_t i = 0; i < Ho; ++i) {
        const int64_t dy = p.zero_border ? u * dh - ph : p.rows[u * Ho + i] - i * sh;
        brow[u * Ho + i] = floor_div(dy, dh) + Kh - 1;
      }
    for (int64_t v = 0; v < Kw; ++v)
      for (int64_t j = 0; j < Wo; ++j) {
        const int64_t dx = p.zero_border ? p.col_offset[v] : p.cols[v * Wo + j] - j * sw;
        bcol[v * Wo + j] = floor_div(dx, dw) + Kw - 1;
      }
    pos.resize(W);
    for (int64_t col = 0; col < W; ++col) pos[col] = cp.pos(col);
    jlo.assign(Kw, 0), jhi.assign(Kw, Wo);
    for (int64_t v = 0; v < Kw; ++v) {
      int64_t lo = Wo, hi = 0;
      for (int64_t j = 0; j < Wo; ++j)
        if (p.cols[v * Wo + j] >= 0) lo = std::min(lo, j), hi = std::max(hi, j + 1);
      jlo[v] = lo, jhi[v] = std::max(lo, hi);
    }
  }
  bool vector_column(int64_t j) const { return j >= vb && j < ve; }
};

template <typename acc_t>
struct Kernels {
  using V = typename Vec<acc_t>::type;
  static constexpr int N = Vec<acc_t>::N;
  const Layout& L;
  int64_t ts;  // tap-row stride of the K*K x Wb arrays (S, P, dS): Wb, or wider rows with margins

  // d[t * Wb + j] = sum_{c < Cg} a[c * a_cs + j] * in_t(c, j) for output row i: the dot products
  // of a row of queries (or output gradients) with the keys (or values) of every tap; 0 for a
  // tap row outside the image.
  void row_dots(const acc_t* a, int64_t a_cs, const acc_t* in, int64_t Cg, int64_t i, acc_t* d) const {
    const int64_t Wb = L.Wb, Kw = L.Kw, cs = L.cs;
    const int64_t* toff = L.cp.tap_offset.data();
    for (int64_t u = 0; u < L.Kh; ++u) {
      const int64_t r = L.plan.rows[u * L.Ho + i];
      if (r < 0) {
        for (int64_t v = 0; v < Kw; ++v) std::fill(d + (u * Kw + v) * ts, d + (u * Kw + v) * ts + Wb, acc_t(0));
        continue;
      }
      const acc_t* row = in + r * L.rs;
      for (int64_t j0 = L.vb; j0 < L.ve; j0 += N) {
        for (int64_t v0 = 0; v0 < Kw; v0 += 8) {
          with_count<8>(std::min<int64_t>(8, Kw - v0), [&](auto nv) {
            constexpr int NV = decltype(nv)::value;
            V acc[NV];
            for (int n = 0; n < NV; ++n) acc[n] = V{};
            const acc_t* kb = row + j0;
            for (int64_t c = 0; c < Cg; ++c, kb += cs) {
              const V qv = in_register(loadu(a + c * a_cs + j0));
              for (int n = 0; n < NV; ++n) acc[n] = fmadd(qv, loadu(kb + toff[v0 + n]), acc[n]);
            }
            for (int n = 0; n < NV; ++n) storeu(d + (u * Kw + v0 + n) * ts + j0, acc[n]);
          });
        }
      }
      for (int64_t j = 0; j < L.Wo; ++j) {
        if (L.vector_column(j)) continue;
        for (int64_t v = 0; v < Kw; ++v) {
          const int64_t col = L.plan.cols[v * L.Wo + j];
          acc_t s = 0;
          if (col >= 0)
            for (int64_t c = 0; c < Cg; ++c) s += a[c * a_cs + j] * row[c * cs + L.pos[col]];
          d[(u * Kw + v) * ts + j] = s;
        }
      }
    }
  }

  // o[c * Wb + j] = sum_t w[t * Wb + j] * in_t(c, j), c < Cg, for output row i (taps outside
  // the image skipped: their weights are 0).
  void row_aggregate(const acc_t* w, const acc_t* in, int64_t Cg, int64_t i, acc_t* o) const {
    const int64_t Wb = L.Wb, Kw = L.Kw, cs = L.cs;
    const int64_t* toff = L.cp.tap_offset.data();
    const int64_t* rows = L.plan.rows.data();
    for (int64_t j0 = L.vb; j0 < L.ve; j0 += N) {
      channel_blocks_of<8, 4, 2, 1>(Cg, [&](auto cb, int64_t c0) {
        constexpr int CB = decltype(cb)::value;
        V acc[CB];
        for (int n = 0; n < CB; ++n) acc[n] = V{};
        for (int64_t u = 0; u < L.Kh; ++u) {
          const int64_t r = rows[u * L.Ho + i];
          if (r < 0) continue;
          const acc_t* base = in + c0 * cs + r * L.rs + j0;
          for (int64_t v = 0; v < Kw; ++v) {
            const V p = in_register(loadu(w + (u * Kw + v) * ts + j0));
            const acc_t* b = base + toff[v];
            for (int n = 0; n < CB; ++n) acc[n] = fmadd(p, loadu(b + n * cs), acc[n]);
          }
        }
        for (int n = 0; n < CB; ++n) storeu(o + (c0 + n) * Wb + j0, acc[n]);
      });
    }
    for (int64_t j = 0; j < L.Wo; ++j) {
      if (L.vector_column(j)) continue;
      for (int64_t c = 0; c < Cg; ++c) o[c * Wb + j] = 0;
      for (int64_t u = 0; u < L.Kh; ++u) {
        const int64_t r = rows[u * L.Ho + i];
        if (r < 0) continue;
        for (int64_t v = 0; v < Kw; ++v) {
          const int64_t col = L.plan.cols[v * L.Wo + j];
          if (col < 0) continue;
          const acc_t p = w[(u * Kw + v) * ts + j];
          const acc_t* b = in + r * L.rs + L.pos[col];
          for (int64_t c = 0; c < Cg; ++c) o[c * Wb + j] += p * b[c * cs];
        }
      }
    }
  }

  // in_t(c, j) += w[t * Wb + j] * a[c * a_cs + j] for output row i: the adjoint of row_aggregate,
  // into the padded rows of a task's gradient (w is 0 on taps outside the image and on the
  // columns past Wo, whose positions are padding or added 0).
  void row_scatter(const acc_t* w, const acc_t* a, int64_t a_cs, int64_t Cg, int64_t i, acc_t* in) const {
    const int64_t Wb = L.Wb, Kw = L.Kw, cs = L.cs;
    const int64_t* toff = L.cp.tap_offset.data();
    for (int64_t u = 0; u < L.Kh; ++u) {
      const int64_t r = L.plan.rows[u * L.Ho + i];
      if (r < 0) continue;
      acc_t* row = in + r * L.rs;
      for (int64_t v = 0; v < Kw; ++v) {
        const acc_t* wt = w + (u * Kw + v) * ts;
        acc_t* dst = row + toff[v];
        for (int64_t j0 = L.vb; j0 < L.ve; j0 += N) {
          const V wv = in_register(loadu(wt + j0));
          channel_blocks_of<8, 4, 2, 1>(Cg, [&](auto cb, int64_t c0) {
            constexpr int CB = decltype(cb)::value;
            V d[CB];
            for (int n = 0; n < CB; ++n) d[n] = fmadd(wv, loadu(a + (c0 + n) * a_cs + j0), loadu(dst + (c0 + n) * cs + j0));
            for (int n = 0; n < CB; ++n) storeu(dst + (c0 + n) * cs + j0, d[n]);
          });
        }
      }
      for (int64_t j = 0; j < L.Wo; ++j) {
        if (L.vector_column(j)) continue;
        for (int64_t v = 0; v < Kw; ++v) {
          const int64_t col = L.plan.cols[v * L.Wo + j];
          if (col < 0) continue;
          const acc_t wv = w[(u * Kw + v) * ts + j];
          acc_t* b = row + L.pos[col];
          for (int64_t c = 0; c < Cg; ++c) b[c * cs] += wv * a[c * a_cs + j];
        }
      }
    }
  }

  // S (raw dot products from row_dots) -> scale * S + bias, -inf on taps outside the image and
  // on the columns past Wo. table: the head's (2Kh-1) x (2Kw-1) bias, or null; rb, cb: output
  // row i's per-pixel biases of tap row u (rb[u * Wb + j]) and tap column v (cb[v * Wb + j]),
  // or null.
  void scores(acc_t* S, int64_t i, acc_t scale, const acc_t* table, const acc_t* rb, const acc_t* cb) const {
    const int64_t Wb = L.Wb, Kw = L.Kw, Wo = L.Wo;
    const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
    for (int64_t u = 0; u < L.Kh; ++u) {
      const bool row_in = L.plan.rows[u * L.Ho + i] >= 0;
      for (int64_t v = 0; v < Kw; ++v) {
        acc_t* s = S + (u * Kw + v) * ts;
        if (!row_in) {
          std::fill(s, s + Wb, ninf);
          continue;
        }
        if (table != nullptr && L.plan.zero_border) {
          // whole vectors: the columns past Wo are set to -inf below
          const V b = Vec<acc_t>::splat(table[L.brow[u * L.Ho + i] * L.Tw + L.bcol[v * Wo]]);
          const V sv = Vec<acc_t>::splat(scale);
          for (int64_t j0 = 0; j0 < Wb; j0 += N) storeu(s + j0, fmadd(loadu(s + j0), sv, b));
        } else if (table != nullptr) {
          const acc_t* trow = table + L.brow[u * L.Ho + i] * L.Tw;
          const int64_t* bc = L.bcol.data() + v * Wo;
          for (int64_t j = 0; j < Wo; ++j) s[j] = s[j] * scale + trow[bc[j]];
        } else {
          const V sv = Vec<acc_t>::splat(scale);
          for (int64_t j0 = 0; j0 < Wb; j0 += N) storeu(s + j0, loadu(s + j0) * sv);
        }
        if (rb != nullptr) {
          const acc_t* r = rb + u * Wb;
          #pragma GCC ivdep
          for (int64_t j = 0; j < Wo; ++j) s[j] += r[j];
        }
        if (cb != nullptr) {
          const acc_t* c = cb + v * Wb;
          #pragma GCC ivdep
          for (int64_t j = 0; j < Wo; ++j) s[j] += c[j];
        }
        for (int64_t j = 0; j < L.jlo[v]; ++j) s[j] = ninf;
        for (int64_t j = L.jhi[v]; j < Wb; ++j) s[j] = ninf;
      }
    }
  }

  // S -> exp(S_t - max_t S_t), the softmax before normalisation, inv[j] = 1 / sum_t of those and
  // lse[j] = log sum_t exp(S_t) (-inf, inv 0 and the exponentials 0 where every tap is -inf), for
  // all Wb columns.
  void softmax(acc_t* S, int64_t i, acc_t* lse, acc_t* inv) const {
    const int64_t Wb = L.Wb, KK = L.KK, Kw = L.Kw;
    const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
    for (int64_t j0 = 0; j0 < Wb; j0 += N) {
      V m = Vec<acc_t>::splat(ninf);
      for (int64_t t = 0; t < KK; ++t) {
        const V s = loadu(S + t * ts + j0);
        m = s > m ? s : m;
      }
      const V zero = V{};
      const V mf = m == Vec<acc_t>::splat(ninf) ? zero : m;
      V l = zero;
      for (int64_t u = 0; u < L.Kh; ++u) {
        if (L.plan.rows[u * L.Ho + i] < 0) {  // every tap -inf: exp gives 0
          for (int64_t t = u * Kw; t < (u + 1) * Kw; ++t) storeu(S + t * ts + j0, zero);
          continue;
        }
        for (int64_t t = u * Kw; t < (u + 1) * Kw; ++t) {
          const V e = vexp(loadu(S + t * ts + j0) - mf);
          storeu(S + t * ts + j0, e);
          l += e;
        }
      }
      storeu(inv + j0, l > zero ? Vec<acc_t>::splat(acc_t(1)) / l : zero);
      for (int n = 0; n < N; ++n) lse[j0 + n] = l[n] > 0 ? m[n] + std::log(l[n]) : ninf;
    }
  }

  // S -> P = exp(S - lse) (0 where lse = -inf).
  void probabilities(acc_t* S, int64_t i, const acc_t* lse) const {
    const int64_t Wb = L.Wb, Kw = L.Kw;
    const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
    for (int64_t j0 = 0; j0 < Wb; j0 += N) {
      V m = loadu(lse + j0);
      const V none = m == Vec<acc_t>::splat(ninf) ? Vec<acc_t>::splat(acc_t(1)) : V{};
      m = none != V{} ? V{} : m;
      for (int64_t u = 0; u < L.Kh; ++u) {
        const bool row_in = L.plan.rows[u * L.Ho + i] >= 0;  // else every tap -inf: P = 0
        for (int64_t t = u * Kw; t < (u + 1) * Kw; ++t) {
          V p = row_in ? vexp(loadu(S + t * ts + j0) - m) : V{};
          p = none != V{} ? V{} : p;
          storeu(S + t * ts + j0, p);
        }
      }
    }
  }
};

// ------------------------------------------------------------------------- entry points

struct Call {
  std::shared_ptr<const Plan> plan;
  int64_t sh, dh, dw, ph;
};

using OptTensor = std::optional<at::Tensor>;

Call check_call(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const OptTensor& rel_pos, int64_t heads, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                at::IntArrayRef dilation, at::IntArrayRef padding, c10::string_view border,
                const std::optional<c10::string_view>& backend, const OptTensor& row_bias,
                const OptTensor& col_bias) {
  check_backend(op, backend, "local_attention");
  const Window window = Window::from_args(kernel_size, stride, dilation, padding, border);
  check_tensor("q", q, 4, "(B, Ck, Ho, Wo)");
  check_tensor("k", k, 4, "(B, Ck, H, W)");
  check_tensor("v", v, 4, "(B, Cv, H, W)");
  TORCH_CHECK_TYPE(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
                   "q, k and v must have one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), " and ",
                   v.scalar_type());
  TORCH_CHECK_VALUE(heads >= 1, "heads must be a positive int, got ", heads);
  TORCH_CHECK_VALUE(k.size(0) == v.size(0) && k.size(2) == v.size(2) && k.size(3) == v.size(3),
                    "k and v must have one batch and size (B, _, H, W), got k ", k.sizes(), " and v ", v.sizes());
  TORCH_CHECK_VALUE(q.size(0) == k.size(0) && q.size(1) == k.size(1), "q and k must have the same (B, Ck), got q ",
                    q.sizes(), " and k ", k.sizes());
  TORCH_CHECK_VALUE(q.size(1) % heads == 0, "channels Ck=", q.size(1), " of q/k are not divisible by heads=", heads);
  TORCH_CHECK_VALUE(v.size(1) % heads == 0, "channels Cv=", v.size(1), " of v are not divisible by heads=", heads);
  Call call{plan_for(window, k.size(2), k.size(3)), window.stride[0], window.dilation[0], window.dilation[1],
            window.padding[0]};
  const Plan& p = *call.plan;
  TORCH_CHECK_VALUE(q.size(2) == p.Ho && q.size(3) == p.Wo, "q spatial size ", q.sizes().slice(2),
                    " must be the window's output size [", p.Ho, ", ", p.Wo, "] for k of size [", p.H, ", ", p.W,
                    "]");
  for (int a = 0; a < 2; ++a) {
    const OptTensor& bias = a == 0 ? row_bias : col_bias;
    if (!bias) continue;
    const char* name = a == 0 ? "row_bias" : "col_bias";
    const int64_t taps = a == 0 ? p.Kh : p.Kw;
    check_tensor(name, *bias, 5, a == 0 ? "(B, heads, Kh, Ho, Wo)" : "(B, heads, Kw, Ho, Wo)");
    check_same_dtype("q", q, name, *bias);
    TORCH_CHECK_VALUE(bias->size(0) == q.size(0) && bias->size(1) == heads && bias->size(2) == taps &&
                          bias->size(3) == p.Ho && bias->size(4) == p.Wo,
                      name, " must have shape (B, heads, ", a == 0 ? "Kh" : "Kw", ", Ho, Wo) = (", q.size(0), ", ",
                      heads, ", ", taps, ", ", p.Ho, ", ", p.Wo, "), got ", bias->sizes());
  }
  if (rel_pos) {
    check_tensor("rel_pos", *rel_pos, 3, "(heads, 2*Kh-1, 2*Kw-1)");
    TORCH_CHECK_TYPE(rel_pos->scalar_type() == q.scalar_type(), "q and rel_pos must have one dtype, got ",
                     q.scalar_type(), " and ", rel_pos->scalar_type());
    TORCH_CHECK_VALUE(rel_pos->size(0) == heads && rel_pos->size(1) == 2 * p.Kh - 1 && rel_pos->size(2) == 2 * p.Kw - 1,
                      "rel_pos must have shape (heads, 2*Kh-1, 2*Kw-1) = (", heads, ", ", 2 * p.Kh - 1, ", ",
                      2 * p.Kw - 1, "), got ", rel_pos->sizes());
    if (!p.zero_border) return call;
    for (int a = 0; a < 2; ++a) {
      const int64_t K = window.kernel_size[a], d = window.dilation[a], pd = window.padding[a];
      TORCH_CHECK_VALUE(pd % d == 0 && pd <= d * (K - 1), "rel_pos needs padding a multiple of the dilation and at most ",
                        "d*(K-1); got padding=", padding, ", dilation=", dilation, ", kernel_size=", kernel_size);
    }
  }
  return call;
}

// The per-pixel tap biases of one call: row_bias (B, heads, Kh, Ho, Wo) and col_bias (B, heads,
// Kw, Ho, Wo), either absent (null), read a row at a time into the accumulation type.
template <typename scalar_t>
struct TapBiases {
  const scalar_t *row = nullptr, *col = nullptr;
  TapBiases(const at::Tensor& row_bias, const at::Tensor& col_bias) {
    if (row_bias.defined()) row = row_bias.data_ptr<scalar_t>();
    if (col_bias.defined()) col = col_bias.data_ptr<scalar_t>();
  }
  bool any() const { return row != nullptr || col != nullptr; }
  // rb[u * Wb + j] and cb[v * Wb + j] of output row i of task (b, h) (the given ones only)
  template <typename acc_t>
  void load(const Layout& L, int64_t bh, int64_t i, acc_t* rb, acc_t* cb) const {
    if (row != nullptr)
      for (int64_t u = 0; u < L.Kh; ++u) convert(rb + u * L.Wb, row + ((bh * L.Kh + u) * L.Ho + i) * L.Wo, L.Wo);
    if (col != nullptr)
      for (int64_t v = 0; v < L.Kw; ++v) convert(cb + v * L.Wb, col + ((bh * L.Kw + v) * L.Ho + i) * L.Wo, L.Wo);
  }
};

at::Tensor contiguous_or_undefined(const OptTensor& t) { return t ? t->contiguous() : at::Tensor(); }

}  // namespace
}  // namespace tokenmix_cpu
