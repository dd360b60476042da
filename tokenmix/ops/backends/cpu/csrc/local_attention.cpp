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
//             out = sum_t E_t v_t / sum_t E_t,
//             lse = log sum_t exp(S_t)
//   backward: S and P recomputed from lse, dP_t = dout.v_t, D = dout.out, dS = P (dP - D),
//             dq = scale sum_t dS_t k_t, and dk, dv (scaled at the end) accumulated tap by tap
//             into padded rows of the task's own head, so tasks never write the same memory
//             and nothing of the size of the kernel is allocated.
// The vectorised loops run over output columns (a vector of 8 floats or 4 doubles); a clamp
// border's edge columns (where a tap's column is not affine) go through scalar loops over the
// plan's tables. float16 and bfloat16 are computed in float32, the statistics are float32
// (float64 for float64 inputs).
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

inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// The geometry of one call and the layout of a task's scratch.
struct Layout {
  const Plan& plan;
  ColPlan cp;
  int64_t B, C, heads, Cg, H, W, Ho, Wo, Kh, Kw, KK;
  int64_t rs, cs;     // input-side scratch: row stride, channel stride (H rows)
  int64_t Wb;         // output-side row width, whole vectors
  int64_t vb, ve;     // output columns [vb, ve) run in vectors (whole blocks)
  bool rel;           // a relative position table
  int64_t T, Tw;      // its size per head and row width (2Kw - 1)
  std::vector<int64_t> brow, bcol;  // table row of tap row u of output row i [u * Ho + i], column [v * Wo + j]
  std::vector<int64_t> pos;         // scratch position of input column col
  std::vector<int64_t> jlo, jhi;    // per tap column v: output columns whose tap is inside the image

  Layout(const Plan& p, int64_t B_, int64_t C_, int64_t heads_, int64_t sh, int64_t dh, int64_t dw, int64_t ph,
         bool rel_, int64_t N)
      : plan(p), cp(make_colplan(p, N)), B(B_), C(C_), heads(heads_), Cg(C_ / heads_), H(p.H), W(p.W), Ho(p.Ho),
        Wo(p.Wo), Kh(p.Kh), Kw(p.Kw), KK(p.Kh * p.Kw), rel(rel_) {
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

  // d[t * Wb + j] = sum_c a[c * a_cs + j] * in_t(c, j) for output row i: the dot products of a
  // row of queries (or output gradients) with the keys (or values) of every tap; 0 for a tap
  // row outside the image.
  void row_dots(const acc_t* a, int64_t a_cs, const acc_t* in, int64_t i, acc_t* d) const {
    const int64_t Wb = L.Wb, Kw = L.Kw, Cg = L.Cg, cs = L.cs;
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

  // o[c * Wb + j] = sum_t w[t * Wb + j] * in_t(c, j) for output row i (taps outside the image
  // skipped: their weights are 0).
  void row_aggregate(const acc_t* w, const acc_t* in, int64_t i, acc_t* o) const {
    const int64_t Wb = L.Wb, Kw = L.Kw, Cg = L.Cg, cs = L.cs;
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
  void row_scatter(const acc_t* w, const acc_t* a, int64_t a_cs, int64_t i, acc_t* in) const {
    const int64_t Wb = L.Wb, Kw = L.Kw, Cg = L.Cg, cs = L.cs;
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
  // on the columns past Wo. table: the head's (2Kh-1) x (2Kw-1) bias, or null.
  void scores(acc_t* S, int64_t i, acc_t scale, const acc_t* table) const {
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
          const acc_t b = table[L.brow[u * L.Ho + i] * L.Tw + L.bcol[v * Wo]];
          #pragma GCC ivdep
          for (int64_t j = 0; j < Wo; ++j) s[j] = s[j] * scale + b;
        } else if (table != nullptr) {
          const acc_t* trow = table + L.brow[u * L.Ho + i] * L.Tw;
          const int64_t* bc = L.bcol.data() + v * Wo;
          for (int64_t j = 0; j < Wo; ++j) s[j] = s[j] * scale + trow[bc[j]];
        } else {
          #pragma GCC ivdep
          for (int64_t j = 0; j < Wo; ++j) s[j] *= scale;
        }
        for (int64_t j = 0; j < L.jlo[v]; ++j) s[j] = ninf;
        for (int64_t j = L.jhi[v]; j < Wb; ++j) s[j] = ninf;
      }
    }
  }

  // S -> exp(S_t - max_t S_t), the softmax before normalisation, inv[j] = 1 / sum_t of those and
  // lse[j] = log sum_t exp(S_t) (-inf, inv 0 and the exponentials 0 where every tap is -inf), for
  // all Wb columns.
  void softmax(acc_t* S, acc_t* lse, acc_t* inv) const {
    const int64_t Wb = L.Wb, KK = L.KK;
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
      for (int64_t t = 0; t < KK; ++t) {
        const V e = vexp(loadu(S + t * ts + j0) - mf);
        storeu(S + t * ts + j0, e);
        l += e;
      }
      storeu(inv + j0, l > zero ? Vec<acc_t>::splat(acc_t(1)) / l : zero);
      for (int n = 0; n < N; ++n) lse[j0 + n] = l[n] > 0 ? m[n] + std::log(l[n]) : ninf;
    }
  }

