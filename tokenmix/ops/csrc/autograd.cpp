// The autograd kernel of the tokenmix:: ops, for every device: the only place where
// their backward formulas are written. The ops' schemas, fake (meta) kernels and FLOP
// formulas are registered from Python (tokenmix/ops/library.py); their device kernels pick a
// backend (reference, cpu, triton). This file registers, for the Autograd dispatch key, a
// torch::autograd::Function per op (OpFunction<Aggregate> ...) whose forward calls the op below
// autograd and whose backward calls the ops again through the dispatcher:
//
//   aggregate(x, w):            gx = aggregate_transpose(gy, w)
//                               gw = correlate(gy, x), summed over the broadcast dims of w
//   correlate(q, k):            gq = aggregate(k, go)
//                               gk = aggregate_transpose(q, go)
//   aggregate_transpose(y, w):  gy = aggregate(gz, w)
//                               gw = correlate(y, gz), summed over the broadcast dims of w
//
// Because the backward goes through the dispatcher, it is itself differentiable (create_graph),
// traced by torch.compile / torch.export and counted by FlopCounterMode like any other call.
// aggregate's backward computes gx before gw: the CPU correlate of per-pixel weights, which
// runs second, lends its scratch from its own result, so the backward's peak is y, gx and gw.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <ATen/ops/add.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/sum.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace tokenmix {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Ints = at::IntArrayRef;
using SymInts = c10::SymIntArrayRef;
using Backend = std::optional<c10::string_view>;

// The geometry arguments shared by the three ops, kept in the autograd context.
struct Geometry {
  std::vector<int64_t> kernel_size, stride, dilation, padding;
  std::string border;
  std::optional<std::string> backend;

  Geometry(Ints ks, Ints st, Ints dl, Ints pd, c10::string_view b, Backend be)
      : kernel_size(ks.vec()), stride(st.vec()), dilation(dl.vec()), padding(pd.vec()), border(b) {
    if (be) backend = std::string(*be);
  }

  explicit Geometry(AutogradContext* ctx) {
    auto& d = ctx->saved_data;
    kernel_size = d["kernel_size"].toIntVector(), stride = d["stride"].toIntVector();
    dilation = d["dilation"].toIntVector(), padding = d["padding"].toIntVector();
    border = d["border"].toStringRef();
    if (!d["backend"].isNone()) backend = d["backend"].toStringRef();
  }

  void save(AutogradContext* ctx) const {
    auto& d = ctx->saved_data;
    d["kernel_size"] = kernel_size, d["stride"] = stride, d["dilation"] = dilation, d["padding"] = padding;
    d["border"] = border;
    d["backend"] = backend ? c10::IValue(*backend) : c10::IValue();
  }

  Backend backend_arg() const { return backend ? Backend(*backend) : std::nullopt; }

  // The three ops through the dispatcher, with this geometry.
  at::Tensor aggregate(const at::Tensor& x, const at::Tensor& w) const {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("tokenmix::aggregate", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, Ints, Ints, Ints, Ints,
                                           c10::string_view, Backend)>();
    return op.call(x, w, kernel_size, stride, dilation, padding, border, backend_arg());
  }

  at::Tensor correlate(const at::Tensor& q, const at::Tensor& k, int64_t groups, bool sum_batch,
                       bool sum_space) const {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("tokenmix::correlate", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, Ints, Ints, Ints, Ints,
                                           c10::string_view, int64_t, bool, bool, Backend)>();
    return op.call(q, k, kernel_size, stride, dilation, padding, border, groups, sum_batch, sum_space,
                   backend_arg());
  }

  at::Tensor aggregate_transpose(const at::Tensor& y, const at::Tensor& w, SymInts input_size) const {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("tokenmix::aggregate_transpose", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, Ints, Ints, Ints, Ints,
                                           c10::string_view, SymInts, Backend)>();
    return op.call(y, w, kernel_size, stride, dilation, padding, border, input_size, backend_arg());
  }

