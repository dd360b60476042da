// aggregate_linear: y = aggregate(x, w) with the kernel a per-pixel linear map of features,
// w[b, g, t, i, j] = sum_m weight[g*K*K + t, m] * h[b, m, i, j] + bias[g*K*K + t], and its
// backward (the four gradients in one pass). The kernel is never stored whole: the work is
// split into tiles, one image (a block of its groups where its kernel exceeds kTileBytes) or,
// for narrow planes, a few whole images; a tile's kernel is one matrix product (ATen's, in the
// accumulation type), consumed at once, while still in cache, by the aggregate /
// aggregate_transpose / correlate kernels of this folder on the tile's channels:
//
//   forward   w_t = weight_t @ h_b + bias_t;  y_t = aggregate(x_t, w_t)
//   backward  w_t again;  gx_t = aggregate_transpose(gy_t, w_t)
//             gw_t = correlate(gy_t, x_t);  gh_b += weight_t^T gw_t;
//             gweight_t += gw_t h_b^T;  gbias_t += sum gw_t
//
// A tile of one image computes in the tensors' own planes: h_b is h's plane, w_t and gw_t are
// the (ng*K*K, Ho*Wo) layout the kernels read and write, gh_b is written in place; only a
// tile of several images copies its matrices between the per-image layout and the pixels
// side by side. The tiles' buffers are allocated once per call, so the extra memory is the
// outputs plus a few tiles of kernel and of its gradient (the kernel's matrix, its per-image
// layout for several images, the correlate's result), whatever the batch. The tiles run one
// after another; each kernel call parallelises inside itself.
//
// Taps that no output pixel reads inside the image (zero border) have their rows of weight and
// bias replaced by 0 first: the weights generated for them are never used, and a NaN or inf
// there reaches neither the output nor a gradient.
#include "kernels.h"
#include "plan.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace tokenmix_cpu {
namespace {

using Ints = at::IntArrayRef;
using BackendName = std::optional<c10::string_view>;

// The kernel a tile holds, at most (one group of one image may hold more): an image whose
// kernel is larger is cut into blocks of groups, and narrow planes batch whole images up to it.
constexpr int64_t kTileBytes = 2 << 20;

// Planes of fewer pixels than this are batched: a tile holds several whole images, whose
// pixels sit side by side in its matrices (a per-image product with so few columns runs well
// below the machine's rate: MKL's sgemm at the RedNet-50 shapes, one thread, about 0.8x at 49
// pixels, the same at 196). Wider planes make tiles of one image, whose matrices are the
// tensors' own planes: no copies.
constexpr int64_t kNarrowPlane = 128;

// dst (b, a, n) = src (a, b, n), both contiguous: rows of n elements moved one by one
// (TensorIterator's copy of the transposed view runs several times slower on rows this short).
void swap_outer(at::Tensor& dst, const at::Tensor& src) {
  const int64_t a = src.size(0), b = src.size(1), n = src.size(2);
  if (dst.scalar_type() != src.scalar_type() || !src.is_contiguous()) {
    dst.copy_(src.transpose(0, 1));
    return;
  }
  const int64_t bytes = n * src.element_size();
  const char* s = static_cast<const char*>(src.data_ptr());
  char* d = static_cast<char*>(dst.data_ptr());
  for (int64_t i = 0; i < a; ++i)
    for (int64_t j = 0; j < b; ++j) std::memcpy(d + (j * a + i) * bytes, s + (i * b + j) * bytes, bytes);
}

// The sizes of one call, its tiling and the tiles' buffers.
struct Linear {
  std::shared_ptr<const Plan> plan;
  int64_t B, C, H, W, Ho, Wo, HWo, M, KK, G, Cg, rows;
  at::ScalarType type, acc;
  at::Tensor weight, bias;  // in the accumulation type, rows of never-read taps zeroed; bias may be undefined
  int64_t images, groups;   // per tile: `images` whole images (groups == G), or `groups` groups of one image