  // S -> P = exp(S - lse) (0 where lse = -inf).
  void probabilities(acc_t* S, const acc_t* lse) const {
    const int64_t Wb = L.Wb, KK = L.KK;
    const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
    for (int64_t j0 = 0; j0 < Wb; j0 += N) {
      V m = loadu(lse + j0);
      const V none = m == Vec<acc_t>::splat(ninf) ? Vec<acc_t>::splat(acc_t(1)) : V{};
      m = none != V{} ? V{} : m;
      for (int64_t t = 0; t < KK; ++t) {
        V p = vexp(loadu(S + t * ts + j0) - m);
        p = none != V{} ? V{} : p;
        storeu(S + t * ts + j0, p);
      }
    }
  }
};

// ------------------------------------------------------------------------- entry points

struct Call {
  std::shared_ptr<const Plan> plan;
  int64_t sh, dh, dw, ph;
};

Call check_call(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const std::optional<at::Tensor>& rel_pos, int64_t heads, at::IntArrayRef kernel_size,
                at::IntArrayRef stride, at::IntArrayRef dilation, at::IntArrayRef padding, c10::string_view border,
                const std::optional<c10::string_view>& backend) {
  check_backend(op, backend, "local_attention");
  const Window window = Window::from_args(kernel_size, stride, dilation, padding, border);
  check_tensor("q", q, 4, "(B, C, Ho, Wo)");
  check_tensor("k", k, 4, "(B, C, H, W)");
  check_tensor("v", v, 4, "(B, C, H, W)");
  TORCH_CHECK_TYPE(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
                   "q, k and v must have one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), " and ",
                   v.scalar_type());
  TORCH_CHECK_VALUE(heads >= 1, "heads must be a positive int, got ", heads);
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), "k and v must have one shape (B, C, H, W), got k ", k.sizes(), " and v ",
                    v.sizes());
  TORCH_CHECK_VALUE(q.size(0) == k.size(0) && q.size(1) == k.size(1), "q and k must have the same (B, C), got q ",
                    q.sizes(), " and k ", k.sizes());
  TORCH_CHECK_VALUE(q.size(1) % heads == 0, "channels C=", q.size(1), " of q/k/v are not divisible by heads=", heads);
  Call call{plan_for(window, k.size(2), k.size(3)), window.stride[0], window.dilation[0], window.dilation[1],
            window.padding[0]};
  const Plan& p = *call.plan;
  TORCH_CHECK_VALUE(q.size(2) == p.Ho && q.size(3) == p.Wo, "q spatial size ", q.sizes().slice(2),
                    " must be the window's output size [", p.Ho, ", ", p.Wo, "] for k of size [", p.H, ", ", p.W,
                    "]");
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

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                const at::Tensor& table, int64_t heads, double scale,
                                                const Call& call) {
  using acc_t = at::opmath_type<scalar_t>;
  using K = Kernels<acc_t>;
  const Layout L(*call.plan, q.size(0), q.size(1), heads, call.sh, call.dh, call.dw, call.ph, table.defined(), K::N);
  auto out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({L.B, heads, L.Ho, L.Wo}, q.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  const int64_t Cg = L.Cg, HoWb = L.Ho * L.Wb;
  const int64_t need =
      bytes_of({Cg * L.cs, Cg * L.cs, Cg * HoWb, L.KK * L.Wb, Cg * L.Wb, L.Wb, L.T, L.Wb}, sizeof(acc_t));
  const ThreadScratch scratch(need);
  const scalar_t *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>();
  const scalar_t* tp = table.defined() ? table.data_ptr<scalar_t>() : nullptr;
  scalar_t* op = out.data_ptr<scalar_t>();
  acc_t* lp = lse.data_ptr<acc_t>();
  const K kern{L, L.Wb};
  for_each_task(L.B * heads, heads, 1, scratch, [&](Carver& carver, const TaskRange& tasks) {
    auto kb = carver.take<acc_t>(Cg * L.cs), vb = carver.take<acc_t>(Cg * L.cs), qb = carver.take<acc_t>(Cg * HoWb);
    auto S = carver.take<acc_t>(L.KK * L.Wb), o = carver.take<acc_t>(Cg * L.Wb), lrow = carver.take<acc_t>(L.Wb);
    auto tb = carver.take<acc_t>(L.T), irow = carver.take<acc_t>(L.Wb);
    for (const Task task : tasks) {
      const int64_t b = task.batch, h = task.group, plane = (b * L.C + h * Cg);
      fill_rows(kb.data(), L.cs, kp + plane * L.H * L.W, Cg, L.H, 0, L.H, L.cp);
      fill_rows(vb.data(), L.cs, vp + plane * L.H * L.W, Cg, L.H, 0, L.H, L.cp);
      for (int64_t c = 0; c < Cg; ++c)
        for (int64_t i = 0; i < L.Ho; ++i)
          convert(qb.data() + c * HoWb + i * L.Wb, qp + ((plane + c) * L.Ho + i) * L.Wo, L.Wo);
      if (tp != nullptr) convert(tb.data(), tp + h * L.T, L.T);
      for (int64_t i = 0; i < L.Ho; ++i) {
        kern.row_dots(qb.data() + i * L.Wb, HoWb, kb.data(), i, S.data());
        kern.scores(S.data(), i, static_cast<acc_t>(scale), tp != nullptr ? tb.data() : nullptr);
        kern.softmax(S.data(), lrow.data(), irow.data());
        kern.row_aggregate(S.data(), vb.data(), i, o.data());
        for (int64_t c = 0; c < Cg; ++c) {
          scalar_t* dst = op + ((plane + c) * L.Ho + i) * L.Wo;
          const acc_t* src = o.data() + c * L.Wb;
          #pragma GCC ivdep
          for (int64_t j = 0; j < L.Wo; ++j) dst[j] = static_cast<scalar_t>(src[j] * irow[j]);
        }
        std::memcpy(lp + ((b * heads + h) * L.Ho + i) * L.Wo, lrow.data(), L.Wo * sizeof(acc_t));
      }
    }
  });
  return {out, lse};
}

// The zero border's dk and dv, input row by input row: row r gathers, at each scratch position
// (phase f, index p) of its phase-split row, sum over its readers (u, i) and over the taps v of
// phase f of w_i[u, v][p - e_v] * a_i[p - e_v] (e_v: the tap's index shift), from the last R
// output rows' weights (a ring) and the output-side rows a (queries or output gradients) laid
// out with M zero columns on the left and zeros past Wb, so every shifted load is plain.
// Accumulated in registers: no read-modify-write of the gradient, no row of it in scratch.
struct Gather {
  int64_t M, Wm, R;                        // left margin, row width, ring rows
  std::vector<int64_t> last;               // last reader (output row) of input row r, -1: none
  std::vector<std::vector<int64_t>> emit;  // input rows complete after output row i
  std::vector<std::vector<std::pair<int64_t, int64_t>>> phase_taps;  // per phase: (v, e_v)
  Gather(const Layout& L, int64_t N) {
    const ColPlan& cp = L.cp;
    int64_t max_shift = 0;
    phase_taps.resize(cp.s);
    for (int64_t v = 0; v < L.Kw; ++v) {
      const int64_t f = cp.tap_offset[v] / cp.phase_width, e = cp.tap_offset[v] % cp.phase_width;
      phase_taps[f].emplace_back(v, e);
      max_shift = std::max(max_shift, e);
    }
    M = max_shift;
    Wm = M + std::max(L.Wb, cp.phase_width + N);
    last.assign(L.H, -1);
    R = 1;
    const auto& rb = L.plan.row_readers_begin;
    const auto& rr = L.plan.row_readers;
    emit.resize(L.Ho);
    for (int64_t r = 0; r < L.H; ++r) {
      int64_t lo = L.Ho, hi = -1;
      for (int64_t a = rb[r]; a < rb[r + 1]; ++a) lo = std::min(lo, rr[2 * a + 1]), hi = std::max(hi, rr[2 * a + 1]);
      if (hi < 0) continue;
      last[r] = hi;
      emit[hi].push_back(r);
      R = std::max(R, hi - lo + 1);
    }
  }
};

template <typename acc_t>
void gather_row(const Layout& L, const Gather& G, const acc_t* ring, const acc_t* a, int64_t a_cs, int64_t r,
                acc_t* rowbuf, int64_t rb_cs) {
  using V = typename Vec<acc_t>::type;
  constexpr int N = Vec<acc_t>::N;
  const int64_t pw = L.cp.phase_width, KKWm = L.KK * G.Wm;
  const auto& rb = L.plan.row_readers_begin;
  const int64_t* rd = L.plan.row_readers.data();
  const int64_t a0 = rb[r], a1 = rb[r + 1];
  for (int64_t f = 0; f < L.cp.s; ++f) {
    const auto& taps = G.phase_taps[f];
    // the image columns of phase f: indices [first, first + count), in blocks of N (the last
    // one shifted left to end there: it stores what an earlier block stored)
    const int64_t first = L.cp.dst0[f] - f * pw, count = L.cp.cnt[f];
    if (count <= 0) continue;
    for (int64_t b0 = 0; b0 < count; b0 += N) {
      const int64_t p0 = first + std::max<int64_t>(0, std::min(b0, count - N));
      channel_blocks_of<8, 4, 2, 1>(L.Cg, [&](auto cb, int64_t c0) {
        constexpr int CB = decltype(cb)::value;
        V acc[CB];
        for (int n = 0; n < CB; ++n) acc[n] = V{};
        for (int64_t e = a0; e < a1; ++e) {
          const int64_t u = rd[2 * e], i = rd[2 * e + 1];
          const acc_t* wrow = ring + (i % G.R) * KKWm + u * L.Kw * G.Wm + G.M + p0;
          const acc_t* arow = a + c0 * a_cs + i * G.Wm + G.M + p0;
          for (const auto& [v, sh] : taps) {
            const V w = in_register(loadu(wrow + v * G.Wm - sh));
            for (int n = 0; n < CB; ++n) acc[n] = fmadd(w, loadu(arow + n * a_cs - sh), acc[n]);
          }
        }
        for (int n = 0; n < CB; ++n) storeu(rowbuf + (c0 + n) * rb_cs + f * pw + p0, acc[n]);
      });
    }
  }
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& go, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& table,
    const at::Tensor& out, const at::Tensor& lse, int64_t heads, double scale, const Call& call) {
  using acc_t = at::opmath_type<scalar_t>;
  using K = Kernels<acc_t>;
  using V = typename K::V;
  constexpr int N = K::N;
  const Layout L(*call.plan, q.size(0), q.size(1), heads, call.sh, call.dh, call.dw, call.ph, table.defined(), N);
  const bool gather = L.plan.zero_border;
  const Gather G(L, N);
  auto dq = at::empty(q.sizes(), q.options()), dk = at::empty(k.sizes(), k.options());
  auto dv = at::empty(v.sizes(), v.options());
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  at::Tensor drel_parts = table.defined() ? at::empty({L.B, heads, L.T}, q.options().dtype(acc_type)) : at::Tensor();
  const int64_t Cg = L.Cg, Wb = L.Wb, Wm = G.Wm, HoWm = L.Ho * Wm, KK = L.KK;
  const int64_t rb_cs = L.cp.s * L.cp.phase_width + N;  // a gathered row per channel (gather) ...
  const int64_t grad_rows = gather ? 0 : Cg * L.cs;     // ... or the task's whole padded gradients (scatter)
  const int64_t ring = gather ? G.R * KK * Wm : 0;
  const int64_t need = bytes_of({Cg * L.cs, Cg * L.cs, grad_rows, grad_rows, Cg * HoWm, Cg * HoWm, gather ? 0 : KK * Wb,
                                 gather ? 0 : KK * Wb,
                                 ring, ring, Cg * Wb, 2 * Wb, 2 * L.T, gather ? 2 * Cg * rb_cs : 0},
                                sizeof(acc_t));
  const ThreadScratch scratch(need);
  const scalar_t *gp = go.data_ptr<scalar_t>(), *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>();
  const scalar_t *vp = v.data_ptr<scalar_t>(), *outp = out.data_ptr<scalar_t>();
  const scalar_t* tp = table.defined() ? table.data_ptr<scalar_t>() : nullptr;
  const acc_t* lp = lse.data_ptr<acc_t>();
  scalar_t *dqp = dq.data_ptr<scalar_t>(), *dkp = dk.data_ptr<scalar_t>(), *dvp = dv.data_ptr<scalar_t>();
  acc_t* drp = table.defined() ? drel_parts.data_ptr<acc_t>() : nullptr;
  const acc_t sc = static_cast<acc_t>(scale);
  const K kern{L, gather ? G.Wm : L.Wb};
  for_each_task(L.B * heads, heads, 1, scratch, [&](Carver& carver, const TaskRange& tasks) {
    auto kb = carver.take<acc_t>(Cg * L.cs), vb = carver.take<acc_t>(Cg * L.cs);
    auto dkb = carver.take<acc_t>(grad_rows), dvb = carver.take<acc_t>(grad_rows);
    auto qb = carver.take<acc_t>(Cg * HoWm), gb = carver.take<acc_t>(Cg * HoWm);
    auto S = carver.take<acc_t>(gather ? 0 : KK * Wb), dP = carver.take<acc_t>(gather ? 0 : KK * Wb);
    auto pring = carver.take<acc_t>(ring), sring = carver.take<acc_t>(ring);
    auto o = carver.take<acc_t>(Cg * Wb);
    auto lrow = carver.take<acc_t>(2 * Wb);
    auto tb = carver.take<acc_t>(2 * L.T);
    auto rowbuf = carver.take<acc_t>(gather ? 2 * Cg * rb_cs : 0);
    acc_t* D = lrow.data() + Wb;
    acc_t* drel = tb.data() + L.T;
    // input row r of channel c of the task's plane: dk (scaled) and dv from scratch rows whose
    // column col sits at pos[col]
    auto write_rows = [&](int64_t plane, int64_t r, const acc_t* sk, const acc_t* sv, int64_t cstride) {
      for (int64_t c = 0; c < Cg; ++c) {
        scalar_t* ok = dkp + ((plane + c) * L.H + r) * L.W;
        scalar_t* ov = dvp + ((plane + c) * L.H + r) * L.W;
        const acc_t *k1 = sk + c * cstride, *v1 = sv + c * cstride;
        if (L.cp.s == 1) {
          const int64_t p0 = L.pos[0];
#pragma GCC ivdep
          for (int64_t col = 0; col < L.W; ++col) {
            ok[col] = static_cast<scalar_t>(k1[p0 + col] * sc);
            ov[col] = static_cast<scalar_t>(v1[p0 + col]);
          }
        } else {
          for (int64_t col = 0; col < L.W; ++col) {
            ok[col] = static_cast<scalar_t>(k1[L.pos[col]] * sc);
            ov[col] = static_cast<scalar_t>(v1[L.pos[col]]);
          }
        }
      }
    };
    for (const Task task : tasks) {
      const int64_t b = task.batch, h = task.group, plane = (b * L.C + h * Cg);
      fill_rows(kb.data(), L.cs, kp + plane * L.H * L.W, Cg, L.H, 0, L.H, L.cp);
      fill_rows(vb.data(), L.cs, vp + plane * L.H * L.W, Cg, L.H, 0, L.H, L.cp);
      if (!gather) {
        std::fill(dkb.begin(), dkb.end(), acc_t(0));
        std::fill(dvb.begin(), dvb.end(), acc_t(0));
      }
      for (int64_t c = 0; c < Cg; ++c)
        for (int64_t i = 0; i < L.Ho; ++i) {
          convert(qb.data() + c * HoWm + i * Wm + G.M, qp + ((plane + c) * L.Ho + i) * L.Wo, L.Wo);
          convert(gb.data() + c * HoWm + i * Wm + G.M, gp + ((plane + c) * L.Ho + i) * L.Wo, L.Wo);
        }
      if (tp != nullptr) {
        convert(tb.data(), tp + h * L.T, L.T);
        std::fill(drel, drel + L.T, acc_t(0));
      }
      for (int64_t i = 0; i < L.Ho; ++i) {
        const acc_t* qrow = qb.data() + i * Wm + G.M;
        const acc_t* grow = gb.data() + i * Wm + G.M;
        // P and dS, tap rows kern.ts apart: straight into the ring of the last R output rows
        // (gather) or into S and dP
        acc_t* Pp = gather ? pring.data() + (i % G.R) * KK * Wm + G.M : S.data();
        acc_t* dSp = gather ? sring.data() + (i % G.R) * KK * Wm + G.M : dP.data();
        const int64_t ts = kern.ts;
        // P from the saved log-sum-exp
        kern.row_dots(qrow, HoWm, kb.data(), i, Pp);
        kern.scores(Pp, i, sc, tp != nullptr ? tb.data() : nullptr);
        std::memcpy(lrow.data(), lp + ((b * heads + h) * L.Ho + i) * L.Wo, L.Wo * sizeof(acc_t));
        std::fill(lrow.data() + L.Wo, lrow.data() + Wb, -std::numeric_limits<acc_t>::infinity());
        kern.probabilities(Pp, lrow.data());
        // dP and D = dout . out
        kern.row_dots(grow, HoWm, vb.data(), i, dSp);
        std::fill(D, D + Wb, acc_t(0));
        for (int64_t c = 0; c < Cg; ++c) {
          const acc_t* g = grow + c * HoWm;
          const scalar_t* orow = outp + ((plane + c) * L.Ho + i) * L.Wo;
          #pragma GCC ivdep
          for (int64_t j = 0; j < L.Wo; ++j) D[j] += g[j] * static_cast<acc_t>(orow[j]);
        }
        // dS = P (dP - D), 0 where P is 0 (taps outside the image, columns past Wo)
        for (int64_t t = 0; t < KK; ++t)
          for (int64_t j0 = 0; j0 < Wb; j0 += N) {
            const V p = loadu(Pp + t * ts + j0);
            const V ds = p * (loadu(dSp + t * ts + j0) - loadu(D + j0));
            storeu(dSp + t * ts + j0, p == V{} ? V{} : ds);
          }
        if (tp != nullptr) {
          for (int64_t u = 0; u < L.Kh; ++u) {
            if (L.plan.rows[u * L.Ho + i] < 0) continue;
            acc_t* trow = drel + L.brow[u * L.Ho + i] * L.Tw;
            for (int64_t v = 0; v < L.Kw; ++v) {
              const acc_t* ds = dSp + (u * L.Kw + v) * ts;
              const int64_t* bc = L.bcol.data() + v * L.Wo;
              if (L.plan.zero_border) {  // one table entry per tap; dS is 0 past Wo
                V sum{};
                for (int64_t j0 = 0; j0 < Wb; j0 += N) sum += loadu(ds + j0);
                acc_t total = 0;
                for (int n = 0; n < N; ++n) total += sum[n];
                trow[bc[0]] += total;
              } else {
                for (int64_t j = 0; j < L.Wo; ++j) trow[bc[j]] += ds[j];
              }
            }
          }
        }
        // dq (scaled)
        kern.row_aggregate(dSp, kb.data(), i, o.data());
        for (int64_t c = 0; c < Cg; ++c) {
          scalar_t* dst = dqp + ((plane + c) * L.Ho + i) * L.Wo;
          const acc_t* src = o.data() + c * Wb;
          #pragma GCC ivdep
          for (int64_t j = 0; j < L.Wo; ++j) dst[j] = static_cast<scalar_t>(src[j] * sc);
        }
        if (!gather) {  // the scatters into dk (scaled at the end) and dv
          kern.row_scatter(dSp, qrow, HoWm, i, dkb.data());
          kern.row_scatter(Pp, grow, HoWm, i, dvb.data());
          continue;
        }
        // the input rows whose readers are all done
        for (const int64_t r : G.emit[i]) {
          acc_t *rk = rowbuf.data(), *rv = rowbuf.data() + Cg * rb_cs;
          gather_row(L, G, sring.data(), qb.data(), HoWm, r, rk, rb_cs);
          gather_row(L, G, pring.data(), gb.data(), HoWm, r, rv, rb_cs);
          write_rows(plane, r, rk, rv, rb_cs);
        }
      }
      if (gather) {
        for (int64_t r = 0; r < L.H; ++r) {
          if (G.last[r] >= 0) continue;  // read by no tap: zero gradients
          for (int64_t c = 0; c < Cg; ++c) {
            std::fill(dkp + ((plane + c) * L.H + r) * L.W, dkp + ((plane + c) * L.H + r + 1) * L.W, scalar_t(0));
            std::fill(dvp + ((plane + c) * L.H + r) * L.W, dvp + ((plane + c) * L.H + r + 1) * L.W, scalar_t(0));
          }
        }
      } else {
        for (int64_t r = 0; r < L.H; ++r) write_rows(plane, r, dkb.data() + r * L.rs, dvb.data() + r * L.rs, L.cs);
      }
      if (tp != nullptr) std::memcpy(drp + (b * heads + h) * L.T, drel, L.T * sizeof(acc_t));
    }
  });
  at::Tensor drel;
  if (table.defined())
    drel = drel_parts.sum(0).view(table.sizes()).to(table.scalar_type());
  else
    drel = at::empty({0}, q.options());
  return {dq, dk, dv, drel};
}

std::tuple<at::Tensor, at::Tensor> local_attention_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const std::optional<at::Tensor>& rel_pos, int64_t heads,
                                                      double scale, at::IntArrayRef kernel_size,
                                                      at::IntArrayRef stride, at::IntArrayRef dilation,
                                                      at::IntArrayRef padding, c10::string_view border,
                                                      std::optional<c10::string_view> backend) {
  const Call call =
      check_call("local_attention", q, k, v, rel_pos, heads, kernel_size, stride, dilation, padding, border, backend);
  const at::Tensor table = rel_pos ? rel_pos->contiguous() : at::Tensor();
  std::tuple<at::Tensor, at::Tensor> r;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "local_attention", [&] {
    r = forward_impl<scalar_t>(q.contiguous(), k.contiguous(), v.contiguous(), table, heads, scale, call);
  });
  return r;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> local_attention_backward_op(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& rel_pos, const at::Tensor& out, const at::Tensor& lse, int64_t heads,
    double scale, at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef dilation,
    at::IntArrayRef padding, c10::string_view border, std::optional<c10::string_view> backend) {
  const Call call = check_call("local_attention_backward", q, k, v, rel_pos, heads, kernel_size, stride, dilation,
                               padding, border, backend);
  check_tensor("grad_out", grad_out, 4, "(B, C, Ho, Wo)");
  check_tensor("out", out, 4, "(B, C, Ho, Wo)");
  TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(),
                    "grad_out and out must have the shape of q ", q.sizes(), ", got ", grad_out.sizes(), " and ",
                    out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
                   "grad_out and out must have the dtype of q (", q.scalar_type(), "), got ", grad_out.scalar_type(),
                   " and ", out.scalar_type());
  const auto stats = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_VALUE(lse.dim() == 4 && lse.size(0) == q.size(0) && lse.size(1) == heads && lse.size(2) == q.size(2) &&
                        lse.size(3) == q.size(3) && lse.scalar_type() == stats,
                    "lse must be (B, heads, Ho, Wo) = (", q.size(0), ", ", heads, ", ", q.size(2), ", ", q.size(3),
                    ") of dtype ", stats, ", got ", lse.sizes(), " of dtype ", lse.scalar_type());
  const at::Tensor table = rel_pos ? rel_pos->contiguous() : at::Tensor();
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> r;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "local_attention_backward", [&] {
    r = backward_impl<scalar_t>(grad_out.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), table,
                                out.contiguous(), lse.contiguous(), heads, scale, call);
  });
  return r;
}

}  // namespace
}  // namespace tokenmix_cpu

#ifndef TOKENMIX_TEST_HOOKS
TORCH_LIBRARY_IMPL(tokenmix, CPU, m) {
  m.impl("local_attention", TORCH_FN(tokenmix_cpu::local_attention_op));
  m.impl("local_attention_backward", TORCH_FN(tokenmix_cpu::local_attention_backward_op));
}
#endif