  at::Tensor aggregate_linear(const at::Tensor& x, const at::Tensor& h, const at::Tensor& weight,
                              const at::Tensor& bias) const {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("tokenmix::aggregate_linear", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const std::optional<at::Tensor>&, Ints, Ints, Ints, Ints, c10::string_view,
                                           Backend)>();
    const std::optional<at::Tensor> b = bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt;
    return op.call(x, h, weight, b, kernel_size, stride, dilation, padding, border, backend_arg());
  }

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> aggregate_linear_backward(
      const at::Tensor& gy, const at::Tensor& x, const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias,
      std::array<bool, 4> mask) const {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("tokenmix::aggregate_linear_backward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const std::optional<at::Tensor>&, Ints, Ints, Ints, Ints, c10::string_view,
                             std::array<bool, 4>, Backend)>();
    const std::optional<at::Tensor> b = bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt;
    return op.call(gy, x, h, weight, b, kernel_size, stride, dilation, padding, border, mask, backend_arg());
  }

  // The weight gradient of a weight (B|1, G, K*K, Ho|1, Wo|1): correlate of (a, b), summed
  // to size 1 over the dims where w broadcasts.
  at::Tensor weight_grad(const at::Tensor& a, const at::Tensor& b, const at::Tensor& w) const {
    return correlate(a, b, w.size(1), w.sym_size(0) == 1, w.sym_size(3) == 1 && w.sym_size(4) == 1);
  }
};

// What differs between the ops: the gradient formulas for their two tensor inputs (a, b),
// given the output's gradient.
struct Aggregate {  // a = x, b = w
  static at::Tensor grad_a(const Geometry& g, const at::Tensor& x, const at::Tensor& w, const at::Tensor& gy) {
    return g.aggregate_transpose(gy, w, x.sym_sizes().slice(2));
  }
  static at::Tensor grad_b(const Geometry& g, const at::Tensor& x, const at::Tensor& w, const at::Tensor& gy) {
    return g.weight_grad(gy, x, w);
  }
};

struct Correlate {  // a = q, b = k
  static at::Tensor grad_a(const Geometry& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& go) {
    return g.aggregate(k, go);
  }
  static at::Tensor grad_b(const Geometry& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& go) {
    return g.aggregate_transpose(q, go, k.sym_sizes().slice(2));
  }
};

struct AggregateTranspose {  // a = y, b = w
  static at::Tensor grad_a(const Geometry& g, const at::Tensor& y, const at::Tensor& w, const at::Tensor& gz) {
    return g.aggregate(gz, w);
  }
  static at::Tensor grad_b(const Geometry& g, const at::Tensor& y, const at::Tensor& w, const at::Tensor& gz) {
    return g.weight_grad(y, gz, w);
  }
};

// The autograd node of op Op: the forward runs `call` (the op below autograd) and keeps a, b
// and the geometry; the backward applies Op's formulas to the inputs that need a gradient.
template <class Op>
struct OpFunction : torch::autograd::Function<OpFunction<Op>> {
  template <class Call>
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& a, const at::Tensor& b, const Geometry& g,
                            const Call& call) {
    ctx->save_for_backward({a, b});
    g.save(ctx);
    at::AutoDispatchBelowADInplaceOrView below;
    return call();
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Geometry g(ctx);
    at::Tensor grad_a, grad_b;
    if (ctx->needs_input_grad(0)) grad_a = Op::grad_a(g, saved[0], saved[1], grads[0]);
    if (ctx->needs_input_grad(1)) grad_b = Op::grad_b(g, saved[0], saved[1], grads[0]);
    return {grad_a, grad_b, at::Tensor(), at::Tensor()};
  }
};

// The Autograd-key kernel: records OpFunction<Op> when a gradient may be needed, else goes
// straight to the device kernel.
template <class Op, class Call>
at::Tensor run(const at::Tensor& a, const at::Tensor& b, const Geometry& g, const Call& call) {
  if (at::GradMode::is_enabled() && (a.requires_grad() || b.requires_grad()))
    return OpFunction<Op>::apply(a, b, g, call);
  at::AutoDispatchBelowADInplaceOrView below;
  return call();
}