  Linear(const char* op, const at::Tensor& x, const at::Tensor& h, const at::Tensor& weight_,
         const std::optional<at::Tensor>& bias_, Ints kernel_size, Ints stride, Ints dilation, Ints padding,
         c10::string_view border, BackendName backend) {
    check_backend(op, backend, "aggregate_linear");
    const Window window = Window::from_args(kernel_size, stride, dilation, padding, border);
    check_tensor("x", x, 4, "(B, C, H, W)");
    check_tensor("h", h, 4, "(B, M, Ho, Wo)");
    check_tensor("weight", weight_, 2, "(G*K*K, M)");
    check_same_dtype("x", x, "h", h);
    check_same_dtype("x", x, "weight", weight_);
    const bool has_bias = bias_.has_value() && bias_->defined();
    if (has_bias) {
      check_tensor("bias", *bias_, 1, "(G*K*K,)");
      check_same_dtype("x", x, "bias", *bias_);
    }
    plan = plan_for(window, x.size(2), x.size(3));
    B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), Ho = plan->Ho, Wo = plan->Wo, HWo = Ho * Wo;
    M = h.size(1), KK = plan->Kh * plan->Kw, rows = weight_.size(0);
    TORCH_CHECK_VALUE(h.size(0) == B, "h batch ", h.size(0), " must be x's batch ", B, "; h must be (B, M, Ho, Wo), got ",
                      h.sizes());
    TORCH_CHECK_VALUE(h.size(2) == Ho && h.size(3) == Wo, "h spatial size ", h.sizes().slice(2),
                      " must be the window's output size [", Ho, ", ", Wo, "] for an input of [", H, ", ", W, "]");
    TORCH_CHECK_VALUE(weight_.size(1) == M, "weight.shape[1] must be h's channels M=", M, ", got weight of shape ",
                      weight_.sizes());
    TORCH_CHECK_VALUE(rows >= 1 && rows % KK == 0, "weight.shape[0] must be G*K*K, a multiple of K*K = ", KK,
                      ", got weight of shape ", weight_.sizes());
    G = rows / KK;
    TORCH_CHECK_VALUE(C % G == 0, "channels C=", C, " of x are not divisible by groups G=", G,
                      " (weight.shape[0] / K*K); weight has shape ", weight_.sizes());
    if (has_bias)
      TORCH_CHECK_VALUE(bias_->size(0) == rows, "bias must have shape (G*K*K,) = (", rows, ",), got ", bias_->sizes());
    Cg = C / G;
    type = x.scalar_type();
    acc = (type == at::kHalf || type == at::kBFloat16) ? at::kFloat : type;
    weight = weight_.to(acc).contiguous();
    if (has_bias) bias = bias_->to(acc).contiguous();
    mask_unread_taps();
    // tiles of about equal size, each at most kTileBytes of kernel where a group allows
    const int64_t esize = static_cast<int64_t>(at::elementSize(acc));
    const int64_t per_image = rows * HWo * esize, per_group = KK * HWo * esize;
    if (HWo < kNarrowPlane && per_image <= kTileBytes) {
      const int64_t fit = std::max<int64_t>(1, kTileBytes / per_image), ntiles = (B + fit - 1) / fit;
      images = (B + ntiles - 1) / ntiles, groups = G;
    } else {
      const int64_t fit = std::max<int64_t>(1, kTileBytes / per_group), ntiles = (G + fit - 1) / fit;
      images = 1, groups = (G + ntiles - 1) / ntiles;
    }
  }

  // Zero the rows of weight and bias of taps that read outside the image for every output pixel.
  void mask_unread_taps() {
    const Plan& p = *plan;
    std::vector<bool> used(KK);
    bool all = true;
    for (int64_t u = 0; u < p.Kh; ++u) {
      bool row = false;
      for (int64_t i = 0; i < p.Ho && !row; ++i) row = p.rows[u * p.Ho + i] >= 0;
      for (int64_t v = 0; v < p.Kw; ++v) {
        bool col = false;
        for (int64_t j = 0; j < p.Wo && !col; ++j) col = p.cols[v * p.Wo + j] >= 0;
        used[u * p.Kw + v] = row && col;
        all = all && row && col;
      }
    }
    if (all) return;
    weight = weight.clone();
    if (bias.defined()) bias = bias.clone();
    for (int64_t g = 0; g < G; ++g)
      for (int64_t t = 0; t < KK; ++t)
        if (!used[t]) {
          weight[g * KK + t].zero_();
          if (bias.defined()) bias[g * KK + t].zero_();
        }
  }

  bool one_tile() const { return images >= B && groups == G; }

  // f(first image, images, first group, groups) for every tile, in order (an image's groups in
  // increasing order).
  template <typename F>
  void for_tiles(F&& f) const {
    if (groups == G) {
      for (int64_t b0 = 0; b0 < B; b0 += images) f(b0, std::min(images, B - b0), int64_t(0), G);
    } else {
      for (int64_t b = 0; b < B; ++b)
        for (int64_t g0 = 0; g0 < G; g0 += groups) f(b, int64_t(1), g0, std::min(groups, G - g0));
    }
  }

