// The CPU kernels of the tokenmix:: ops (schemas in tokenmix/ops/library.py): check the
// arguments (a direct torch.ops.tokenmix call must get an error, never a crash or an
// out-of-bounds read), make the inputs contiguous, take the window's plan from the cache and
// run the kernel. Errors are ValueError/TypeError in Python and name the argument.
//
// Built with -DTOKENMIX_TEST_HOOKS (the tests' own build of these sources, see
// tests/native_test_hooks.py) the same kernels are registered as the ops of tokenmix_test_hooks
// instead, together with the hooks that the tests use.
#include "kernels.h"
#include "plan.h"

#include <ATen/core/Tensor.h>
#include <c10/core/SymIntArrayRef.h>
#include <torch/library.h>

#include <optional>
#include <string>

namespace tokenmix_cpu {

void check_backend(const char* op, const std::optional<c10::string_view>& backend, const char* function) {
  TORCH_CHECK_VALUE(!backend.has_value() || *backend == "cpu", "tokenmix::", op,
                    " on CPU tensors runs the cpu backend (backend=None or 'cpu'), got backend='",
                    std::string(*backend), "'; tokenmix.ops.", function ? function : op,
                    " runs the other backends on CPU tensors");
}

void check_tensor(const char* name, const at::Tensor& t, int64_t dim, const char* layout) {
  TORCH_CHECK_VALUE(t.defined(), name, " must be a tensor");
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must be ", dim, "-D ", layout, ", got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be on the CPU, got ", t.device());
  const auto type = t.scalar_type();
  TORCH_CHECK_TYPE(type == at::kFloat || type == at::kDouble || type == at::kHalf || type == at::kBFloat16, name,
                   " must have a floating dtype (float16, bfloat16, float32, float64), got ", type);
}

void check_same_dtype(const char* a_name, const at::Tensor& a, const char* b_name, const at::Tensor& b) {
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), a_name, " and ", b_name, " must have one dtype, got ",
                   a.scalar_type(), " and ", b.scalar_type());
}

