// The three ops straight from the plan's source tables, with no scratch: for geometries whose
// window reaches far past the image along a row (a column stride, dilation or padding beyond a
// few times the row widths, Plan::bounded_layout false), where the other kernels' per-thread
// rows, laid out by stride phase and padded to the window's reach, would grow with the
// geometry instead of with the tensors. Each output sums its in-image taps in tap order (taps
// outside the image are skipped, so their weights are never read); every task owns the
// outputs it writes, so the results do not depend on the thread count.
#include "kernels.h"
#include "layout.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace tokenmix_cpu {
namespace {

template <typename scalar_t>
at::Tensor aggregate_tables_impl(const at::Tensor& x, const at::Tensor& w, const Args& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = a.B, C = a.C, G = a.G, Cg = a.Cg, H = a.H, W = a.W, Ho = a.Ho, Wo = a.Wo, Kh = a.Kh, Kw = a.Kw,
                KK = a.KK, wB = a.wB, wHW = a.wHW;
  const int64_t* rows = a.plan.rows.data();
  const int64_t* cols = a.plan.cols.data();
  const auto [y, xd, wd, yd] = new_output<scalar_t>(x, w, {B, C, Ho, Wo});
  at::parallel_for(0, B * C * Ho, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {  // output row (b, c, i)
      const int64_t b = r / (C * Ho), c = (r / Ho) % C, i = r % Ho;
      const scalar_t* xc = xd + (b * C + c) * H * W;
      const scalar_t* wg = wd + ((wB == 1 ? 0 : b) * G + c / Cg) * KK * wHW;
      for (int64_t j = 0; j < Wo; ++j) {
        const int64_t pix = wHW == 1 ? 0 : i * Wo + j;
        acc_t acc = 0;
        for (int64_t u = 0; u < Kh; ++u) {
          const int64_t h = rows[u * Ho + i];
          if (h < 0) continue;
          for (int64_t v = 0; v < Kw; ++v) {
            const int64_t col = cols[v * Wo + j];
            if (col < 0) continue;
            acc += static_cast<acc_t>(wg[(u * Kw + v) * wHW + pix]) * static_cast<acc_t>(xc[h * W + col]);
          }
        }
        yd[r * Wo + j] = static_cast<scalar_t>(acc);
      }
    }
  });
  return y;
}

template <typename scalar_t>
at::Tensor correlate_tables_impl(const at::Tensor& q, const at::Tensor& k, const Args& a, bool sum_batch,
                                 bool sum_space) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = a.B, C = a.C, G = a.G, Cg = a.Cg, H = a.H, W = a.W, Ho = a.Ho, Wo = a.Wo, Kw = a.Kw, KK = a.KK;
  const int64_t* rows = a.plan.rows.data();
  const int64_t* cols = a.plan.cols.data();
  const int64_t nb = sum_batch ? 1 : B, oh = sum_space ? 1 : Ho, ow = sum_space ? 1 : Wo;
  const auto [out, qd, kd, od] = new_output<scalar_t>(q, k, {nb, G, KK, oh, ow});
  // one pixel's tap t of image b: 0 outside the image, whatever q holds
  auto pixel = [&](int64_t b, int64_t g, int64_t t, int64_t i, int64_t j) {
    const int64_t h = rows[(t / Kw) * Ho + i], col = cols[(t % Kw) * Wo + j];
    acc_t acc = 0;
    if (h < 0 || col < 0) return acc;
    const scalar_t* qc = qd + ((b * C + g * Cg) * Ho + i) * Wo + j;
    const scalar_t* kc = kd + ((b * C + g * Cg) * H + h) * W + col;
    for (int64_t c = 0; c < Cg; ++c) acc += static_cast<acc_t>(qc[c * Ho * Wo]) * static_cast<acc_t>(kc[c * H * W]);
    return acc;
  };
  // one task per output row (bb, g, t, i) of the result (a single row when summed over space);
  // the batch and space sums in a fixed order, in double
  at::parallel_for(0, nb * G * KK * oh, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t bb = r / (G * KK * oh), g = (r / (KK * oh)) % G, t = (r / oh) % KK, i = r % oh;
      const int64_t b0 = sum_batch ? 0 : bb, b1 = sum_batch ? B : bb + 1;
      if (sum_space) {
        double s = 0;
        for (int64_t b = b0; b < b1; ++b)
          for (int64_t ii = 0; ii < Ho; ++ii)
            for (int64_t j = 0; j < Wo; ++j) s += static_cast<double>(pixel(b, g, t, ii, j));
        od[r] = static_cast<scalar_t>(s);
        continue;
      }
      for (int64_t j = 0; j < Wo; ++j) {
        double s = 0;
        for (int64_t b = b0; b < b1; ++b) s += static_cast<double>(pixel(b, g, t, i, j));
        od[r * Wo + j] = static_cast<scalar_t>(s);
      }
    }
  });
  return out;
}