  // Channels [g0 * Cg, (g0 + ng) * Cg) of images [b0, b0 + n) of t (contiguous: n == 1 or ng == G).
  at::Tensor tile(const at::Tensor& t, int64_t b0, int64_t n, int64_t g0, int64_t ng) const {
    return t.narrow(0, b0, n).narrow(1, g0 * Cg, ng * Cg);
  }

  // A buffer of the accumulation type for the tiles, `per_pixel` elements per pixel of the
  // largest tile; a tile's matrices are views of its first elements (see matrix).
  at::Tensor buffer(int64_t per_pixel) const { return at::empty({per_pixel * images * HWo}, weight.options()); }

  // The first r * n * Ho*Wo elements of `buf` as an (r, n * Ho*Wo) matrix.
  at::Tensor matrix(const at::Tensor& buf, int64_t r, int64_t n) const {
    return buf.narrow(0, 0, r * n * HWo).view({r, n * HWo});
  }

  // h of images [b0, b0 + n) as an (M, n * Ho*Wo) matrix in the accumulation type: one image's
  // plane in place; several images' pixels side by side, written into `buf` (its first
  // M * n * Ho*Wo elements).
  at::Tensor features(const at::Tensor& h, int64_t b0, int64_t n, at::Tensor& buf) const {
    const at::Tensor hb = h.narrow(0, b0, n).view({n, M, HWo});
    if (n == 1 && h.scalar_type() == acc) return hb[0];
    if (!buf.defined()) buf = buffer(M);
    const at::Tensor out = matrix(buf, M, n);
    at::Tensor o = out.view({M, n, HWo});
    swap_outer(o, hb);
    return out;
  }

  // The tile's kernel (n, ng, K*K, Ho, Wo) in the inputs' dtype, made in `mat` (ng*K*K rows of
  // the images' pixels side by side) and, for several images, laid out per image in `img`;
  // hb: features(h, b0, n, .).
  at::Tensor kernel(const at::Tensor& hb, int64_t g0, int64_t ng, at::Tensor& mat, at::Tensor& img) const {
    const int64_t n = hb.size(1) / HWo, r = ng * KK;
    const at::Tensor wr = weight.narrow(0, g0 * KK, r);
    if (!mat.defined()) mat = buffer(groups * KK);
    at::Tensor w = matrix(mat, r, n);
    if (bias.defined())
      at::addmm_out(w, bias.narrow(0, g0 * KK, r).unsqueeze(1), wr, hb);
    else
      at::mm_out(w, wr, hb);
    if (n > 1) {
      if (!img.defined()) img = buffer(groups * KK);
      at::Tensor wi = img.narrow(0, 0, r * n * HWo).view({n, r, HWo});
      swap_outer(wi, w.view({r, n, HWo}));
      w = wi;
    }
    return w.to(type).view({n, ng, KK, Ho, Wo});
  }

  // The tile's result t (n, ng*Cg, ., .) into out's tile, or out = t when the tile is the call.
  void put(at::Tensor& out, const at::Tensor& t, int64_t b0, int64_t n, int64_t g0, int64_t ng,
           at::IntArrayRef size) const {
    if (one_tile()) {
      out = t;
      return;
    }
    if (!out.defined()) out = at::empty(size, t.options());
    tile(out, b0, n, g0, ng).copy_(t);
  }
};