namespace {

using Ints = at::IntArrayRef;
using BackendName = std::optional<c10::string_view>;

// w must be (B|1, G, K*K, Ho|1, Wo|1) with G dividing the C channels of `what`.
void check_weight(const at::Tensor& w, int64_t B, int64_t C, const Plan& plan, const char* what) {
  const int64_t G = w.size(1), taps = plan.Kh * plan.Kw;
  TORCH_CHECK_VALUE(G >= 1 && C % G == 0, "channels C=", C, " of ", what, " are not divisible by groups G=", G,
                    " (w.shape[1]); w has shape ", w.sizes());
  const bool spatial = (w.size(3) == plan.Ho && w.size(4) == plan.Wo) || (w.size(3) == 1 && w.size(4) == 1);
  TORCH_CHECK_VALUE((w.size(0) == 1 || w.size(0) == B) && w.size(2) == taps && spatial,
                    "w must be (B|1, G, K*K, Ho|1, Wo|1) = (", B, "|1, ", G, ", ", taps, ", ", plan.Ho, "|1, ",
                    plan.Wo, "|1), got ", w.sizes());
}

void check_output_size(const char* name, const at::Tensor& t, const Plan& plan) {
  TORCH_CHECK_VALUE(t.size(2) == plan.Ho && t.size(3) == plan.Wo, name, " spatial size ", t.sizes().slice(2),
                    " must be the window's output size [", plan.Ho, ", ", plan.Wo, "] for an input of [", plan.H,
                    ", ", plan.W, "]");
}

at::Tensor aggregate_op(const at::Tensor& x, const at::Tensor& w, Ints kernel_size, Ints stride, Ints dilation,
                        Ints padding, c10::string_view border, BackendName backend) {
  check_backend("aggregate", backend);
  const Window window = Window::from_args(kernel_size, stride, dilation, padding, border);
  check_tensor("x", x, 4, "(B, C, H, W)");
  check_tensor("w", w, 5, "(B|1, G, K*K, Ho|1, Wo|1)");
  check_same_dtype("x", x, "w", w);
  const auto plan = plan_for(window, x.size(2), x.size(3));
  check_weight(w, x.size(0), x.size(1), *plan, "x");
  if (!plan->bounded_layout) return aggregate_tables(x.contiguous(), w.contiguous(), *plan);
  return aggregate(x.contiguous(), w.contiguous(), *plan);
}

at::Tensor correlate_op(const at::Tensor& q, const at::Tensor& k, Ints kernel_size, Ints stride, Ints dilation,
                        Ints padding, c10::string_view border, int64_t groups, bool sum_batch, bool sum_space,
                        BackendName backend) {
  check_backend("correlate", backend);
  const Window window = Window::from_args(kernel_size, stride, dilation, padding, border);
  check_tensor("q", q, 4, "(B, C, Ho, Wo)");
  check_tensor("k", k, 4, "(B, C, H, W)");
  check_same_dtype("q", q, "k", k);
  TORCH_CHECK_VALUE(groups >= 1, "groups must be a positive int, got ", groups);
  TORCH_CHECK_VALUE(q.size(0) == k.size(0) && q.size(1) == k.size(1), "q and k must have the same (B, C), got q ",
                    q.sizes(), " and k ", k.sizes());
  TORCH_CHECK_VALUE(q.size(1) % groups == 0, "channels C=", q.size(1), " of q/k are not divisible by groups=", groups);
  const auto plan = plan_for(window, k.size(2), k.size(3));
  check_output_size("q", q, *plan);
  if (!plan->bounded_layout)
    return correlate_tables(q.contiguous(), k.contiguous(), *plan, groups, sum_batch, sum_space);
  return correlate(q.contiguous(), k.contiguous(), *plan, groups, sum_batch, sum_space);
}

at::Tensor aggregate_transpose_op(const at::Tensor& y, const at::Tensor& w, Ints kernel_size, Ints stride,
                                  Ints dilation, Ints padding, c10::string_view border, c10::SymIntArrayRef input_size,
                                  BackendName backend) {
  check_backend("aggregate_transpose", backend);
  const Window window = Window::from_args(kernel_size, stride, dilation, padding, border);
  const Ints size = c10::asIntArrayRefSlow(input_size, __FILE__, __LINE__);
  TORCH_CHECK_VALUE(size.size() == 2 && size[0] >= 1 && size[1] >= 1,
                    "input_size must be a pair of positive ints (H, W), got ", size);
  check_tensor("y", y, 4, "(B, C, Ho, Wo)");
  check_tensor("w", w, 5, "(B|1, G, K*K, Ho|1, Wo|1)");
  check_same_dtype("y", y, "w", w);
  const auto plan = plan_for(window, size[0], size[1]);
  check_output_size("y", y, *plan);
  check_weight(w, y.size(0), y.size(1), *plan, "y");
  if (!plan->bounded_layout) return aggregate_transpose_tables(y.contiguous(), w.contiguous(), *plan);
  return aggregate_transpose(y.contiguous(), w.contiguous(), *plan);
}

}  // namespace
}  // namespace tokenmix_cpu

#ifdef TOKENMIX_TEST_HOOKS
TORCH_LIBRARY(tokenmix_test_hooks, m) {
  m.def("aggregate", TORCH_FN(tokenmix_cpu::aggregate_op));
  m.def("correlate", TORCH_FN(tokenmix_cpu::correlate_op));
  m.def("aggregate_transpose", TORCH_FN(tokenmix_cpu::aggregate_transpose_op));
  m.def("lent_planes_override", TORCH_FN(tokenmix_cpu::lent_planes_override));
}
#else
TORCH_LIBRARY_IMPL(tokenmix, CPU, m) {
  m.impl("aggregate", TORCH_FN(tokenmix_cpu::aggregate_op));
  m.impl("correlate", TORCH_FN(tokenmix_cpu::correlate_op));
  m.impl("aggregate_transpose", TORCH_FN(tokenmix_cpu::aggregate_transpose_op));
}
#endif