at::Tensor aggregate(const at::Tensor& x, const at::Tensor& w, Ints kernel_size, Ints stride, Ints dilation,
                     Ints padding, c10::string_view border, Backend backend) {
  const Geometry g(kernel_size, stride, dilation, padding, border, backend);
  return run<Aggregate>(x, w, g, [&] { return g.aggregate(x, w); });
}

at::Tensor correlate(const at::Tensor& q, const at::Tensor& k, Ints kernel_size, Ints stride, Ints dilation,
                     Ints padding, c10::string_view border, int64_t groups, bool sum_batch, bool sum_space,
                     Backend backend) {
  const Geometry g(kernel_size, stride, dilation, padding, border, backend);
  return run<Correlate>(q, k, g, [&] { return g.correlate(q, k, groups, sum_batch, sum_space); });
}

at::Tensor aggregate_transpose(const at::Tensor& y, const at::Tensor& w, Ints kernel_size, Ints stride,
                               Ints dilation, Ints padding, c10::string_view border, SymInts input_size,
                               Backend backend) {
  const Geometry g(kernel_size, stride, dilation, padding, border, backend);
  return run<AggregateTranspose>(y, w, g, [&] { return g.aggregate_transpose(y, w, input_size); });
}

// local_attention(q, k, v, rel_pos, row_bias, col_bias) -> (out, lse): flash-attention style,
// autograd keeps q, k, v, the biases, out and lse (one log-sum-exp per pixel and head), never
// the scores; the backward is one op, local_attention_backward, which recomputes them and
// returns the six gradients. lse is not differentiable.
using LocalAttentionOut = std::tuple<at::Tensor, at::Tensor>;
using LocalAttentionGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using OptTensor = std::optional<at::Tensor>;

// The optional tensor arguments of local_attention: rel_pos, row_bias, col_bias.
struct AttentionBiases {
  OptTensor rel_pos, row_bias, col_bias;
  static OptTensor from(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }
  static at::Tensor of(const OptTensor& t) { return t ? *t : at::Tensor(); }
};

LocalAttentionOut local_attention_call(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const AttentionBiases& bias, int64_t heads, double scale, const Geometry& g) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("tokenmix::local_attention", "")
                       .typed<LocalAttentionOut(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const OptTensor&, int64_t, double, Ints, Ints, Ints, Ints,
                                                c10::string_view, Backend, const OptTensor&, const OptTensor&)>();
  return op.call(q, k, v, bias.rel_pos, heads, scale, g.kernel_size, g.stride, g.dilation, g.padding, g.border,
                 g.backend_arg(), bias.row_bias, bias.col_bias);
}

LocalAttentionGrads local_attention_backward_call(const at::Tensor& grad_out, const at::Tensor& q,
                                                  const at::Tensor& k, const at::Tensor& v,
                                                  const AttentionBiases& bias, const at::Tensor& out,
                                                  const at::Tensor& lse, int64_t heads, double scale,
                                                  const Geometry& g) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("tokenmix::local_attention_backward", "")
                       .typed<LocalAttentionGrads(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                  const at::Tensor&, const OptTensor&, const at::Tensor&,
                                                  const at::Tensor&, int64_t, double, Ints, Ints, Ints, Ints,
                                                  c10::string_view, Backend, const OptTensor&, const OptTensor&)>();
  return op.call(grad_out, q, k, v, bias.rel_pos, out, lse, heads, scale, g.kernel_size, g.stride, g.dilation,
                 g.padding, g.border, g.backend_arg(), bias.row_bias, bias.col_bias);
}

