// The CPU kernel of tokenmix::local_attention_backward: the scores recomputed row by row from
// the log-sum-exp, dk and dv gathered into the task's own rows (local_attention.h describes
// the op and holds the parts the forward shares).

#include "local_attention.h"

#include <ATen/core/Tensor.h>
#include <torch/library.h>

namespace tokenmix_cpu {
namespace {

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
void gather_row(const Layout& L, const Gather& G, const acc_t* ring, const acc_t* a, int64_t a_cs, int64_t Cg,
                int64_t r, acc_t* rowbuf, int64_t rb_cs) {
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
      channel_blocks_of<8, 4, 2, 1>(Cg, [&](auto cb, int64_t c0) {
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
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& go, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& table,
    const at::Tensor& row_bias, const at::Tensor& col_bias, const at::Tensor& out, const at::Tensor& lse,
    int64_t heads, double scale, const Call& call) {
  using acc_t = at::opmath_type<scalar_t>;
  using K = Kernels<acc_t>;
  using V = typename K::V;
  constexpr int N = K::N;
  const Layout L(*call.plan, q.size(0), q.size(1), v.size(1), heads, call.sh, call.dh, call.dw, call.ph,
                 table.defined(), N);
  const bool gather = L.plan.zero_border;
  const Gather G(L, N);
  auto dq = at::empty(q.sizes(), q.options()), dk = at::empty(k.sizes(), k.options());
  auto dv = at::empty(v.sizes(), v.options());
  const TapBiases<scalar_t> tap(row_bias, col_bias);
  auto drow = row_bias.defined() ? at::empty(row_bias.sizes(), q.options()) : at::empty({0}, q.options());
  auto dcol = col_bias.defined() ? at::empty(col_bias.sizes(), q.options()) : at::empty({0}, q.options());
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  at::Tensor drel_parts = table.defined() ? at::empty({L.B, heads, L.T}, q.options().dtype(acc_type)) : at::Tensor();
  const int64_t Cgk = L.Cgk, Cgv = L.Cgv, Wb = L.Wb, Wm = G.Wm, HoWm = L.Ho * Wm, KK = L.KK;
  const int64_t rb_cs = L.cp.s * L.cp.phase_width + N;  // a gathered row per channel (gather) ...
  const int64_t kgrad_rows = gather ? 0 : Cgk * L.cs;   // ... or the task's whole padded gradients (scatter)
  const int64_t vgrad_rows = gather ? 0 : Cgv * L.cs;
  const int64_t ring = gather ? G.R * KK * Wm : 0;
  const int64_t rbn = tap.row != nullptr ? L.Kh * Wb : 0, cbn = tap.col != nullptr ? L.Kw * Wb : 0;
  // the zero border's rel_pos gradient: one table entry per tap, its sum over the task's
  // output rows kept as a vector per tap and added up across lanes once per task
  const int64_t HoWo = L.Ho * L.Wo;
  const int64_t tsum = table.defined() && L.plan.zero_border ? KK * N : 0;
  const int64_t need = bytes_of({Cgk * L.cs, Cgv * L.cs, kgrad_rows, vgrad_rows, Cgk * HoWm, Cgv * HoWm,
                                 gather ? 0 : KK * Wb, gather ? 0 : KK * Wb, ring, ring, std::max(Cgk, Cgv) * Wb,
                                 Wb, 2 * L.T, gather ? (Cgk + Cgv) * rb_cs : 0, rbn, cbn, tsum, HoWo + Wb},
                                sizeof(acc_t));
  const ThreadScratch scratch(need);
  const scalar_t *gp = go.data_ptr<scalar_t>(), *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>();
  const scalar_t *vp = v.data_ptr<scalar_t>(), *outp = out.data_ptr<scalar_t>();
  const scalar_t* tp = table.defined() ? table.data_ptr<scalar_t>() : nullptr;
  const acc_t* lp = lse.data_ptr<acc_t>();
  scalar_t *dqp = dq.data_ptr<scalar_t>(), *dkp = dk.data_ptr<scalar_t>(), *dvp = dv.data_ptr<scalar_t>();
  scalar_t* drowp = row_bias.defined() ? drow.data_ptr<scalar_t>() : nullptr;
  scalar_t* dcolp = col_bias.defined() ? dcol.data_ptr<scalar_t>() : nullptr;
  acc_t* drp = table.defined() ? drel_parts.data_ptr<acc_t>() : nullptr;
  const acc_t sc = static_cast<acc_t>(scale);
  const K kern{L, gather ? G.Wm : L.Wb};
  for_each_task(L.B * heads, heads, 1, scratch, [&](Carver& carver, const TaskRange& tasks) {
    auto kb = carver.take<acc_t>(Cgk * L.cs), vb = carver.take<acc_t>(Cgv * L.cs);
    auto dkb = carver.take<acc_t>(kgrad_rows), dvb = carver.take<acc_t>(vgrad_rows);
    auto qb = carver.take<acc_t>(Cgk * HoWm), gb = carver.take<acc_t>(Cgv * HoWm);
    auto S = carver.take<acc_t>(gather ? 0 : KK * Wb), dP = carver.take<acc_t>(gather ? 0 : KK * Wb);
    auto pring = carver.take<acc_t>(ring), sring = carver.take<acc_t>(ring);
    auto o = carver.take<acc_t>(std::max(Cgk, Cgv) * Wb);
    auto lrow = carver.take<acc_t>(Wb);
    auto tb = carver.take<acc_t>(2 * L.T);
    auto rowbuf = carver.take<acc_t>(gather ? (Cgk + Cgv) * rb_cs : 0);
    auto rb = carver.take<acc_t>(rbn), cb = carver.take<acc_t>(cbn);
    auto tacc = carver.take<acc_t>(tsum), Dt = carver.take<acc_t>(HoWo + Wb);
    const acc_t* rbp = tap.row != nullptr ? rb.data() : nullptr;
    const acc_t* cbp = tap.col != nullptr ? cb.data() : nullptr;
    acc_t* drel = tb.data() + L.T;
    // input row r of the Cg channels of the task's plane of dst (dk, scaled by f = scale, or dv,
    // f = 1) from scratch rows whose column col sits at pos[col]
    auto write_rows = [&](scalar_t* dst, int64_t plane, int64_t Cg, int64_t r, const acc_t* src, int64_t cstride,
                          acc_t f) {
      for (int64_t c = 0; c < Cg; ++c) {
        scalar_t* o1 = dst + ((plane + c) * L.H + r) * L.W;
        const acc_t* s1 = src + c * cstride;
        if (L.cp.s == 1) {
          store_row(o1, s1 + L.pos[0], L.W, f);
        } else if (L.cp.s == 2 && std::is_same<scalar_t, acc_t>::value) {
          // column 2m + g (g = 0, 1) sits at index m + (pad + g) / 2 of phase (pad + g) % 2
          const int64_t pad = L.cp.pad_cols, pw = L.cp.phase_width;
          const acc_t* pe = s1 + (pad % 2) * pw + pad / 2;
          const acc_t* po = s1 + ((pad + 1) % 2) * pw + (pad + 1) / 2;
          acc_t* d = reinterpret_cast<acc_t*>(o1);
          interleave2_scaled(d, pe, po, L.W / 2, f);
          if (L.W % 2) d[L.W - 1] = pe[L.W / 2] * f;
        } else {
          for (int64_t col = 0; col < L.W; ++col) o1[col] = static_cast<scalar_t>(s1[L.pos[col]] * f);
        }
      }
    };
    for (const Task task : tasks) {
      const int64_t b = task.batch, h = task.group, kplane = b * L.Ck + h * Cgk, vplane = b * L.Cv + h * Cgv;
      fill_rows(kb.data(), L.cs, kp + kplane * L.H * L.W, Cgk, L.H, 0, L.H, L.cp);
      fill_rows(vb.data(), L.cs, vp + vplane * L.H * L.W, Cgv, L.H, 0, L.H, L.cp);
      if (!gather) {
        std::fill(dkb.begin(), dkb.end(), acc_t(0));
        std::fill(dvb.begin(), dvb.end(), acc_t(0));
      }
      // (plane by plane, row by row: the tensors read in order)
      for (int64_t c = 0; c < Cgk; ++c)
        for (int64_t i = 0; i < L.Ho; ++i)
          load_row(qb.data() + c * HoWm + i * Wm + G.M, qp + ((kplane + c) * L.Ho + i) * L.Wo, L.Wo);
      for (int64_t c = 0; c < Cgv; ++c)
        for (int64_t i = 0; i < L.Ho; ++i)
          load_row(gb.data() + c * HoWm + i * Wm + G.M, gp + ((vplane + c) * L.Ho + i) * L.Wo, L.Wo);
      // D = dout . out of every output pixel of the task, in the order of the planes; row i's
      // at Dt + i * Wo (the lanes past Wo read the next row's or 0: D is only used where P > 0)
      std::fill(Dt.begin(), Dt.end(), acc_t(0));
      for (int64_t c = 0; c < Cgv; ++c) {
        const scalar_t* g1 = gp + (vplane + c) * HoWo;
        const scalar_t* o1 = outp + (vplane + c) * HoWo;
        acc_t* d = Dt.data();
        #pragma GCC ivdep
        for (int64_t k = 0; k < HoWo; ++k) d[k] += static_cast<acc_t>(g1[k]) * static_cast<acc_t>(o1[k]);
      }
      if (tp != nullptr) {
        convert(tb.data(), tp + h * L.T, L.T);
        std::fill(drel, drel + L.T, acc_t(0));
        std::fill(tacc.begin(), tacc.end(), acc_t(0));
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
        kern.row_dots(qrow, HoWm, kb.data(), Cgk, i, Pp);
        tap.load(L, b * heads + h, i, rb.data(), cb.data());
        kern.scores(Pp, i, sc, tp != nullptr ? tb.data() : nullptr, rbp, cbp);
        std::memcpy(lrow.data(), lp + ((b * heads + h) * L.Ho + i) * L.Wo, L.Wo * sizeof(acc_t));
        std::fill(lrow.data() + L.Wo, lrow.data() + Wb, -std::numeric_limits<acc_t>::infinity());
        kern.probabilities(Pp, i, lrow.data());
        // dP and D = dout . out
        kern.row_dots(grow, HoWm, vb.data(), Cgv, i, dSp);
        const acc_t* D = Dt.data() + i * L.Wo;
        // dS = P (dP - D), 0 where P is 0 (taps outside the image, columns past Wo)
        for (int64_t t = 0; t < KK; ++t)
          for (int64_t j0 = 0; j0 < Wb; j0 += N) {
            const V p = loadu(Pp + t * ts + j0);
            const V ds = p * (loadu(dSp + t * ts + j0) - loadu(D + j0));
            storeu(dSp + t * ts + j0, p == V{} ? V{} : ds);
          }
        if (tp != nullptr && L.plan.zero_border) {  // dS is 0 on taps outside the image and past Wo
          for (int64_t u = 0; u < L.Kh; ++u) {
            if (L.plan.rows[u * L.Ho + i] < 0) continue;
            for (int64_t t = u * L.Kw; t < (u + 1) * L.Kw; ++t) {
              V sum = loadu(tacc.data() + t * N);
              for (int64_t j0 = 0; j0 < Wb; j0 += N) sum += loadu(dSp + t * ts + j0);
              storeu(tacc.data() + t * N, sum);
            }
          }
        } else if (tp != nullptr) {
          for (int64_t u = 0; u < L.Kh; ++u) {
            if (L.plan.rows[u * L.Ho + i] < 0) continue;
            acc_t* trow = drel + L.brow[u * L.Ho + i] * L.Tw;
            for (int64_t v = 0; v < L.Kw; ++v) {
              const acc_t* ds = dSp + (u * L.Kw + v) * ts;
              const int64_t* bc = L.bcol.data() + v * L.Wo;
              for (int64_t j = 0; j < L.Wo; ++j) trow[bc[j]] += ds[j];
            }
          }
        }
        // d row_bias[u] = sum_v dS[u, v], d col_bias[v] = sum_u dS[u, v], through a row of o:
        // out[n] (n < count) sums the taps n * n_step + m * m_step, m < terms
        auto tap_sums = [&](scalar_t* out, int64_t count, int64_t n_step, int64_t terms, int64_t m_step) {
          for (int64_t n = 0; n < count; ++n) {
            acc_t* sum = o.data();
            std::fill(sum, sum + L.Wo, acc_t(0));
            for (int64_t m = 0; m < terms; ++m) {
              const acc_t* ds = dSp + (n * n_step + m * m_step) * ts;
              #pragma GCC ivdep
              for (int64_t j = 0; j < L.Wo; ++j) sum[j] += ds[j];
            }
            convert(out + (((b * heads + h) * count + n) * L.Ho + i) * L.Wo, sum, L.Wo);
          }
        };
        if (drowp != nullptr) tap_sums(drowp, L.Kh, L.Kw, L.Kw, 1);
        if (dcolp != nullptr) tap_sums(dcolp, L.Kw, 1, L.Kh, L.Kw);
        // dq (scaled)
        kern.row_aggregate(dSp, kb.data(), Cgk, i, o.data());
        for (int64_t c = 0; c < Cgk; ++c) store_row(dqp + ((kplane + c) * L.Ho + i) * L.Wo, o.data() + c * Wb, L.Wo, sc);
        if (!gather) {  // the scatters into dk (scaled at the end) and dv
          kern.row_scatter(dSp, qrow, HoWm, Cgk, i, dkb.data());
          kern.row_scatter(Pp, grow, HoWm, Cgv, i, dvb.data());
          continue;
        }
        // the input rows whose readers are all done
        for (const int64_t r : G.emit[i]) {
          acc_t *rk = rowbuf.data(), *rv = rowbuf.data() + Cgk * rb_cs;
          gather_row(L, G, sring.data(), qb.data(), HoWm, Cgk, r, rk, rb_cs);
          gather_row(L, G, pring.data(), gb.data(), HoWm, Cgv, r, rv, rb_cs);
          write_rows(dkp, kplane, Cgk, r, rk, rb_cs, sc);
          write_rows(dvp, vplane, Cgv, r, rv, rb_cs, acc_t(1));
        }
      }
      if (gather) {
        for (int64_t r = 0; r < L.H; ++r) {
          if (G.last[r] >= 0) continue;  // read by no tap: zero gradients
          for (int64_t c = 0; c < Cgk; ++c)
            std::fill(dkp + ((kplane + c) * L.H + r) * L.W, dkp + ((kplane + c) * L.H + r + 1) * L.W, scalar_t(0));
          for (int64_t c = 0; c < Cgv; ++c)
            std::fill(dvp + ((vplane + c) * L.H + r) * L.W, dvp + ((vplane + c) * L.H + r + 1) * L.W, scalar_t(0));
        }
      } else {
        for (int64_t r = 0; r < L.H; ++r) {
          write_rows(dkp, kplane, Cgk, r, dkb.data() + r * L.rs, L.cs, sc);
          write_rows(dvp, vplane, Cgv, r, dvb.data() + r * L.rs, L.cs, acc_t(1));
        }
      }
      if (tsum > 0)  // the zero border's table rows and columns do not depend on the output pixel
        for (int64_t u = 0; u < L.Kh; ++u)
          for (int64_t v = 0; v < L.Kw; ++v) {
            acc_t total = 0;
            for (int n = 0; n < N; ++n) total += tacc[(u * L.Kw + v) * N + n];
            drel[L.brow[u * L.Ho] * L.Tw + L.bcol[v * L.Wo]] += total;
          }
      if (tp != nullptr) std::memcpy(drp + (b * heads + h) * L.T, drel, L.T * sizeof(acc_t));
    }
  });
  at::Tensor drel;
  if (table.defined())
    drel = drel_parts.sum(0).view(table.sizes()).to(table.scalar_type());
  else
    drel = at::empty({0}, q.options());
  return {dq, dk, dv, drel, drow, dcol};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> local_attention_backward_op(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const OptTensor& rel_pos, const at::Tensor& out, const at::Tensor& lse, int64_t heads, double scale,
    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef dilation, at::IntArrayRef padding,
    c10::string_view border, std::optional<c10::string_view> backend, const OptTensor& row_bias,
    const OptTensor& col_bias) {
  const Call call = check_call("local_attention_backward", q, k, v, rel_pos, heads, kernel_size, stride, dilation,
                               padding, border, backend, row_bias, col_bias);
  check_tensor("grad_out", grad_out, 4, "(B, Cv, Ho, Wo)");
  check_tensor("out", out, 4, "(B, Cv, Ho, Wo)");
  const std::vector<int64_t> out_size = {q.size(0), v.size(1), q.size(2), q.size(3)};
  TORCH_CHECK_VALUE(grad_out.sizes() == out_size && out.sizes() == out_size,
                    "grad_out and out must have the output's shape (B, Cv, Ho, Wo) = ", at::IntArrayRef(out_size),
                    ", got ", grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
                   "grad_out and out must have the dtype of q (", q.scalar_type(), "), got ", grad_out.scalar_type(),
                   " and ", out.scalar_type());
  const auto stats = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_VALUE(lse.dim() == 4 && lse.size(0) == q.size(0) && lse.size(1) == heads && lse.size(2) == q.size(2) &&
                        lse.size(3) == q.size(3) && lse.scalar_type() == stats,
                    "lse must be (B, heads, Ho, Wo) = (", q.size(0), ", ", heads, ", ", q.size(2), ", ", q.size(3),
                    ") of dtype ", stats, ", got ", lse.sizes(), " of dtype ", lse.scalar_type());
  const at::Tensor table = contiguous_or_undefined(rel_pos);
  const at::Tensor rb = contiguous_or_undefined(row_bias), cb = contiguous_or_undefined(col_bias);
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> r;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "local_attention_backward", [&] {
    r = backward_impl<scalar_t>(grad_out.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), table, rb, cb,
                                out.contiguous(), lse.contiguous(), heads, scale, call);
  });
  return r;
}

}  // namespace
}  // namespace tokenmix_cpu

#ifndef TOKENMIX_TEST_HOOKS
TORCH_LIBRARY_IMPL(tokenmix, CPU, m) {
  m.impl("local_attention_backward", TORCH_FN(tokenmix_cpu::local_attention_backward_op));
}
#endif
