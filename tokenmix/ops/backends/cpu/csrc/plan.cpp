// The geometry plan (plan.h): a port of Window.axis_index (tokenmix/ops/window.py), so the
// index arithmetic is exactly the reference backend's, and a cache of plans.
#include "plan.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <utility>

namespace tokenmix_cpu {
namespace {

const char* const kAxis[2] = {"height", "width"};

void check_pair(const char* name, at::IntArrayRef value, int64_t minimum) {
  TORCH_CHECK_VALUE(value.size() == 2, name, " must hold 2 ints (height, width), got ", value);
  TORCH_CHECK_VALUE(value[0] >= minimum && value[1] >= minimum, name, " must be >= ", minimum, ", got ", value);
}

// (K, Lo) source index along one axis: tap u of output i reads input index[u * Lo + i], -1
// outside the image (zero border only).
std::vector<int64_t> axis_index(const Window& window, int axis, int64_t length, int64_t out_length) {
  const int64_t K = window.kernel_size[axis], s = window.stride[axis], d = window.dilation[axis],
                p = window.padding[axis];
  std::vector<int64_t> index(K * out_length);
  for (int64_t u = 0; u < K; ++u)
    for (int64_t i = 0; i < out_length; ++i) {
      int64_t src;
      if (window.reflect) {  // p < length: one reflection lands inside
        src = i * s - p + u * d;
        if (src < 0) src = -src;
        if (src >= length) src = 2 * (length - 1) - src;
      } else if (!window.clamp) {
        src = i * s - p + u * d;
        if (src < 0 || src >= length) src = -1;
      } else {  // the window slides inward near the border; every tap stays inside
        const int64_t r = i % d, in_phase = (length - r + d - 1) / d;
        const int64_t start = std::min(std::max<int64_t>(i / d - K / 2, 0), in_phase - K);
        src = r + d * (start + u);
      }
      index[u * out_length + i] = src;
    }
  return index;
}

// The first longest run of true in mask: [begin, end), (0, 0) if there is none.
std::pair<int64_t, int64_t> longest_run(const std::vector<bool>& mask) {
  int64_t best = 0, begin = 0, end = 0, start = -1;
  const int64_t n = static_cast<int64_t>(mask.size());
  for (int64_t k = 0; k <= n; ++k) {
    const bool ok = k < n && mask[k];
    if (ok && start < 0) {
      start = k;
    } else if (!ok && start >= 0) {
      if (k - start > best) best = k - start, begin = start, end = k;
      start = -1;
    }
  }
  return {begin, end};
}

// Inverse of a (K, Lo) source map over `length` sources: begin (length + 1) and, per source in
// order, its (tap, out[, extra]) entries sorted by (tap, out).
void readers(const std::vector<int64_t>& index, int64_t K, int64_t Lo, int64_t length, const std::vector<bool>* extra,
             std::vector<int64_t>& begin, std::vector<int64_t>& entries) {
  const int64_t width = extra != nullptr ? 3 : 2;
  begin.assign(length + 1, 0);
  for (int64_t src : index)
    if (src >= 0) ++begin[src + 1];
  for (int64_t h = 0; h < length; ++h) begin[h + 1] += begin[h];
  entries.assign(begin[length] * width, 0);
  std::vector<int64_t> next(begin.begin(), begin.end() - 1);
  for (int64_t t = 0; t < K; ++t)  // (tap, out) ascending: each source's entries come out sorted
    for (int64_t o = 0; o < Lo; ++o) {
      const int64_t src = index[t * Lo + o];
      if (src < 0) continue;
      int64_t* e = entries.data() + width * next[src]++;
      e[0] = t, e[1] = o;
      if (extra != nullptr) e[2] = (*extra)[t * Lo + o] ? 1 : 0;
    }
}

// Plan::col_valid_begin / col_valid_end from the column table (the in-image columns of a tap
// are one run on every border).
void valid_columns(Plan& p) {
  p.col_valid_begin.assign(p.Kw, p.Wo);
  p.col_valid_end.assign(p.Kw, p.Wo);
  for (int64_t v = 0; v < p.Kw; ++v) {
    const int64_t* c = p.cols.data() + v * p.Wo;
    int64_t a = 0;
    while (a < p.Wo && c[a] < 0) ++a;
    int64_t e = a;
    while (e < p.Wo && c[e] >= 0) ++e;
    p.col_valid_begin[v] = a, p.col_valid_end[v] = e;
  }
}

// aggregate_transpose at column stride 1 with a zero border, as an aggregate of its y over the
// mirrored window: output (h, c) of the transpose reads y at the output (i, j) whose tap (u, v)
// reads (h, c), with that output's weight.
std::shared_ptr<const Plan> mirror(const Plan& p) {
  auto m = std::make_shared<Plan>();
  m->H = p.Ho, m->W = p.Wo, m->Ho = p.H, m->Wo = p.W, m->Kh = p.Kh, m->Kw = p.Kw;
  m->rows.assign(p.Kh * p.H, -1);
  m->cols.assign(p.Kw * p.W, -1);
  for (int64_t u = 0; u < p.Kh; ++u)
    for (int64_t i = 0; i < p.Ho; ++i)
      if (p.rows[u * p.Ho + i] >= 0) m->rows[u * p.H + p.rows[u * p.Ho + i]] = i;
  m->col_offset.resize(p.Kw);
  for (int64_t v = 0; v < p.Kw; ++v) {
    for (int64_t j = 0; j < p.Wo; ++j)
      if (p.cols[v * p.Wo + j] >= 0) m->cols[v * p.W + p.cols[v * p.Wo + j]] = j;
    m->col_offset[v] = -p.col_offset[v];
  }
  m->col_stride = 1;
  valid_columns(*m);
  m->affine_begin = 0, m->affine_end = p.W;
  m->zero_border = true;
  m->affine_input_begin = 0, m->affine_input_end = p.Wo;
  m->row_readers_begin.assign(p.Ho + 1, 0);
  m->col_readers_begin.assign(p.Wo + 1, 0);
  return m;
}

std::shared_ptr<const Plan> make_plan(const Window& window, int64_t H, int64_t W) {
  auto plan = std::make_shared<Plan>();
  Plan& p = *plan;
  p.H = H, p.W = W;
  p.Ho = window.output_length(0, H), p.Wo = window.output_length(1, W);
  p.Kh = window.kernel_size[0], p.Kw = window.kernel_size[1];
  p.rows = axis_index(window, 0, H, p.Ho);
  p.cols = axis_index(window, 1, W, p.Wo);
  const int64_t K = p.Kw, s = window.stride[1], d = window.dilation[1], pad = window.padding[1], Wo = p.Wo;
  p.col_stride = s;
  p.col_offset.resize(K);
  const int64_t reach = std::max(W + pad, (Wo - 1) * s + (K - 1) * d + 1) + s;
  p.bounded_layout = reach <= 4 * (W + Wo) + 256;
  if (!window.clamp && !window.reflect) {
    for (int64_t v = 0; v < K; ++v) p.col_offset[v] = v * d - pad;
    p.affine_begin = 0, p.affine_end = Wo;
    p.zero_border = true;
    p.affine_input_begin = 0, p.affine_input_end = W;
    p.col_readers_begin.assign(W + 1, 0);
  } else {  // affine away from the edges (clamp: stride 1)
    for (int64_t v = 0; v < K; ++v) p.col_offset[v] = window.clamp ? d * (v - K / 2) : v * d - pad;
    std::vector<bool> affine(K * Wo), all_affine(Wo, true), input_fast(W, true);
    for (int64_t v = 0; v < K; ++v)
      for (int64_t j = 0; j < Wo; ++j) {
        affine[v * Wo + j] = p.cols[v * Wo + j] == j * s + p.col_offset[v];
        all_affine[j] = all_affine[j] && affine[v * Wo + j];
      }
    std::tie(p.affine_begin, p.affine_end) = longest_run(all_affine);
    // input column c is fast when, for every tap, its affine reader j = (c - col_offset[v]) / s
    // (where that divides) is not an output column or reads c affinely
    for (int64_t c = 0; c < W; ++c)
      for (int64_t v = 0; v < K; ++v) {
        const int64_t num = c - p.col_offset[v];
        if (num < 0 || num % s != 0) continue;
        const int64_t j = num / s;
        if (j < Wo && !affine[v * Wo + j]) input_fast[c] = false;
      }
    std::tie(p.affine_input_begin, p.affine_input_end) = longest_run(input_fast);
    p.zero_border = false;
    readers(p.cols, K, Wo, W, &affine, p.col_readers_begin, p.col_readers);
  }
  readers(p.rows, p.Kh, p.Ho, H, nullptr, p.row_readers_begin, p.row_readers);
  valid_columns(p);
  if (!window.clamp && !window.reflect && s == 1 && p.bounded_layout) p.mirrored = mirror(p);
  return plan;
}

}  // namespace

Window Window::from_args(at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef dilation,
                         at::IntArrayRef padding, c10::string_view border) {
  check_pair("kernel_size", kernel_size, 1);
  check_pair("stride", stride, 1);
  check_pair("dilation", dilation, 1);
  check_pair("padding", padding, 0);
  TORCH_CHECK_VALUE(border == "zero" || border == "clamp" || border == "reflect",
                    "border must be 'zero', 'clamp' or 'reflect', got '", std::string(border), "'");
  Window w;
  for (int a = 0; a < 2; ++a)
    w.kernel_size[a] = kernel_size[a], w.stride[a] = stride[a], w.dilation[a] = dilation[a],
    w.padding[a] = padding[a];
  w.clamp = border == "clamp";
  w.reflect = border == "reflect";
  if (w.clamp) {
    TORCH_CHECK_VALUE(stride[0] == 1 && stride[1] == 1, "border='clamp' needs stride 1, got stride=", stride);
    TORCH_CHECK_VALUE(padding[0] == 0 && padding[1] == 0, "border='clamp' takes no padding, got padding=", padding);
  }
  return w;
}

int64_t Window::output_length(int axis, int64_t length) const {
  const int64_t K = kernel_size[axis], s = stride[axis], d = dilation[axis], p = padding[axis];
  TORCH_CHECK_VALUE(length >= 1, "input ", kAxis[axis], " must be >= 1, got ", length);
  if (clamp) {
    TORCH_CHECK_VALUE(K * d <= length, "border='clamp' needs kernel_size*dilation <= input ", kAxis[axis], ": ", K,
                      "*", d, " > ", length);
    return length;
  }
  TORCH_CHECK_VALUE(!reflect || p < length, "border='reflect' needs padding < input ", kAxis[axis], ": padding ", p,
                    " >= ", length);
  const int64_t span = length + 2 * p - d * (K - 1) - 1;
  const int64_t n = span >= 0 ? span / s + 1 : 0;
  TORCH_CHECK_VALUE(n >= 1, "window kernel_size=", at::IntArrayRef(kernel_size), ", dilation=",
                    at::IntArrayRef(dilation), ", padding=", at::IntArrayRef(padding), " does not fit input ",
                    kAxis[axis], " ", length);
  return n;
}

std::shared_ptr<const Plan> plan_for(const Window& window, int64_t H, int64_t W) {
  using Key = std::array<int64_t, 11>;
  static std::mutex mutex;
  static std::map<Key, std::shared_ptr<const Plan>> cache;
  constexpr size_t kMaxPlans = 256;
  const Key key{window.kernel_size[0], window.kernel_size[1], window.stride[0], window.stride[1],
                window.dilation[0],    window.dilation[1],    window.padding[0], window.padding[1],
                window.clamp ? 1 : window.reflect ? 2 : 0, H, W};
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  auto plan = make_plan(window, H, W);  // outside the lock; a plan in use outlives its eviction
  std::lock_guard<std::mutex> lock(mutex);
  if (cache.size() >= kMaxPlans) cache.clear();
  return cache.emplace(key, std::move(plan)).first->second;
}

}  // namespace tokenmix_cpu