struct LocalAttentionFunction : torch::autograd::Function<LocalAttentionFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const OptTensor& rel_pos, const OptTensor& row_bias, const OptTensor& col_bias,
                               int64_t heads, double scale, const Geometry& g) {
    const AttentionBiases bias{rel_pos, row_bias, col_bias};
    at::Tensor out, lse;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(out, lse) = local_attention_call(q, k, v, bias, heads, scale, g);
    }
    ctx->save_for_backward({q, k, v, AttentionBiases::of(rel_pos), out, lse, AttentionBiases::of(row_bias),
                            AttentionBiases::of(col_bias)});
    ctx->saved_data["heads"] = heads;
    ctx->saved_data["scale"] = scale;
    g.save(ctx);
    ctx->mark_non_differentiable({lse});
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const Geometry g(ctx);
    at::Tensor grad_out = grads[0];
    if (!grad_out.defined()) grad_out = at::zeros_like(s[4]);
    const AttentionBiases bias{AttentionBiases::from(s[3]), AttentionBiases::from(s[6]), AttentionBiases::from(s[7])};
    auto [dq, dk, dv, drel, drow, dcol] =
        local_attention_backward_call(grad_out, s[0], s[1], s[2], bias, s[4], s[5], ctx->saved_data["heads"].toInt(),
                                      ctx->saved_data["scale"].toDouble(), g);
    // one gradient per argument; needs_input_grad counts the tensors given (an absent optional
    // one has no edge)
    int64_t edge = 0;
    auto keep = [&](const at::Tensor& grad, bool given) {
      return given && ctx->needs_input_grad(edge++) ? grad : at::Tensor();
    };
    variable_list out;
    out.push_back(keep(dq, true));
    out.push_back(keep(dk, true));
    out.push_back(keep(dv, true));
    out.push_back(keep(drel, bias.rel_pos.has_value()));
    out.push_back(keep(drow, bias.row_bias.has_value()));
    out.push_back(keep(dcol, bias.col_bias.has_value()));
    out.resize(9);  // heads, scale, the geometry
    return out;
  }
};

LocalAttentionOut local_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const OptTensor& rel_pos, int64_t heads, double scale, Ints kernel_size, Ints stride,
                                  Ints dilation, Ints padding, c10::string_view border, Backend backend,
                                  const OptTensor& row_bias, const OptTensor& col_bias) {
  const Geometry g(kernel_size, stride, dilation, padding, border, backend);
  auto grad = [](const OptTensor& t) { return t && t->requires_grad(); };
  if (at::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad() || grad(rel_pos) ||
                                     grad(row_bias) || grad(col_bias))) {
    auto r = LocalAttentionFunction::apply(q, k, v, rel_pos, row_bias, col_bias, heads, scale, g);
    return {r[0], r[1]};
  }
  at::AutoDispatchBelowADInplaceOrView below;
  return local_attention_call(q, k, v, AttentionBiases{rel_pos, row_bias, col_bias}, heads, scale, g);
}

