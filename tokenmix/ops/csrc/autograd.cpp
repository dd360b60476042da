// The autograd kernel of the three tokenmix:: ops, for every device: the only place where
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

// local_attention(q, k, v, rel_pos) -> (out, lse): flash-attention style, autograd keeps q, k,
// v, rel_pos, out and lse (one log-sum-exp per pixel and head), never the scores; the backward
// is one op, local_attention_backward, which recomputes them. lse is not differentiable.
using LocalAttentionOut = std::tuple<at::Tensor, at::Tensor>;
using LocalAttentionGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using OptTensor = std::optional<at::Tensor>;

LocalAttentionOut local_attention_call(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const OptTensor& rel_pos, int64_t heads, double scale, const Geometry& g) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("tokenmix::local_attention", "")
                       .typed<LocalAttentionOut(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const OptTensor&, int64_t, double, Ints, Ints, Ints, Ints,
                                                c10::string_view, Backend)>();
  return op.call(q, k, v, rel_pos, heads, scale, g.kernel_size, g.stride, g.dilation, g.padding, g.border,
                 g.backend_arg());
}

LocalAttentionGrads local_attention_backward_call(const at::Tensor& grad_out, const at::Tensor& q,
                                                  const at::Tensor& k, const at::Tensor& v, const OptTensor& rel_pos,
                                                  const at::Tensor& out, const at::Tensor& lse, int64_t heads,
                                                  double scale, const Geometry& g) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("tokenmix::local_attention_backward", "")
                       .typed<LocalAttentionGrads(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                  const at::Tensor&, const OptTensor&, const at::Tensor&,
                                                  const at::Tensor&, int64_t, double, Ints, Ints, Ints, Ints,
                                                  c10::string_view, Backend)>();
  return op.call(grad_out, q, k, v, rel_pos, out, lse, heads, scale, g.kernel_size, g.stride, g.dilation,
                 g.padding, g.border, g.backend_arg());
}

struct LocalAttentionFunction : torch::autograd::Function<LocalAttentionFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const OptTensor& rel_pos, int64_t heads, double scale, const Geometry& g) {
    at::Tensor out, lse;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(out, lse) = local_attention_call(q, k, v, rel_pos, heads, scale, g);
    }
    ctx->save_for_backward({q, k, v, rel_pos ? *rel_pos : at::Tensor(), out, lse});
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
    const OptTensor rel_pos = s[3].defined() ? OptTensor(s[3]) : std::nullopt;
    auto [dq, dk, dv, drel] =
        local_attention_backward_call(grad_out, s[0], s[1], s[2], rel_pos, s[4], s[5],
                                      ctx->saved_data["heads"].toInt(), ctx->saved_data["scale"].toDouble(), g);
    return {ctx->needs_input_grad(0) ? dq : at::Tensor(), ctx->needs_input_grad(1) ? dk : at::Tensor(),
            ctx->needs_input_grad(2) ? dv : at::Tensor(),
            rel_pos && ctx->needs_input_grad(3) ? drel : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

LocalAttentionOut local_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const OptTensor& rel_pos, int64_t heads, double scale, Ints kernel_size, Ints stride,
                                  Ints dilation, Ints padding, c10::string_view border, Backend backend) {
  const Geometry g(kernel_size, stride, dilation, padding, border, backend);
  const bool rel_grad = rel_pos && rel_pos->requires_grad();
  if (at::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad() || rel_grad)) {
    auto r = LocalAttentionFunction::apply(q, k, v, rel_pos, heads, scale, g);
    return {r[0], r[1]};
  }
  at::AutoDispatchBelowADInplaceOrView below;
  return local_attention_call(q, k, v, rel_pos, heads, scale, g);
}

}  // namespace tokenmix

TORCH_LIBRARY_IMPL(tokenmix, Autograd, m) {
  m.impl("local_attention", TORCH_FN(tokenmix::local_attention));
  m.impl("aggregate", TORCH_FN(tokenmix::aggregate));
  m.impl("correlate", TORCH_FN(tokenmix::correlate));
  m.impl("aggregate_transpose", TORCH_FN(tokenmix::aggregate_transpose));
}