at::Tensor aggregate_linear_op(const at::Tensor& x_, const at::Tensor& h_, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, Ints kernel_size, Ints stride, Ints dilation,
                               Ints padding, c10::string_view border, BackendName backend) {
  const Linear L("aggregate_linear", x_, h_, weight, bias, kernel_size, stride, dilation, padding, border, backend);
  const at::Tensor x = x_.contiguous(), h = h_.contiguous();
  at::Tensor y, hbuf, wmat, wimg;
  L.for_tiles([&](int64_t b0, int64_t n, int64_t g0, int64_t ng) {
    const at::Tensor w = L.kernel(L.features(h, b0, n, hbuf), g0, ng, wmat, wimg);
    L.put(y, aggregate(L.tile(x, b0, n, g0, ng).contiguous(), w, *L.plan), b0, n, g0, ng, {L.B, L.C, L.Ho, L.Wo});
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> aggregate_linear_backward_op(
    const at::Tensor& gy_, const at::Tensor& x_, const at::Tensor& h_, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, Ints kernel_size, Ints stride, Ints dilation, Ints padding,
    c10::string_view border, std::array<bool, 4> mask, BackendName backend) {
  const Linear L("aggregate_linear_backward", x_, h_, weight, bias, kernel_size, stride, dilation, padding, border,
                 backend);
  check_tensor("grad_y", gy_, 4, "(B, C, Ho, Wo)");
  check_same_dtype("x", x_, "grad_y", gy_);
  TORCH_CHECK_VALUE(gy_.size(0) == L.B && gy_.size(1) == L.C && gy_.size(2) == L.Ho && gy_.size(3) == L.Wo,
                    "grad_y must have the output's shape [", L.B, ", ", L.C, ", ", L.Ho, ", ", L.Wo, "], got ",
                    gy_.sizes());
  const at::Tensor x = x_.contiguous(), h = h_.contiguous(), gy = gy_.contiguous();
  const bool need_x = mask[0], need_h = mask[1], need_weight = mask[2], need_bias = mask[3] && L.bias.defined();
  const bool need_gw = need_h || need_weight || need_bias;
  const auto opts = x.options().dtype(L.acc);
  at::Tensor gx, gh, gweight, gbias;
  // gh: written by an image's first tile (its groups in order), accumulated by the others
  if (need_h) gh = at::empty({L.B, L.M, L.HWo}, opts);
  if (need_weight) gweight = at::zeros({L.rows, L.M}, opts);
  if (need_bias) gbias = at::zeros({L.rows}, opts);
  at::Tensor hbuf, wmat, wimg, gmat, dmat;  // the tiles' buffers, made by their first use
  if (need_x || need_gw) {
    L.for_tiles([&](int64_t b0, int64_t n, int64_t g0, int64_t ng) {
      const at::Tensor hb = (need_x || need_weight) ? L.features(h, b0, n, hbuf) : at::Tensor();
      const at::Tensor gyt = L.tile(gy, b0, n, g0, ng).contiguous();
      if (need_x)
        L.put(gx, aggregate_transpose(gyt, L.kernel(hb, g0, ng, wmat, wimg), *L.plan), b0, n, g0, ng, x.sizes());
      if (!need_gw) return;
      // gw as (ng*K*K, n * Ho*Wo), the images' pixels side by side
      const int64_t r = ng * L.KK;
      const at::Tensor gwi = correlate(gyt, L.tile(x, b0, n, g0, ng).contiguous(), *L.plan, ng, false, false)
                                 .view({n, r, L.HWo})
                                 .to(L.acc);
      at::Tensor gw = gwi[0];
      if (n > 1) {
        // the kernel's matrix is free once laid out per image: the gradient's takes its place
        if (!gmat.defined()) gmat = wmat.defined() ? wmat : L.buffer(L.groups * L.KK);
        gw = L.matrix(gmat, r, n);
        at::Tensor gwm = gw.view({r, n, L.HWo});
        swap_outer(gwm, gwi);
      }
      const at::Tensor wr = L.weight.narrow(0, g0 * L.KK, r);
      if (need_h) {
        if (n > 1) {  // whole images: the tile is their only one
          if (!dmat.defined()) dmat = L.buffer(L.M);
          at::Tensor d = L.matrix(dmat, L.M, n);
          at::mm_out(d, wr.t(), gw);
          at::Tensor ght = gh.narrow(0, b0, n);
          swap_outer(ght, d.view({L.M, n, L.HWo}));
        } else if (g0 == 0) {
          at::Tensor out = gh[b0];
          at::mm_out(out, wr.t(), gw);
        } else {
          gh[b0].addmm_(wr.t(), gw);
        }
      }
      if (need_weight) gweight.narrow(0, g0 * L.KK, r).addmm_(gw, hb.t());
      if (need_bias) gbias.narrow(0, g0 * L.KK, r).add_(gw.sum(1));
    });
  }
  const at::Tensor none = at::empty({0}, x.options());
  return {need_x ? gx : none, need_h ? gh.view(h.sizes()).to(h.scalar_type()) : none,
          need_weight ? gweight.to(weight.scalar_type()) : none, need_bias ? gbias.to(bias->scalar_type()) : none};
}

}  // namespace
}  // namespace tokenmix_cpu

#ifndef TOKENMIX_TEST_HOOKS
TORCH_LIBRARY_IMPL(tokenmix, CPU, m) {
  m.impl("aggregate_linear", TORCH_FN(tokenmix_cpu::aggregate_linear_op));
  m.impl("aggregate_linear_backward", TORCH_FN(tokenmix_cpu::aggregate_linear_backward_op));
}
#endif