// aggregate_linear(x, h, weight, bias): y = aggregate(x, w) with w = weight @ h + bias, never
// stored. The node keeps x, h, weight and bias; its backward calls aggregate_linear_backward,
// which recomputes the kernel tile by tile and returns the four gradients in one pass:
//
//   gx = aggregate_transpose(gy, w)      gw = correlate(gy, x)   (both per tile)
//   gh = weight^T gw      gweight = sum gw h^T      gbias = sum gw
//
// A backward that must itself be differentiable (create_graph) runs these formulas through
// the dispatcher with the kernel materialised, so higher derivatives exist as for the
// primitives.
struct AggregateLinear {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& h, const at::Tensor& weight,
                            const at::Tensor& bias, const Geometry& g) {
    ctx->save_for_backward({x, h, weight, bias});
    g.save(ctx);
    at::AutoDispatchBelowADInplaceOrView below;
    return g.aggregate_linear(x, h, weight, bias);
  }

  // {gx, gh, gweight, gbias}
  static variable_list backward(AutogradContext* ctx, variable_list grads, bool has_bias) {
    const auto saved = ctx->get_saved_variables();
    const Geometry g(ctx);
    const at::Tensor &x = saved[0], &h = saved[1], &weight = saved[2];
    const at::Tensor bias = has_bias ? saved[3] : at::Tensor();
    const std::array<bool, 4> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2),
                                      has_bias && ctx->needs_input_grad(3)};
    variable_list out(4);
    if (!(mask[0] || mask[1] || mask[2] || mask[3])) return out;
    const at::Tensor gy = grads[0];
    if (at::GradMode::is_enabled()) {  // create_graph: differentiable formulas
      const int64_t rows = weight.size(0), taps = g.kernel_size[0] * g.kernel_size[1];
      const auto B = h.sym_size(0), M = h.sym_size(1), Ho = h.sym_size(2), Wo = h.sym_size(3);
      const at::Tensor hm = h.reshape_symint({B, M, Ho * Wo});
      const std::vector<c10::SymInt> w_shape = {B, rows / taps, taps, Ho, Wo};
      if (mask[0]) {
        at::Tensor w = at::matmul(weight, hm);
        if (bias.defined()) w = at::add(w, bias.unsqueeze(1));
        out[0] = g.aggregate_transpose(gy, w.reshape_symint(w_shape), x.sym_sizes().slice(2));
      }
      if (mask[1] || mask[2] || mask[3]) {
        const at::Tensor gw = g.correlate(gy, x, rows / taps, false, false).reshape_symint({B, rows, Ho * Wo});
        if (mask[1]) out[1] = at::matmul(weight.t(), gw).reshape_symint(h.sym_sizes());
        if (mask[2]) out[2] = at::matmul(gw, hm.transpose(1, 2)).sum(0);
        if (mask[3]) out[3] = gw.sum({0, 2});
      }
      return out;
    }
    const auto r = g.aggregate_linear_backward(gy, x, h, weight, bias, mask);
    if (mask[0]) out[0] = std::get<0>(r);
    if (mask[1]) out[1] = std::get<1>(r);
    if (mask[2]) out[2] = std::get<2>(r);
    if (mask[3]) out[3] = std::get<3>(r);
    return out;
  }
};

// The node with a bias (x, h, weight, bias) and without (x, h, weight): an autograd function's
// tensor arguments must be defined.
struct AggregateLinearFunction : torch::autograd::Function<AggregateLinearFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& h, const at::Tensor& weight,
                            const at::Tensor& bias, const Geometry& g) {
    return AggregateLinear::forward(ctx, x, h, weight, bias, g);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto out = AggregateLinear::backward(ctx, grads, true);
    out.emplace_back();  // the geometry
    return out;
  }
};

struct AggregateLinearNoBiasFunction : torch::autograd::Function<AggregateLinearNoBiasFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& h, const at::Tensor& weight,
                            const Geometry& g) {
    return AggregateLinear::forward(ctx, x, h, weight, at::Tensor(), g);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto out = AggregateLinear::backward(ctx, grads, false);
    out[3] = at::Tensor();  // the geometry
    return out;
  }
};

at::Tensor aggregate_linear(const at::Tensor& x, const at::Tensor& h, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, Ints kernel_size, Ints stride, Ints dilation,
                            Ints padding, c10::string_view border, Backend backend) {
  const Geometry g(kernel_size, stride, dilation, padding, border, backend);
  const at::Tensor b = bias.has_value() ? *bias : at::Tensor();
  const bool grad = at::GradMode::is_enabled() &&
                    (x.requires_grad() || h.requires_grad() || weight.requires_grad() || (b.defined() && b.requires_grad()));
  if (grad)
    return b.defined() ? AggregateLinearFunction::apply(x, h, weight, b, g)
                       : AggregateLinearNoBiasFunction::apply(x, h, weight, g);
  at::AutoDispatchBelowADInplaceOrView below;
  return g.aggregate_linear(x, h, weight, b);
}

}  // namespace tokenmix

TORCH_LIBRARY_IMPL(tokenmix, Autograd, m) {
  m.impl("local_attention", TORCH_FN(tokenmix::local_attention));
  m.impl("aggregate_linear", TORCH_FN(tokenmix::aggregate_linear));
  m.impl("aggregate", TORCH_FN(tokenmix::aggregate));
  m.impl("correlate", TORCH_FN(tokenmix::correlate));
  m.impl("aggregate_transpose", TORCH_FN(tokenmix::aggregate_transpose));
}