template <typename scalar_t>
at::Tensor aggregate_transpose_tables_impl(const at::Tensor& y, const at::Tensor& w, const Args& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = a.B, C = a.C, G = a.G, Cg = a.Cg, H = a.H, W = a.W, Ho = a.Ho, Wo = a.Wo, Kh = a.Kh, Kw = a.Kw,
                KK = a.KK, wB = a.wB, wHW = a.wHW;
  const int64_t* rows = a.plan.rows.data();
  const int64_t* cols = a.plan.cols.data();
  const auto [x, yd, wd, xd] = new_output<scalar_t>(y, w, {B, C, H, W});
  // per plane (b, c): the (tap, output) terms scattered in a fixed order into an input-sized
  // accumulator (the thread's buffer), then converted into x
  at::parallel_for(0, B * C, 1, [&](int64_t p0, int64_t p1) {
    std::vector<acc_t> acc(H * W);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / C, c = p % C;
      const scalar_t* yc = yd + p * Ho * Wo;
      const scalar_t* wg = wd + ((wB == 1 ? 0 : b) * G + c / Cg) * KK * wHW;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t u = 0; u < Kh; ++u)
        for (int64_t i = 0; i < Ho; ++i) {
          const int64_t h = rows[u * Ho + i];
          if (h < 0) continue;
          for (int64_t v = 0; v < Kw; ++v)
            for (int64_t j = 0; j < Wo; ++j) {
              const int64_t col = cols[v * Wo + j];
              if (col < 0) continue;
              const int64_t pix = wHW == 1 ? 0 : i * Wo + j;
              acc[h * W + col] +=
                  static_cast<acc_t>(wg[(u * Kw + v) * wHW + pix]) * static_cast<acc_t>(yc[i * Wo + j]);
            }
        }
      scalar_t* xc = xd + p * H * W;
      for (int64_t e = 0; e < H * W; ++e) xc[e] = static_cast<scalar_t>(acc[e]);
    }
  });
  return x;
}

}  // namespace

at::Tensor aggregate_tables(const at::Tensor& x, const at::Tensor& w, const Plan& plan) {
  return dispatch_floating(x.scalar_type(), [&](auto type) {
    return aggregate_tables_impl<decltype(type)>(x, w, Args(x, w, plan));
  });
}

at::Tensor correlate_tables(const at::Tensor& q, const at::Tensor& k, const Plan& plan, int64_t groups,
                            bool sum_batch, bool sum_space) {
  return dispatch_floating(q.scalar_type(), [&](auto type) {
    return correlate_tables_impl<decltype(type)>(q, k, Args(q, groups, plan), sum_batch, sum_space);
  });
}

at::Tensor aggregate_transpose_tables(const at::Tensor& y, const at::Tensor& w, const Plan& plan) {
  return dispatch_floating(y.scalar_type(), [&](auto type) {
    return aggregate_transpose_tables_impl<decltype(type)>(y, w, Args(y, w, plan));
  });
}

}  // namespace tokenmix_cpu
