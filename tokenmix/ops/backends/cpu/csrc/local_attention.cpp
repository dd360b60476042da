// The CPU kernel of tokenmix::local_attention, the fused forward (local_attention.h describes
// the op and holds the parts the backward shares).

#include "local_attention.h"

#include <ATen/core/Tensor.h>
#include <torch/library.h>

namespace tokenmix_cpu {
namespace {

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                const at::Tensor& table, const at::Tensor& row_bias,
                                                const at::Tensor& col_bias, int64_t heads, double scale,
                                                const Call& call) {
  using acc_t = at::opmath_type<scalar_t>;
  using K = Kernels<acc_t>;
  const Layout L(*call.plan, q.size(0), q.size(1), v.size(1), heads, call.sh, call.dh, call.dw, call.ph,
                 table.defined(), K::N);
  auto out = at::empty({L.B, L.Cv, L.Ho, L.Wo}, q.options());
  at::Tensor lse = at::empty({L.B, heads, L.Ho, L.Wo}, q.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  const int64_t Cgk = L.Cgk, Cgv = L.Cgv, HoWb = L.Ho * L.Wb;
  const TapBiases<scalar_t> tap(row_bias, col_bias);
  const int64_t rbn = tap.row != nullptr ? L.Kh * L.Wb : 0, cbn = tap.col != nullptr ? L.Kw * L.Wb : 0;
  const int64_t need = bytes_of(
      {Cgk * L.cs, Cgv * L.cs, Cgk * HoWb, L.KK * L.Wb, Cgv * L.Wb, L.Wb, L.T, L.Wb, rbn, cbn}, sizeof(acc_t));
  const ThreadScratch scratch(need);
  const scalar_t *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>();
  const scalar_t* tp = table.defined() ? table.data_ptr<scalar_t>() : nullptr;
  scalar_t* op = out.data_ptr<scalar_t>();
  acc_t* lp = lse.data_ptr<acc_t>();
  const K kern{L, L.Wb};
  for_each_task(L.B * heads, heads, 1, scratch, [&](Carver& carver, const TaskRange& tasks) {
    auto kb = carver.take<acc_t>(Cgk * L.cs), vb = carver.take<acc_t>(Cgv * L.cs), qb = carver.take<acc_t>(Cgk * HoWb);
    auto S = carver.take<acc_t>(L.KK * L.Wb), o = carver.take<acc_t>(Cgv * L.Wb), lrow = carver.take<acc_t>(L.Wb);
    auto tb = carver.take<acc_t>(L.T), irow = carver.take<acc_t>(L.Wb);
    auto rb = carver.take<acc_t>(rbn), cb = carver.take<acc_t>(cbn);
    const acc_t* rbp = tap.row != nullptr ? rb.data() : nullptr;
    const acc_t* cbp = tap.col != nullptr ? cb.data() : nullptr;
    for (const Task task : tasks) {
      const int64_t b = task.batch, h = task.group, kplane = b * L.Ck + h * Cgk, vplane = b * L.Cv + h * Cgv;
      fill_rows(kb.data(), L.cs, kp + kplane * L.H * L.W, Cgk, L.H, 0, L.H, L.cp);
      fill_rows(vb.data(), L.cs, vp + vplane * L.H * L.W, Cgv, L.H, 0, L.H, L.cp);
      for (int64_t c = 0; c < Cgk; ++c)
        for (int64_t i = 0; i < L.Ho; ++i)
          load_row(qb.data() + c * HoWb + i * L.Wb, qp + ((kplane + c) * L.Ho + i) * L.Wo, L.Wo);
      if (tp != nullptr) convert(tb.data(), tp + h * L.T, L.T);
      for (int64_t i = 0; i < L.Ho; ++i) {
        kern.row_dots(qb.data() + i * L.Wb, HoWb, kb.data(), Cgk, i, S.data());
        tap.load(L, b * heads + h, i, rb.data(), cb.data());
        kern.scores(S.data(), i, static_cast<acc_t>(scale), tp != nullptr ? tb.data() : nullptr, rbp, cbp);
        kern.softmax(S.data(), i, lrow.data(), irow.data());
        kern.row_aggregate(S.data(), vb.data(), Cgv, i, o.data());
        for (int64_t c = 0; c < Cgv; ++c) {
          acc_t* src = o.data() + c * L.Wb;
          for (int64_t j0 = 0; j0 < L.Wb; j0 += K::N) storeu(src + j0, loadu(src + j0) * loadu(irow.data() + j0));
          store_row(op + ((vplane + c) * L.Ho + i) * L.Wo, src, L.Wo, acc_t(1));
        }
        std::memcpy(lp + ((b * heads + h) * L.Ho + i) * L.Wo, lrow.data(), L.Wo * sizeof(acc_t));
      }
    }
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> local_attention_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const OptTensor& rel_pos, int64_t heads, double scale,
                                                      at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                                      at::IntArrayRef dilation, at::IntArrayRef padding,
                                                      c10::string_view border,
                                                      std::optional<c10::string_view> backend,
                                                      const OptTensor& row_bias, const OptTensor& col_bias) {
  const Call call = check_call("local_attention", q, k, v, rel_pos, heads, kernel_size, stride, dilation, padding,
                               border, backend, row_bias, col_bias);
  const at::Tensor table = contiguous_or_undefined(rel_pos);
  const at::Tensor rb = contiguous_or_undefined(row_bias), cb = contiguous_or_undefined(col_bias);
  std::tuple<at::Tensor, at::Tensor> r;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "local_attention", [&] {
    r = forward_impl<scalar_t>(q.contiguous(), k.contiguous(), v.contiguous(), table, rb, cb, heads, scale, call);
  });
  return r;
}

}  // namespace
}  // namespace tokenmix_cpu

#ifndef TOKENMIX_TEST_HOOKS
TORCH_LIBRARY_IMPL(tokenmix, CPU, m) {
  m.impl("local_attention", TORCH_FN(tokenmix_cpu::local_attention_op));
}
#endif
