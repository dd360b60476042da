// Fast CPU kernels of the three tokenmix primitives (aggregate, correlate,
// aggregate_transpose), registered on the tokenmix:: ops by ops.cpp.
//
// Geometry arrives as the per-axis tables of the window's plan (plan.h), computed as
// Window.source_index computes them, so the index arithmetic here is exactly the reference's:
//   rows (Kh, Ho), cols (Kw, Wo): source row / column of tap u / v, -1 = out of image.
//   coff (Kw): column offset of tap v where the column map is affine, col = j*s + coff[v].
//   fa, fb: output columns [fa, fb) on which every tap is affine (zero border: all of them).
//   pad_ok: zero border; reads past the image land in zero padding, so block tails may
//   overrun the output row into scratch.
// Everything not covered by the affine fast path (clamp-border edges) goes through a
// scalar path that reads the tables directly.
//
// Work split (at::parallel_for): aggregate and correlate over (batch, group, chunk of
// output rows); aggregate_transpose over (batch, group, chunk of input rows), computed as a
// gather (each input pixel sums the (tap, output) pairs that read it; the channels-last
// kernel scatters into the task's own band of input rows instead), so there are no atomics
// and results do not depend on the number of threads. At stride 1 with a zero border the
// gather is itself an aggregate, of y over the mirrored window with each weight taken at the
// output pixel its tap reads (aggregate_impl's wsrc mode, SourceWeights): it runs the
// aggregate's kernels on per-task shifted, zero-filled copies of the weight rows.
// Each task copies the input rows it reads into a zero-padded, stride-phase-split float
// scratch (a few tens of KiB), so the inner loops are unit-stride over output columns for any
// stride/dilation, and the 16-bit types are converted once. The scratch is zeroed once per
// thread and every task writes the same positions, so its padding stays zero without per-task
// clearing. Weights are read and outputs written in place when rows hold a vector and the
// dtype is the accumulation type; narrower rows are copied packed (one copy per tap), and
// correlate's per-pixel result always goes through a packed per-task buffer (its q rows are
// read in place even under a vector: the lanes past a row only reach results that are
// overwritten). What is read in place is software-prefetched a row ahead from inside the
// blocks, and what the next task copies a slice per row (Prefetch): the K*K short weight
// streams are not prefetched in time by the hardware. No kernel uses AVX2 masked loads: they
// measured far slower than a plain load with lanes cleared (keep_lanes) on AMD Zen 3. The
// inner loops use GCC/Clang vector extensions (one 256-bit vector = 8 floats / 4 doubles; AVX2
// intrinsics only for the stride-2 (de)interleave, the channels-last transposes and streaming
// stores, with plain fallbacks) with register blocking: aggregate computes two output rows at
// once where it can (agg_block2: one vector of outputs for up to 6 channels x 2 rows in
// registers; both rows read most input rows, so each input vector loaded feeds two FMAs, which
// matters because the loads, not the FMAs, bound these loops), else one row (up to 12
// channels), and reuses each weight vector across the channels; correlate keeps up to 8 taps
// in registers and reuses each query vector across them, or, for two output rows reading the
// same input row (corr_block2), up to 6 taps x 2 rows with each input vector loaded once;
// aggregate_transpose's own gather (stride > 1, the clamp border) blocks like aggregate, two
// input rows at once where its rows are written in place or per phase (tr_block2: both rows
// read most of the same output rows).
// Narrow planes, whose rows fill few vectors, go channels-last instead when a group's channels
// fill whole vectors (aggregate_cl, aggregate_transpose_cl, correlate_cl, below): the rows are
// copied into scratch as (row, column, channel) by 8 x 8 register transposes and the kernels
// vectorise over channels, so no lane is idle and no row edge needs a mask. For float32 with 8
// or 16 channels per group, per-pixel weights, a zero border and unit column dilation (K = 3, 5,
// 7; column stride 1, 2) the aggregate and transpose run affine channels-last kernels on every
// row width of the transpose and on rows under four vectors of the aggregate: the rows keep
// their zero padding, and a block of pixels loads (or, in the transpose, loads and stores) each
// column's channels once for every tap that reads it, in one 64-byte vector per pixel where
// AVX-512 is compiled in (agg_pixels_cl_affine, tr_pixels_cl_affine).
// Memory: the per-thread scratch is one ATen tensor, except in correlate of per-pixel weights,
// the last kernel of aggregate's backward (which computes gx first): there it is carved out of
// the result's last planes, which the other tasks never write, and those planes are computed
// afterwards by a kernel that needs no scratch (lent_planes, correlate_tail), so a forward +
// backward holds exactly y, gx and gw at its peak.
// benchmarks/README.md has the measurements behind these choices.

#include "aggregate_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <utility>
#include <cstring>
#include <vector>

namespace {

using tokenmix_cpu::Plan;

template <typename T> struct VecOf;
template <> struct VecOf<float> {
  typedef float type __attribute__((vector_size(32)));
  static constexpr int N = 8;
};
template <> struct VecOf<double> {
  typedef double type __attribute__((vector_size(32)));
  static constexpr int N = 4;
};

template <typename T>
inline typename VecOf<T>::type loadu(const T* p) {
  typename VecOf<T>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
inline void storeu(T* p, typename VecOf<T>::type v) {
  std::memcpy(p, &v, sizeof(v));
}

// a * b + c rounded once, lane by lane: an explicit fused multiply-add where a sum's rounding
// must not depend on what the compiler contracts (GCC's Zen tunings split loop-carried FMA
// chains into a multiply and an add), e.g. correlate's column kernels and its tail.
template <typename V>
inline V fmadd(V a, V b, V c) {
#if defined(__FMA__)
  if constexpr (std::is_same<V, VecOf<float>::type>::value)
    return (V)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
  else
    return (V)_mm256_fmadd_pd((__m256d)a, (__m256d)b, (__m256d)c);
#else
  for (int l = 0; l < static_cast<int>(sizeof(V) / sizeof(a[0])); ++l) c[l] = std::fma(a[l], b[l], c[l]);
  return c;
#endif
}

// Every lane = a (one broadcast instruction; a lane-by-lane fill compiles to insert chains).
template <typename T>
inline typename VecOf<T>::type splat(T a) {
  using V = typename VecOf<T>::type;
#if defined(__AVX2__)
  if constexpr (std::is_same<T, float>::value)
    return (V)_mm256_set1_ps(a);
  else
    return (V)_mm256_set1_pd(a);
#else
  V v;
  for (int k = 0; k < VecOf<T>::N; ++k) v[k] = a;
  return v;
#endif
}

#if defined(__AVX2__)
// All ones in the lanes k (of a float or double vector) with lo <= k + first < hi.
template <typename T>
inline __m256i lane_range(int64_t lo, int64_t hi, int64_t first = 0) {
  if constexpr (std::is_same<T, float>::value) {
    const __m256i k = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                       _mm256_set1_epi32(static_cast<int>(first)));
    return _mm256_and_si256(_mm256_cmpgt_epi32(k, _mm256_set1_epi32(static_cast<int>(lo) - 1)),
                            _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(hi)), k));
  } else {
    const __m256i k = _mm256_add_epi64(_mm256_setr_epi64x(0, 1, 2, 3), _mm256_set1_epi64x(first));
    return _mm256_and_si256(_mm256_cmpgt_epi64(k, _mm256_set1_epi64x(lo - 1)),
                            _mm256_cmpgt_epi64(_mm256_set1_epi64x(hi), k));
  }
}

// The elements of phase P (0: even, 1: odd) of the 16 floats x, y (x first), in order.
template <int P>
inline __m256 phase8(__m256 x, __m256 y) {
  // [x_P x_2+P y_P y_2+P | x_4+P x_6+P y_4+P y_6+P] -> 64-bit lanes (0, 2, 1, 3)
  const __m256 t = P == 0 ? _mm256_shuffle_ps(x, y, 0x88) : _mm256_shuffle_ps(x, y, 0xDD);
  return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(t), 0xD8));
}

// The even elements of the 8 doubles x, y (x first), in order: [x0 y0 x2 y2] -> [x0 x2 y0 y2].
inline __m256d even4(__m256d x, __m256d y) { return _mm256_permute4x64_pd(_mm256_unpacklo_pd(x, y), 0xD8); }
#endif

// v[k] = p[k] for the lanes lo <= k < hi, 0 for the others; all L lanes of p must be readable
// (inside the tensor). A plain load with the other lanes cleared: AVX2's masked loads measured
// far slower on AMD Zen 3 (they took most of a narrow-row copy's time).
template <typename T>
inline typename VecOf<T>::type keep_lanes(const T* p, int64_t lo, int64_t hi) {
  using V = typename VecOf<T>::type;
#if defined(__AVX2__)
  if constexpr (std::is_same<T, float>::value)
    return (V)_mm256_and_ps(_mm256_loadu_ps(p), _mm256_castsi256_ps(lane_range<T>(lo, hi)));
  else
    return (V)_mm256_and_pd(_mm256_loadu_pd(p), _mm256_castsi256_pd(lane_range<T>(lo, hi)));
#else
  V v{};
  for (int64_t k = std::max<int64_t>(lo, 0); k < std::min<int64_t>(hi, VecOf<T>::N); ++k) v[k] = p[k];
  return v;
#endif
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// The most rows chunk_rows gives, whatever the thread count.
int64_t max_chunk_rows(int64_t rows, int64_t most = 8) {
  const int64_t ch = std::min(most, rows);
  return ch < rows ? std::max<int64_t>(2, ch & ~int64_t(1)) : ch;
}

// Rows per task: at most `most`, fewer when that leaves too few tasks for the threads. The
// count depends on the thread count, the results must not: the two-row kernels pair rows
// (i0, i0 + 1), (i0 + 2, i0 + 3), ... from a chunk's first row and sum a paired row's taps in
// another order than a row computed alone, so the chunk is either the whole plane or an even
// number of rows. Then every chunk starts on an even row, and a row is paired or alone
// (the last row of an odd plane) whatever the chunking.
int64_t chunk_rows(int64_t outer, int64_t rows, int64_t most = 8) {
  const int64_t want = 4 * std::max<int64_t>(1, at::get_num_threads());
  int64_t ch = max_chunk_rows(rows, most);
  while (ch > 2 && outer * ceil_div(rows, ch) < want) ch = std::max<int64_t>(2, (ch / 2) & ~int64_t(1));
  return std::min(ch, rows);
}

// Column layout of the input-side scratch: input column col lives at phase
// (col + padc) % s, index (col + padc) / s of a row of s phases of pw entries each.
struct ColPlan {
  int64_t Kw, Wo, W, s, padc, pw, fa, fb, wbw;
  std::vector<int64_t> phoff;  // per v: phase * pw + e_v (scratch offset of output column 0)
  // per phase f (s > 1): input columns col0[f] + k*s, k < cnt[f], go to scratch dst0[f] + k
  std::vector<int64_t> col0, cnt, dst0;
  std::vector<int64_t> fpos;  // scatter fill: scratch offset of element k of a channel's rows
  const int64_t* cols;
  // fill_rows scatters (stride > 2, or 2 on rows under 12 columns) rather than copying rows
  bool scatter() const { return s > 2 || (s == 2 && W < 12); }
  // fpos for up to nrr rows of rowstride s * pw: a channel's nrr*W contiguous source elements
  // go to fpos[k] in one loop (per-row loops cost more than the copy on 7-column rows)
  void plan_fill(int64_t nrr) {
    if (!scatter()) return;
    fpos.resize(nrr * W);
    for (int64_t k = 0; k < nrr * W; ++k) fpos[k] = (k / W) * s * pw + pos(k % W);
  }
  bool all_fast() const { return fa == 0 && fb >= Wo; }  // no column for the scalar path
  int64_t pos(int64_t col) const {
    int64_t q = col + padc;
    return (q % s) * pw + q / s;
  }
};

// Fast output columns [fa, fb). Zero border (pad_ok): all of [0, Wo), rounded up to whole
// blocks whose tail lanes land in scratch, or ending exactly at Wo (exact_end, for kernels that
// write output rows in place; their last block is shifted left, see for_blocks).
ColPlan make_colplan(const Plan& plan, int64_t block, bool exact_end = false) {
  const int64_t W = plan.W, s = plan.col_stride, fa = plan.affine_begin, fb = plan.affine_end;
  const bool pad_ok = plan.zero_border;
  ColPlan p;
  p.Kw = plan.Kw;
  p.Wo = plan.Wo;
  p.W = W;
  p.s = s;
  p.cols = plan.cols.data();
  const int64_t* off = plan.col_offset.data();
  int64_t mn = 0;
  for (int64_t v = 0; v < p.Kw; ++v) mn = std::min(mn, off[v]);
  p.padc = -mn;
  if (pad_ok) {
    p.fa = 0;
    p.fb = exact_end ? p.Wo : round_up(p.Wo, block);
  } else if (fb - fa >= block) {
    p.fa = fa;
    p.fb = fb;
  } else {
    p.fa = p.fb = 0;  // too narrow for a vector block: everything through the scalar path
  }
  p.wbw = round_up(std::max(p.Wo, p.fb), block);
  int64_t emax = 0;
  for (int64_t v = 0; v < p.Kw; ++v) emax = std::max(emax, (off[v] + p.padc) / s);
  p.pw = std::max(p.wbw + emax, (W - 1 + p.padc) / s + 1) + 1;
  for (int64_t f = 0; f < s; ++f) {
    const int64_t idx = ceil_div(std::max<int64_t>(p.padc - f, 0), s);
    const int64_t col = idx * s + f - p.padc;
    p.col0.push_back(col);
    p.cnt.push_back(col < W ? (W - 1 - col) / s + 1 : 0);
    p.dst0.push_back(f * p.pw + idx);
  }
  p.phoff.resize(p.Kw);
  for (int64_t v = 0; v < p.Kw; ++v) {
    int64_t q = off[v] + p.padc;
    p.phoff[v] = (q % s) * p.pw + q / s;
  }
  return p;
}

// Block start columns covering [fa, fb): full blocks, the last one shifted left to end at fb
// (recomputes a few columns; every fast path writes, never accumulates, so that is exact).
template <typename F>
inline void for_blocks(const ColPlan& p, int64_t block, F&& f) {
  if (p.fb <= p.fa) return;
  int64_t j0 = p.fa;
  for (; j0 + block <= p.fb; j0 += block) f(j0);
  if (j0 < p.fb) f(p.fb - block);
}

inline bool in_fast(const ColPlan& p, int64_t j) { return j >= p.fa && j < p.fb; }

// A slice of the per-thread scratch.
template <typename T>
struct Buf {
  T* p = nullptr;
  int64_t n = 0;
  T* data() const { return p; }
  T* begin() const { return p; }
  T* end() const { return p + n; }
  T& operator[](int64_t i) const { return p[i]; }
};

// Per-thread scratch carved out of one tensor allocated (before the parallel region) through
// the ATen CPU allocator: memory profilers see it, and it is bounded by threads x the
// per-thread need (a few input rows of one group), independent of the batch. Or lent by the
// caller: `region` (region_bytes long) is memory the kernel writes only after the parallel
// region, used when it holds every thread's slice (correlate lends its last planes, see
// lent_planes), so the kernel adds nothing to the peak.
struct ThreadScratch {
  at::Tensor buf;
  char* lent = nullptr;
  int64_t per, used = 0, nthreads;
  explicit ThreadScratch(int64_t per_thread, char* region = nullptr, int64_t region_bytes = 0)
      : per(round_up(std::max<int64_t>(per_thread, 1), 64)) {
    nthreads = std::max<int64_t>(1, at::get_num_threads());
    if (region != nullptr) {
      char* aligned = region + ((64 - reinterpret_cast<uintptr_t>(region) % 64) % 64);
      if (nthreads * per <= region_bytes - (aligned - region)) lent = aligned;
    }
    if (lent == nullptr) buf = at::empty({nthreads * per}, at::TensorOptions().dtype(at::kByte));
  }
  // This thread's slice, zeroed; a private buffer (kept alive by `own`) if the thread id is
  // outside the pool sized above (a call from inside another parallel region).
  char* base(at::Tensor& own) const {
    int64_t tid = at::get_thread_num();
    char* p;
    if (tid >= 0 && tid < nthreads) {
      p = (lent != nullptr ? lent : reinterpret_cast<char*>(buf.data_ptr<uint8_t>())) + tid * per;
    } else {
      own = at::empty({per}, at::TensorOptions().dtype(at::kByte));
      p = reinterpret_cast<char*>(own.data_ptr<uint8_t>());
    }
    std::memset(p, 0, per);  // zeroed: the kernels write only data positions, padding stays 0
    return p;
  }
};

// Carve consecutive slices of sizes n... out of a thread's scratch.
struct Carver {
  char* cur;
  template <typename T>
  Buf<T> take(int64_t n) {
    Buf<T> b;
    b.p = reinterpret_cast<T*>(cur);
    b.n = n;
    cur += ((n * static_cast<int64_t>(sizeof(T)) + 63) / 64) * 64;
    return b;
  }
};

inline int64_t bytes_of(std::initializer_list<int64_t> ns, int64_t elem) {
  int64_t t = 0;
  for (int64_t n : ns) t += ((n * elem + 63) / 64) * 64;
  return t;
}

// How many of the last `planes` output planes (plane_bytes each) a kernel computed plane by
// plane lends to its per-thread scratch (ThreadScratch's region), then computes without any
// scratch after the others (correlate_tail): the kernel's peak memory is then its output alone.
// That matters for the last kernel of a backward, whose scratch would otherwise add to the
// peak of y + gx + gw. need: the scratch of all threads. None where the tail would take over an
// eighth of the planes (narrow weights): the tail takes 1.0-1.9x the kernels' time per plane
// (all planes through it, one thread, the RedNet stages).
#ifdef TOKENMIX_TEST_HOOKS
// The tests' build only (lent_planes_override): >= 0 forces that many lent planes, the whole
// output included, so the tail kernel meets every geometry; -1 = sized.
std::atomic<int64_t> lent_override{-1};
#endif

inline int64_t lent_planes(int64_t planes, int64_t plane_bytes, int64_t need) {
  if (plane_bytes <= 0) return 0;
#ifdef TOKENMIX_TEST_HOOKS
  const int64_t forced = lent_override.load();
  if (forced >= 0) return std::min(forced, planes);
#endif
  const int64_t n = ceil_div(need + 64, plane_bytes);
  return 8 * n <= planes ? n : 0;
}

// Threads the lent planes of correlate_cl are sized for: its tail does not sum in its order, so
// the tail's size must not depend on the thread count (more threads allocate as usual).
constexpr int64_t kLendThreads = 4;

// Task t of the (batch, group, row chunk) grid with nch chunks per (batch, group).
struct TaskAt {
  int64_t b, g, c;
  TaskAt(int64_t t, int64_t G, int64_t nch) : b(t / (G * nch)), g((t / nch) % G), c(t % nch) {}
};

// Range of valid source rows read by output rows [i0, i1): (rmin, count).
inline std::pair<int64_t, int64_t> row_span(const int64_t* rows, int64_t Kh, int64_t Ho, int64_t i0, int64_t i1) {
  int64_t rmin = INT64_MAX, rmax = -1;
  for (int64_t u = 0; u < Kh; ++u)
    for (int64_t i = i0; i < i1; ++i) {
      int64_t r = rows[u * Ho + i];
      if (r >= 0) rmin = std::min(rmin, r), rmax = std::max(rmax, r);
    }
  return rmax >= 0 ? std::make_pair(rmin, rmax - rmin + 1) : std::make_pair<int64_t, int64_t>(0, 0);
}

inline int64_t max_row_span(const int64_t* rows, int64_t Kh, int64_t Ho, int64_t ch) {
  int64_t m = 0;
  for (int64_t i0 = 0; i0 < Ho; i0 += ch) m = std::max(m, row_span(rows, Kh, Ho, i0, std::min(Ho, i0 + ch)).second);
  return m;
}

// Software prefetch of a region a later task reads: `n` planes, `stride` elements apart, of
// `len` contiguous elements each, issued in slices (slice(k, parts)) spread over the current
// task, so the fetch overlaps its compute. The hardware prefetchers do not cover these reads in
// time: they are K*K (weights) or Cg (inputs) short streams, each started anew by every task.
struct Prefetch {
  const char* base = nullptr;
  int64_t pstride = 0, pbytes = 0, lpp = 0, total = 0;  // bytes between / in planes, lines
  Prefetch() = default;
  template <typename T>
  Prefetch(const T* p, int64_t n, int64_t stride, int64_t len)
      : base(reinterpret_cast<const char*>(p)),
        pstride(stride * static_cast<int64_t>(sizeof(T))),
        pbytes(len * static_cast<int64_t>(sizeof(T))) {
    lpp = pbytes > 0 ? (pbytes + 63) / 64 + 1 : 0;  // one more: a plane need not start a line
    total = n * lpp;
  }
  void slice(int64_t k, int64_t parts) const {
    for (int64_t a = k * total / parts, e = (k + 1) * total / parts; a < e; ++a) {
      const int64_t plane = a / lpp, off = std::min((a % lpp) * 64, pbytes - 1);
      __builtin_prefetch(base + plane * pstride + off, 0, 3);
    }
  }
};

// d[k] = src[k] for k < n, converted (the 16-bit types to and from the float accumulators).
template <typename From, typename To>
inline void convert(To* __restrict__ d, const From* __restrict__ src, int64_t n) {
  for (int64_t k = 0; k < n; ++k) d[k] = static_cast<To>(src[k]);
}

// e[k] = src[2k], o[k] = src[2k+1] for k < n: both stride-2 phases of a row in one pass. The
// pairs past the last whole block of 8 (4) go as one more block ending at n, which writes some
// entries twice with the same values: rows of 7 to 28 pairs (the 14- to 56-column planes at
// stride 2) otherwise left most of their pairs to the scalar loop.
template <typename scalar_t, typename acc_t>
inline void deinterleave2(acc_t* __restrict__ e, acc_t* __restrict__ o, const scalar_t* __restrict__ src, int64_t n) {
  int64_t k = 0;
#if defined(__AVX2__)
  if constexpr (std::is_same<scalar_t, float>::value && std::is_same<acc_t, float>::value) {
    auto block8 = [&](int64_t k) {
      const __m256 a = _mm256_loadu_ps(src + 2 * k), b = _mm256_loadu_ps(src + 2 * k + 8);
      _mm256_storeu_ps(e + k, phase8<0>(a, b));
      _mm256_storeu_ps(o + k, phase8<1>(a, b));
    };
    auto block4 = [&](int64_t k) {
      const __m128 a = _mm_loadu_ps(src + 2 * k), b = _mm_loadu_ps(src + 2 * k + 4);
      _mm_storeu_ps(e + k, _mm_shuffle_ps(a, b, 0x88));
      _mm_storeu_ps(o + k, _mm_shuffle_ps(a, b, 0xDD));
    };
    if (n >= 8) {
      for (; k + 8 <= n; k += 8) block8(k);
      if (k < n) block8(n - 8);
      return;
    }
    if (n >= 4) {
      block4(0);
      block4(n - 4);
      return;
    }
  }
#endif
  for (; k < n; ++k) {
    e[k] = static_cast<acc_t>(src[2 * k]);
    o[k] = static_cast<acc_t>(src[2 * k + 1]);
  }
}

// d[2k] = e[k], d[2k+1] = o[k] for k < n: the inverse of deinterleave2.
template <typename T>
inline void interleave2(T* __restrict__ d, const T* __restrict__ e, const T* __restrict__ o, int64_t n) {
  int64_t k = 0;
#if defined(__AVX2__)
  if constexpr (std::is_same<T, float>::value) {
    for (; k + 8 <= n; k += 8) {
      const __m256 a = _mm256_loadu_ps(e + k), b = _mm256_loadu_ps(o + k);
      const __m256 lo = _mm256_unpacklo_ps(a, b), hi = _mm256_unpackhi_ps(a, b);  // per 128-bit lane
      _mm256_storeu_ps(d + 2 * k, _mm256_permute2f128_ps(lo, hi, 0x20));
      _mm256_storeu_ps(d + 2 * k + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
    }
  }
#endif
  for (; k < n; ++k) {
    d[2 * k] = e[k];
    d[2 * k + 1] = o[k];
  }
}

// Copy rows [rmin, rmin + nrr) of ncg channels (channel stride cstride) into the phase-split
// scratch. Only the positions of image columns are written, and they are the same for every
// task, so the padding around them stays as zeroed once per thread (ThreadScratch::zeroed).
template <typename scalar_t, typename acc_t>
void fill_rows(acc_t* xs, int64_t cstride, const scalar_t* src, int64_t ncg, int64_t H, int64_t rmin, int64_t nrr,
               const ColPlan& p) {
  const int64_t W = p.W, s = p.s, rs = s * p.pw;
  for (int64_t c = 0; c < ncg; ++c) {
    const scalar_t* rows = src + (c * H + rmin) * W;
    if (p.scatter()) {
      // other strides and narrow rows: one scattered store per element, positions from plan_fill
      acc_t* dst = xs + c * cstride;
      const int64_t* fp = p.fpos.data();
      for (int64_t k = 0; k < nrr * W; ++k) dst[fp[k]] = static_cast<acc_t>(rows[k]);
      continue;
    }
    for (int64_t rr = 0; rr < nrr; ++rr) {
      acc_t* dst = xs + c * cstride + rr * rs;
      const scalar_t* row = rows + rr * W;
      if (s == 1) {
        convert(dst + p.padc, row, W);
      } else {
        // s == 2: the phase holding the row's first column (f0) interleaves with the other (f1)
        const int f0 = p.col0[0] < p.col0[1] ? 0 : 1, f1 = 1 - f0;
        const int64_t npair = std::min(p.cnt[f0], p.cnt[f1]);
        deinterleave2(dst + p.dst0[f0], dst + p.dst0[f1], row + p.col0[f0], npair);
        if (p.cnt[f0] > npair) dst[p.dst0[f0] + npair] = static_cast<acc_t>(row[p.col0[f0] + 2 * npair]);
      }
    }
  }
}

// Channel blocks covering [0, Cg), largest first: f(integral_constant<CB>, c0) for as many
// blocks of each size CB in Sizes (descending, ending in 1) as still fit.
template <int CB, int... Rest, typename F>
inline void channel_blocks_of(int64_t Cg, F&& f, int64_t c = 0) {
  for (; c + CB <= Cg; c += CB) f(std::integral_constant<int, CB>{}, c);
  if constexpr (sizeof...(Rest) > 0)
    channel_blocks_of<Rest...>(Cg, f, c);
  else
    static_assert(CB == 1, "the last block size must be 1 to cover every channel");
}

// Blocks of 12, 8, 4, 1 channels, the register-block sizes of the aggregate and transpose
// kernels (one vector of columns x CB channels in registers, the weight vector reused across
// the channels).
template <typename F>
inline void channel_blocks(int64_t Cg, F&& f) {
  channel_blocks_of<12, 8, 4, 1>(Cg, f);
}

// f(integral_constant<int, n>) for a run-time count 1 <= n <= N (N for larger n): the tap
// counts of the correlate blocks.
template <int N, typename F>
inline void with_count(int64_t n, F&& f) {
  if constexpr (N > 1) {
    if (n < N) return with_count<N - 1>(n, f);
  }
  f(std::integral_constant<int, N>{});
}

// f(integral_constant<int, i>) for i = 0, 1, ..., N - 1, unrolled at compile time.
template <int N, typename F, int... I>
inline void static_for_impl(F&& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, typename F>
inline void static_for(F&& f) {
  static_for_impl<N>(f, std::make_integer_sequence<int, N>{});
}

// Keeps a loaded vector in a register: GCC otherwise folds each use of a load into its own
// FMA memory operand, loading a vector that feeds two FMAs twice (the loads, not the FMAs,
// bound these loops).
template <typename V>
inline V in_register(V v) {
#if defined(__AVX512F__)
  asm("" : "+v"(v));
#elif defined(__AVX__)
  asm("" : "+x"(v));
#endif
  return v;
}

// Channel blocks for the two-row kernels: 6 channels x 2 rows = 12 accumulators (+ 2 weight
// vectors + 1 input vector = 15 of the 16 AVX registers), then 4, 2, 1.
template <typename F>
inline void channel_blocks2(int64_t Cg, F&& f) {
  channel_blocks_of<6, 4, 2, 1>(Cg, f);
}

// One row's (key, tap) entries, for the two-row blocks: entry k of [0, n) has key[k] (the row
// both rows' blocks index: a scratch input row, or an output row for the transpose; < 0 = none)
// and tap row tap[k] (k itself when tap is null).
struct TapList {
  const int64_t* key;
  const int64_t* tap;
  int64_t n;
  int64_t tap_of(int64_t k) const { return tap ? tap[k] : k; }
};

// Steps (key, tap row of row a or -1, tap row of row b or -1) covering each entry of both lists
// once: with match, an entry of b joins the first unpaired entry of a with its key, so a vector
// loaded once feeds both rows' FMAs; without, a's entries come first, then b's. Every step of a
// comes before the entries of b left unpaired. used: scratch of b.n. Returns the step count.
inline int64_t row_steps(TapList a, TapList b, bool match, char* used, int64_t* steps) {
  int64_t n = 0;
  std::fill(used, used + b.n, char(0));
  for (int64_t k = 0; k < a.n; ++k) {
    if (a.key[k] < 0) continue;
    int64_t m = -1;
    for (int64_t t = 0; match && t < b.n && m < 0; ++t)
      if (b.key[t] == a.key[k] && !used[t]) m = t;
    if (m >= 0) used[m] = 1;
    steps[3 * n] = a.key[k], steps[3 * n + 1] = a.tap_of(k), steps[3 * n + 2] = m >= 0 ? b.tap_of(m) : -1, ++n;
  }
  for (int64_t t = 0; t < b.n; ++t)
    if (b.key[t] >= 0 && !used[t]) steps[3 * n] = b.key[t], steps[3 * n + 1] = -1, steps[3 * n + 2] = b.tap_of(t), ++n;
  return n;
}

// rr[k * Kh + u] = scratch row (source row - rmin, or -1) of tap row u of output row i + k, k < n.
inline void tap_scratch_rows(const int64_t* rows, int64_t Kh, int64_t Ho, int64_t i, int64_t n, int64_t rmin,
                             int64_t* rr) {
  for (int64_t k = 0; k < n; ++k)
    for (int64_t u = 0; u < Kh; ++u) {
      const int64_t r = rows[u * Ho + i + k];
      rr[k * Kh + u] = r >= 0 ? r - rmin : -1;
    }
}

// Whether, in the step order, every tap row t of the first output row is computed no later than
// tap row t of the second (pos: scratch of 2 * Kh).
inline bool later_rows_later(const int64_t* steps, int64_t nsteps, int64_t Kh, int64_t* pos) {
  std::fill(pos, pos + 2 * Kh, int64_t(-1));
  for (int64_t a = 0; a < nsteps; ++a)
    for (int k = 0; k < 2; ++k)
      if (steps[3 * a + 1 + k] >= 0) pos[k * Kh + steps[3 * a + 1 + k]] = a;
  for (int64_t t = 0; t < Kh; ++t)
    if (pos[t] >= 0 && pos[Kh + t] >= 0 && pos[t] > pos[Kh + t]) return false;
  return true;
}

// ------------------------------------------------------------------------------ aggregate
// One vector of output columns [j0, j0 + L) for CB channels over all taps. wpf / opf > 0:
// also prefetch the weights / outputs that many elements ahead (the next row, when they are
// read / written in place).
template <typename acc_t, int CB>
__attribute__((noinline)) void agg_block(const acc_t* xs, int64_t cstride, int64_t rowstride, const acc_t* wb, int64_t wts, int64_t wbw,
                      const int64_t* rru, int64_t Kh, int64_t Kw, const int64_t* phoff, int64_t j0, acc_t* ob,
                      int64_t wpf, int64_t opf) {
  using V = typename VecOf<acc_t>::type;
  V acc[CB];
  for (int c = 0; c < CB; ++c) acc[c] = V{};
  for (int64_t u = 0; u < Kh; ++u) {
    if (rru[u] < 0) continue;
    const acc_t* xr = xs + rru[u] * rowstride + j0;
    const acc_t* wr = wb + u * Kw * wts + j0;
    for (int64_t v = 0; v < Kw; ++v) {
      const V wv = loadu(wr + v * wts);
      if (wpf) __builtin_prefetch(wr + v * wts + wpf, 0, 3);
      const acc_t* xp = xr + phoff[v];
      for (int c = 0; c < CB; ++c) acc[c] += wv * loadu(xp + c * cstride);
    }
  }
  if (opf)
    for (int c = 0; c < CB; ++c) __builtin_prefetch(ob + c * wbw + j0 + opf, 1, 3);
  for (int c = 0; c < CB; ++c) storeu(ob + c * wbw + j0, acc[c]);
}

// Two output rows at once (their weights wrow apart, outputs orow2 apart), over the steps of
// row_steps (key: scratch input row): where both rows read a scratch row, each input vector is loaded once for two
// FMAs (12 accumulators, 2 weight vectors, 1 input vector in registers for CB = 6).
template <typename acc_t, int CB>
__attribute__((noinline)) void agg_block2(const acc_t* xs, int64_t cstride, int64_t rowstride, const acc_t* wb, int64_t wts,
                                          int64_t wrow, int64_t wbw, int64_t orow2, const int64_t* steps, int64_t nsteps,
                                          int64_t Kw, const int64_t* phoff, int64_t j0, acc_t* ob, int64_t wpf,
                                          int64_t opf) {
  using V = typename VecOf<acc_t>::type;
  V a0[CB], a1[CB];
  for (int c = 0; c < CB; ++c) a0[c] = a1[c] = V{};
  for (int64_t k = 0; k < nsteps; ++k) {
    const int64_t u0 = steps[3 * k + 1], u1 = steps[3 * k + 2];
    const acc_t* xr = xs + steps[3 * k] * rowstride + j0;
    const acc_t* w0r = wb + std::max<int64_t>(u0, 0) * Kw * wts + j0;  // read only if u0 >= 0
    const acc_t* w1r = wb + wrow + std::max<int64_t>(u1, 0) * Kw * wts + j0;
    if (u0 >= 0 && u1 >= 0) {
      for (int64_t v = 0; v < Kw; ++v) {
        const V w0 = loadu(w0r + v * wts), w1 = loadu(w1r + v * wts);
        if (wpf) __builtin_prefetch(w0r + v * wts + wpf, 0, 3), __builtin_prefetch(w1r + v * wts + wpf, 0, 3);
        const acc_t* xp = xr + phoff[v];
        for (int c = 0; c < CB; ++c) {
          const V xv = in_register(loadu(xp + c * cstride));
          a0[c] += w0 * xv;
          a1[c] += w1 * xv;
        }
      }
    } else {  // a row read by one of the two only
      auto one = [&](V(&a)[CB], const acc_t* wr) {
        for (int64_t v = 0; v < Kw; ++v) {
          const V wv = loadu(wr + v * wts);
          if (wpf) __builtin_prefetch(wr + v * wts + wpf, 0, 3);
          const acc_t* xp = xr + phoff[v];
          for (int c = 0; c < CB; ++c) a[c] += wv * loadu(xp + c * cstride);
        }
      };
      if (u0 >= 0)
        one(a0, w0r);
      else
        one(a1, w1r);
    }
  }
  if (opf)
    for (int c = 0; c < CB; ++c)
      __builtin_prefetch(ob + c * wbw + j0 + opf, 1, 3), __builtin_prefetch(ob + orow2 + c * wbw + j0 + opf, 1, 3);
  for (int c = 0; c < CB; ++c) storeu(ob + c * wbw + j0, a0[c]), storeu(ob + orow2 + c * wbw + j0, a1[c]);
}

// Transposes between channel-major (c * cs + k) and channels-last (off[k] + c) layouts, for
// n positions k of nc channels c: to_last copies src channel-major into dst channels-last,
// from_last the other way. 8 x 8 register transposes (AVX2, float) where whole blocks fit,
// element by element (converted) elsewhere.
#if defined(__AVX2__)
// Rows r[0..8) -> columns: r[m][k] becomes r[k][m].
inline void transpose8x8(__m256 (&r)[8]) {
  __m256 t[8], u[8];
  for (int k = 0; k < 8; k += 2) t[k] = _mm256_unpacklo_ps(r[k], r[k + 1]), t[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);
  for (int k = 0; k < 8; k += 4) {
    u[k] = _mm256_shuffle_ps(t[k], t[k + 2], 0x44), u[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], 0xEE);
    u[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0x44), u[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0xEE);
  }
  for (int k = 0; k < 4; ++k)
    r[k] = _mm256_permute2f128_ps(u[k], u[k + 4], 0x20), r[k + 4] = _mm256_permute2f128_ps(u[k], u[k + 4], 0x31);
}
#endif

template <typename From, typename To>
void to_last(To* dst, const int64_t* off, const From* src, int64_t cs, int64_t nc, int64_t n) {
  int64_t c0 = 0;
#if defined(__AVX2__)
  if constexpr (std::is_same<From, float>::value && std::is_same<To, float>::value) {
    for (; c0 + 8 <= nc; c0 += 8) {
      int64_t k = 0;
      for (; k + 8 <= n; k += 8) {
        __m256 r[8];
        for (int m = 0; m < 8; ++m) r[m] = _mm256_loadu_ps(src + (c0 + m) * cs + k);
        transpose8x8(r);
        for (int m = 0; m < 8; ++m) _mm256_storeu_ps(dst + off[k + m] + c0, r[m]);
      }
      for (; k < n; ++k)
        for (int64_t c = c0; c < c0 + 8; ++c) dst[off[k] + c] = src[c * cs + k];
    }
  }
#endif
  for (int64_t c = c0; c < nc; ++c)
    for (int64_t k = 0; k < n; ++k) dst[off[k] + c] = static_cast<To>(src[c * cs + k]);
}

template <typename From, typename To>
void from_last(To* dst, int64_t cs, const From* src, const int64_t* off, int64_t nc, int64_t n) {
  int64_t c0 = 0;
#if defined(__AVX2__)
  if constexpr (std::is_same<From, float>::value && std::is_same<To, float>::value) {
    for (; c0 + 8 <= nc; c0 += 8) {
      int64_t k = 0;
      for (; k + 8 <= n; k += 8) {
        __m256 r[8];
        for (int m = 0; m < 8; ++m) r[m] = _mm256_loadu_ps(src + off[k + m] + c0);
        transpose8x8(r);
        for (int m = 0; m < 8; ++m) _mm256_storeu_ps(dst + (c0 + m) * cs + k, r[m]);
      }
      for (; k < n; ++k)
        for (int64_t c = c0; c < c0 + 8; ++c) dst[c * cs + k] = src[off[k] + c];
    }
  }
#endif
  for (int64_t c = c0; c < nc; ++c)
    for (int64_t k = 0; k < n; ++k) dst[c * cs + k] = static_cast<To>(src[off[k] + c]);
}

// Channels-last scratch of a group's rows: rows of lp + W + rp pixels of Cg channels (pitch
// elements apart), image column col at lp + col; the columns outside the image never hold
// image data (zeros the kernels read for taps outside the image, or where the transpose drops
// them). Column lp + W is the zero column the tables send those taps to (rp >= 1); a zero
// border's taps can instead read their own column when lp and rp cover the padding
// (affine_columns).
struct LastRows {
  int64_t W, Cg, lp, pitch;
  bool padded;  // lp and the right padding hold every column a zero border's taps read
  LastRows(int64_t W_, int64_t Cg_, int64_t lp_ = 0, int64_t rp = 1, bool padded_ = false)
      : W(W_), Cg(Cg_), lp(lp_), pitch((lp_ + W_ + std::max<int64_t>(rp, 1)) * Cg_), padded(padded_) {}
  // The rows for the taps of a window whose columns are col = j * s + coff[v] (zero border,
  // pad_ok: with its padding, so every tap reads a column of its own) or given by the tables
  // only (clamp border: every tap is inside the image)
  static LastRows for_taps(int64_t W, int64_t Cg, const int64_t* coff, int64_t s, int64_t Kw, int64_t Wo,
                           bool pad_ok) {
    if (!pad_ok) return LastRows(W, Cg);
    return LastRows(W, Cg, std::max<int64_t>(0, -coff[0]), (Wo - 1) * s + coff[Kw - 1] - (W - 1), true);
  }
  // [j * Kw + v]: offset of tap column v of output column j within a row: its own column
  // j * s + coff[v] when padded, else the table's (the zero column lp + W for taps outside the
  // image; coff and s are then unused)
  std::vector<int64_t> tap_columns(const int64_t* cols, int64_t Kw, int64_t Wo, const int64_t* coff = nullptr,
                                   int64_t s = 1) const {
    std::vector<int64_t> c(Wo * Kw);
    for (int64_t j = 0; j < Wo; ++j)
      for (int64_t v = 0; v < Kw; ++v) {
        const int64_t col = padded ? j * s + coff[v] : cols[v * Wo + j];
        c[j * Kw + v] = (lp + (col >= 0 || padded ? col : W)) * Cg;
      }
    return c;
  }
  // [k]: offset of element k of a channel's nrows * W contiguous image elements (to_last and
  // from_last positions)
  std::vector<int64_t> elements(int64_t nrows) const {
    std::vector<int64_t> e(nrows * W);
    for (int64_t k = 0; k < nrows * W; ++k) e[k] = (k / W) * pitch + (lp + k % W) * Cg;
    return e;
  }
};

// [k] = k * step, k < n: offsets of packed positions (to_last and from_last).
inline std::vector<int64_t> strided(int64_t n, int64_t step) {
  std::vector<int64_t> o(n);
  for (int64_t k = 0; k < n; ++k) o[k] = k * step;
  return o;
}

// Register blocks of the channels-last pixel kernels covering Wo pixels x NV channel vectors:
// f(integral_constant NP, integral_constant NB, first pixel, first vector), NP <= 4, NB <= 2.
template <typename F>
inline void pixel_blocks(int64_t Wo, int64_t NV, F&& f) {
  channel_blocks_of<4, 3, 2, 1>(Wo, [&](auto np, int64_t j) {
    channel_blocks_of<2, 1>(NV, [&](auto nb, int64_t k) { f(np, nb, j, k); });
  });
}

// Weights at the source pixel (aggregate's wsrc mode): the weight of output (i, j) and tap
// (u, v) is the one stored at the pixel that tap reads, w[u * Kw + v][rows[u][i]][cols[v][j]],
// and 0 where that pixel is outside the image. This is the stride-1 zero-border
// aggregate_transpose written as an aggregate of y (see aggregate_transpose_impl). Its columns
// are affine, cols[v][j] = j + shift[v] on [lo[v], hi[v]) and -1 elsewhere, so each tap row of
// the weights is one shifted copy, zero-filled at the ends.
struct SourceWeights {
  int64_t Kw, Wo;
  std::vector<int64_t> lo, hi, shift;
  SourceWeights() : Kw(0), Wo(0) {}
  explicit SourceWeights(const Plan& plan) : Kw(plan.Kw), Wo(plan.Wo), lo(Kw), hi(Kw), shift(Kw) {
    const int64_t* cols = plan.cols.data();
    for (int64_t v = 0; v < Kw; ++v) {
      const int64_t* c = cols + v * Wo;
      int64_t a = 0;
      while (a < Wo && c[a] < 0) ++a;
      int64_t e = a;
      while (e < Wo && c[e] >= 0) ++e;
      lo[v] = a, hi[v] = e, shift[v] = a < Wo ? c[a] - a : 0;
      for (int64_t j = 0; j < Wo; ++j)
        TORCH_CHECK(j >= a && j < e ? c[j] == j + shift[v] : c[j] < 0, "tokenmix: source weights need affine columns");
    }
  }
  // rows [ia, ib) of the KK taps of one (batch, group), wg: its weights (planes wHW apart, rows
  // wW apart); tap t of row i goes to dst + t * tstride + (i - ia) * rstride: Wo entries, or
  // Wo rounded up to whole vectors (zeros past Wo) when per-pixel weights are already in the
  // accumulation type (masked vector loads: one or two per row on narrow planes, where
  // per-row fills and copies would cost more than the FMAs)
  template <typename scalar_t, typename acc_t>
  void copy(acc_t* dst0, int64_t tstride, int64_t rstride, const scalar_t* wg, int64_t KK, int64_t wHW, int64_t wW,
            const int64_t* rows, int64_t Ho, int64_t ia, int64_t ib) const {
    constexpr int L = VecOf<acc_t>::N;
    for (int64_t t = 0; t < KK; ++t) {
      const int64_t u = t / Kw, v = t % Kw, a = lo[v], e = hi[v];
      for (int64_t i = ia; i < ib; ++i) {
        acc_t* dst = dst0 + t * tstride + (i - ia) * rstride;
        const int64_t r = rows[u * Ho + i];
        if (r < 0 || e <= a) {
          std::fill(dst, dst + Wo, acc_t(0));
          continue;
        }
        if constexpr (std::is_same<scalar_t, acc_t>::value) {
          if (wHW > 1) {
            const acc_t* src = wg + t * wHW + r * wW + shift[v];
            for (int64_t j = 0; j < Wo; j += L) {
              if (src + j >= wg && src + j + L <= wg + KK * wHW) {
                storeu(dst + j, keep_lanes(src + j, a - j, e - j));
              } else {
                for (int64_t k = j; k < j + L; ++k) dst[k] = k >= a && k < e ? src[k] : acc_t(0);
              }
            }
            continue;
          }
        }
        std::fill(dst, dst + a, acc_t(0));
        if (wHW == 1)
          std::fill(dst + a, dst + e, static_cast<acc_t>(wg[t]));
        else
          convert(dst + a, wg + t * wHW + r * wW + a + shift[v], e - a);
        std::fill(dst + e, dst + Wo, acc_t(0));
      }
    }
  }
};

// ---------------------------------------------------- aggregate, channels-last narrow planes
// Output rows under a vector (Wo < L) waste lanes when vectorised over columns (half of them
// at Wo = 4), and the per-task copies around the FMAs dominate. When a group's channels fill
// whole vectors (Cg % L == 0), vectorise over channels instead: each task copies its input rows
// channels-last into scratch, (row, W + 1 columns, Cg), column W left zero for taps outside the
// image, and every output pixel sums, per tap, the broadcast weight times its input pixel's
// channel vectors. Indices come straight from the tables (any geometry, both borders).
// NP consecutive output pixels of one row x NB channel vectors over all taps (NP * NB
// independent accumulators: one pixel's 2 would wait on the FMA latency). rr[u]: scratch row
// offset (elements) of tap row u, or -1; cidx[p * Kw + v]: scratch column offset of tap
// column v of pixel p; w[(u * Kw + v) * wstep + p * wpix]: its weight; out + p * ostep: its
// channels.
template <typename scalar_t, typename acc_t, int NB, int NP>
__attribute__((noinline)) void agg_pixels_cl(const acc_t* xs, const int64_t* rr, const int64_t* cidx, int64_t Kh,
                                             int64_t Kw, const scalar_t* w, int64_t wstep, int64_t wpix, acc_t* out,
                                             int64_t ostep) {
  using V = typename VecOf<acc_t>::type;
  constexpr int L = VecOf<acc_t>::N;
  V acc[NP][NB];
  for (int p = 0; p < NP; ++p)
    for (int k = 0; k < NB; ++k) acc[p][k] = V{};
  for (int64_t u = 0; u < Kh; ++u) {
    if (rr[u] < 0) continue;
    const acc_t* xr = xs + rr[u];
    const scalar_t* wr = w + u * Kw * wstep;
    for (int64_t v = 0; v < Kw; ++v) {
      for (int p = 0; p < NP; ++p) {
        const acc_t* xp = xr + cidx[p * Kw + v];
        const V wv = splat(static_cast<acc_t>(wr[v * wstep + p * wpix]));
        for (int k = 0; k < NB; ++k) acc[p][k] += wv * loadu(xp + k * L);
      }
    }
  }
  for (int p = 0; p < NP; ++p)
    for (int k = 0; k < NB; ++k) storeu(out + p * ostep + k * L, acc[p][k]);
}

// The vectors of the affine channels-last kernels: a pixel's CG channels in NB vectors of 64
// bytes where AVX-512 is compiled in and they fill them (one per pixel at 16 floats: half the
// loads and multiply-adds of two 32-byte vectors; A/B on an AVX-512 AMD EPYC, one thread:
// aggregate and transpose -19% as geomeans over the RedNet stages),
// else of VecOf's 32 bytes; NP pixels per block, so that NP * NB = 8 accumulators hide the
// multiply-add latency.
template <typename T, int CG>
struct AffineVec {
#if defined(__AVX512F__)
  static constexpr int bytes = (CG * int(sizeof(T))) % 64 == 0 ? 64 : 32;
#else
  static constexpr int bytes = 32;
#endif
  typedef T type __attribute__((vector_size(bytes)));
  static constexpr int L = bytes / int(sizeof(T)), NB = CG / L, NP = 8 / NB;
  static_assert(CG % L == 0 && NB <= 8, "a pixel's channels must fill whole vectors");
  static type load(const T* p) {
    type v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static void store(T* p, type v) { std::memcpy(p, &v, sizeof(v)); }
  static type splat(T a) {
#if defined(__AVX512F__)
    if constexpr (bytes == 64) {
      if constexpr (std::is_same<T, float>::value)
        return (type)_mm512_set1_ps(a);
      else
        return (type)_mm512_set1_pd(a);
    } else
#endif
      return ::splat<T>(a);  // 32 bytes: VecOf's vector
  }
};

// The same sums for NP pixels whose taps read the columns p * S + v of a row (tap v of pixel
// p, unit dilation): a zero border's pixels, whose rows keep their zero padding. With K and S
// known at compile time the loop runs over the block's S * (NP - 1) + K columns, loading each
// column's channel vectors once for every (pixel, tap) that reads it (K * NP / (S * (NP - 1) +
// K) multiply-adds per load: 2.15 at K = 7, S = 2, NP = 4) and reading no column table; the
// column pitch is CG, the group's channels. Loads, not multiply-adds, bound the general kernel
// above (a column offset, a weight and NB input vectors per NB multiply-adds). Each pixel still
// adds its taps in the order (u, v), so the results are bit-identical to agg_pixels_cl's.
// xs + rr[u] + c0: the block's first column in tap row u's scratch row; w + (u * K + v) * wstep
// + p: the weight of tap (u, v) of pixel p; out + p * CG: pixel p's channels.
template <typename scalar_t, typename acc_t, int CG, int NP, int K, int S>
__attribute__((noinline)) void agg_pixels_cl_affine(const acc_t* xs, const int64_t* rr, int64_t c0, int64_t Kh,
                                                    const scalar_t* w, int64_t wstep, acc_t* out) {
  using AV = AffineVec<acc_t, CG>;
  using V = typename AV::type;
  constexpr int L = AV::L, NB = AV::NB, NC = S * (NP - 1) + K;
  V acc[NP][NB];
  for (int p = 0; p < NP; ++p)
    for (int k = 0; k < NB; ++k) acc[p][k] = V{};
  for (int64_t u = 0; u < Kh; ++u) {
    if (rr[u] < 0) continue;
    const acc_t* xr = xs + rr[u] + c0;
    const scalar_t* wv[K];
    for (int v = 0; v < K; ++v) wv[v] = w + (u * K + v) * wstep;
    static_for<NC>([&](auto c) {
      V xv[NB];
      for (int k = 0; k < NB; ++k) xv[k] = in_register(AV::load(xr + c * CG + k * L));
      static_for<NP>([&](auto p) {
        constexpr int v = decltype(c)::value - decltype(p)::value * S;
        if constexpr (v >= 0 && v < K) {
          const V wvv = AV::splat(static_cast<acc_t>(wv[v][decltype(p)::value]));
          for (int k = 0; k < NB; ++k) acc[decltype(p)::value][k] += wvv * xv[k];
        }
      });
    });
  }
  for (int p = 0; p < NP; ++p)
    for (int k = 0; k < NB; ++k) AV::store(out + p * CG + k * L, acc[p][k]);
}

// f(integral_constant CG, integral_constant K, integral_constant S) for the channels per group,
// kernel widths and column strides the affine kernels are compiled for; false for the others.
template <typename F>
inline bool with_affine(int64_t Cg, int64_t K, int64_t S, F&& f) {
  auto ks = [&](auto cg) {
    auto k = [&](auto kc) {
      if (S == 1) return f(cg, kc, std::integral_constant<int, 1>{}), true;
      if (S == 2) return f(cg, kc, std::integral_constant<int, 2>{}), true;
      return false;
    };
    if (K == 3) return k(std::integral_constant<int, 3>{});
    if (K == 5) return k(std::integral_constant<int, 5>{});
    if (K == 7) return k(std::integral_constant<int, 7>{});
    return false;
  };
  if (Cg == 8) return ks(std::integral_constant<int, 8>{});
  if (Cg == 16) return ks(std::integral_constant<int, 16>{});
  return false;
}

// Blocks of NP, NP / 2, ..., 1 pixels covering a row of Wo: f(integral_constant np, first pixel).
template <int NP, typename F>
inline void affine_blocks(int64_t Wo, F&& f) {
  if constexpr (NP == 8)
    channel_blocks_of<8, 4, 2, 1>(Wo, f);
  else if constexpr (NP == 4)
    channel_blocks_of<4, 2, 1>(Wo, f);
  else if constexpr (NP == 2)
    channel_blocks_of<2, 1>(Wo, f);
  else
    channel_blocks_of<1>(Wo, f);
}

// Whether the affine channels-last kernels run a plane (every pixel: its rows keep their zero
// padding, LastRows::for_taps): float, a zero border at unit column dilation (tap v at column
// j * s + coff[0] + v), per-pixel weights, and channels per group, a kernel width and a column
// stride they are compiled for (with_affine).
template <typename scalar_t>
bool affine_cl(int64_t Cg, bool per_pixel, int64_t Kw, int64_t s, const int64_t* coff, bool pad_ok) {
  if (!std::is_same<scalar_t, float>::value || !pad_ok || !per_pixel) return false;
  for (int64_t v = 0; v < Kw; ++v)
    if (coff[v] != coff[0] + v) return false;
  return with_affine(Cg, Kw, s, [](auto, auto, auto) {});
}

template <typename scalar_t>
at::Tensor aggregate_cl(const at::Tensor& x, const at::Tensor& w, const Plan& plan, bool wsrc) {
  const int64_t s = plan.col_stride;
  const bool pad_ok = plan.zero_border;
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int L = VecOf<acc_t>::N;
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t G = w.size(1), KK = w.size(2), Cg = C / G;
  const int64_t Kh = plan.Kh, Ho = plan.Ho, Kw = plan.Kw, Wo = plan.Wo;
  const int64_t wB = w.size(0), wHW = w.size(3) * w.size(4);
  const int64_t* rows = plan.rows.data();
  const int64_t* cols = plan.cols.data();
  const int64_t* coff = plan.col_offset.data();
  at::Tensor y = at::empty({B, C, Ho, Wo}, x.options());
  const scalar_t* xd = x.data_ptr<scalar_t>();
  const scalar_t* wd = w.data_ptr<scalar_t>();
  scalar_t* yd = y.data_ptr<scalar_t>();
  const int64_t ch = chunk_rows(B * G, Ho, 16), nch = ceil_div(Ho, ch);
  const int64_t nrr_max = max_row_span(rows, Kh, Ho, ch);
  const LastRows lr = LastRows::for_taps(W, Cg, coff, s, Kw, Wo, pad_ok);
  const int64_t pitch = lr.pitch, wpix = wHW == 1 ? 0 : 1;  // static weights: one per tap
  const std::vector<int64_t> cidx = lr.tap_columns(cols, Kw, Wo, coff, s), xoff = lr.elements(nrr_max),
                             pix = strided(ch * Wo, Cg);  // pix: output pixels in the packed buffer
  const bool affine = affine_cl<scalar_t>(Cg, wsrc || wpix == 1, Kw, s, coff, pad_ok);
  // wsrc: the task's weights, copied from the source pixels as (K*K, ch, Wo)
  const SourceWeights sw = wsrc ? SourceWeights(plan) : SourceWeights();
  const int64_t wpitch = round_up(Wo, L), wts = ch * wpitch;
  ThreadScratch scratch(bytes_of({nrr_max * pitch, ch * Wo * Cg, wsrc ? KK * wts : 0}, sizeof(acc_t)));
  at::parallel_for(0, B * G * nch, 1, [&](int64_t t0, int64_t t1) {
    at::Tensor own;
    Carver cv{scratch.base(own)};
    Buf<acc_t> xs = cv.take<acc_t>(nrr_max * pitch), ob = cv.take<acc_t>(ch * Wo * Cg),
               ws = cv.take<acc_t>(wsrc ? KK * wts : 0);
    std::vector<int64_t> rr(Kh);
    for (int64_t task = t0; task < t1; ++task) {
      const TaskAt at(task, G, nch);
      const int64_t b = at.b, g = at.g, i0 = at.c * ch, i1 = std::min(Ho, i0 + ch);
      const auto span = row_span(rows, Kh, Ho, i0, i1);
      const int64_t rmin = span.first, nrr = span.second;
      const scalar_t* xg = xd + ((b * C + g * Cg) * H + rmin) * W;
      to_last(xs.data(), xoff.data(), xg, H * W, Cg, nrr * W);
      const scalar_t* wg = wd + ((wB == 1 ? 0 : b) * G + g) * KK * wHW;
      scalar_t* yg = yd + (b * C + g * Cg) * Ho * Wo;
      if (wsrc) sw.copy(ws.data(), wts, wpitch, wg, KK, wHW, w.size(4), rows, Ho, i0, i1);
      for (int64_t i = i0; i < i1; ++i) {
        for (int64_t u = 0; u < Kh; ++u) {
          const int64_t r = rows[u * Ho + i];
          rr[u] = r >= 0 ? (r - rmin) * pitch : -1;
        }
        acc_t* orow = ob.data() + (i - i0) * Wo * Cg;
        if constexpr (std::is_same<scalar_t, float>::value) {
          if (affine) {
            with_affine(Cg, Kw, s, [&](auto cg, auto kc, auto sc) {
              constexpr int CG = decltype(cg)::value, KA = decltype(kc)::value, SA = decltype(sc)::value;
              affine_blocks<AffineVec<acc_t, CG>::NP>(Wo, [&](auto np, int64_t j) {
                constexpr int NP = decltype(np)::value;
                if (wsrc)
                  agg_pixels_cl_affine<acc_t, acc_t, CG, NP, KA, SA>(xs.data(), rr.data(), cidx[j * Kw], Kh,
                                                                     ws.data() + (i - i0) * wpitch + j, wts,
                                                                     orow + j * CG);
                else
                  agg_pixels_cl_affine<scalar_t, acc_t, CG, NP, KA, SA>(xs.data(), rr.data(), cidx[j * Kw], Kh,
                                                                        wg + i * Wo + j, wHW, orow + j * CG);
              });
            });
            continue;
          }
        }
        pixel_blocks(Wo, Cg / L, [&](auto np, auto nb, int64_t j, int64_t k) {
          constexpr int NB = decltype(nb)::value, NP = decltype(np)::value;
          acc_t* o = orow + j * Cg + k * L;
          if (wsrc)
            agg_pixels_cl<acc_t, acc_t, NB, NP>(xs.data() + k * L, rr.data(), cidx.data() + j * Kw, Kh, Kw,
                                                ws.data() + (i - i0) * wpitch + j, wts, 1, o, Cg);
          else
            agg_pixels_cl<scalar_t, acc_t, NB, NP>(xs.data() + k * L, rr.data(), cidx.data() + j * Kw, Kh, Kw,
                                                   wg + (i * Wo + j) * wpix, wHW, wpix, o, Cg);
        });
      }
      from_last(yg + i0 * Wo, Ho * Wo, ob.data(), pix.data(), Cg, (i1 - i0) * Wo);
    }
  });
  return y;
}

template <typename scalar_t>
at::Tensor aggregate_impl(const at::Tensor& x, const at::Tensor& w, const Plan& plan, bool wsrc = false) {
  const int64_t s = plan.col_stride;
  const bool pad_ok = plan.zero_border;
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int L = VecOf<acc_t>::N;
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t G = w.size(1), KK = w.size(2), Cg = C / G;
  const int64_t Kh = plan.Kh, Ho = plan.Ho, Kw = plan.Kw, Wo = plan.Wo;
  const int64_t wB = w.size(0), wHW = w.size(3) * w.size(4), wW = w.size(4);
  const int64_t block = L;  // one vector of columns per block (measured faster than two)
  // Channels-last on rows under a vector, and at stride > 1 on rows under four vectors (A/B, one
  // thread: 128@28x28 stride 2 -11..-20%, 64@56x56 stride 2 -3..-5%; at stride 1 the column
  // kernels measured faster on rows of two or more vectors), and on rows under four vectors
  // whenever the affine kernel covers the plane (against the column kernels, one thread:
  // 128@28x28 stride 1 -15%, 256@14x14 -10%; 64@56x56 +13%, so wider rows keep them)
  const bool affine = !wsrc && affine_cl<scalar_t>(Cg, wHW > 1, Kw, s, plan.col_offset.data(), pad_ok);
  if ((Wo < L || (!wsrc && s > 1 && Wo < 4 * L) || (affine && Wo < 4 * L)) && Cg % L == 0)
    return aggregate_cl<scalar_t>(x, w, plan, wsrc);
  // direct: weights are read and outputs written in place (no scratch copies) when they are
  // already in the accumulation type and every output row holds a vector (the last block of a
  // row is shifted left to end at Wo, so no read or write leaves the row); with the weights
  // prefetched a row ahead this measured faster than copying (256@14x14: 2.86x -> 2.21x the
  // ceiling). Narrower rows are packed (below).
  const bool direct = !wsrc && std::is_same<scalar_t, acc_t>::value && wHW > 1 && Wo >= L;
  const bool odirect = direct || (wsrc && std::is_same<scalar_t, acc_t>::value && Wo >= L);
  ColPlan p = make_colplan(plan, block, odirect);
  const int64_t* rows = plan.rows.data();
  at::Tensor y = at::empty({B, C, Ho, Wo}, x.options());
  const scalar_t* xd = x.data_ptr<scalar_t>();
  const scalar_t* wd = w.data_ptr<scalar_t>();
  scalar_t* yd = y.data_ptr<scalar_t>();
  // wsrc: rows per task such that the task's weight copy stays within about 96 KiB (the
  // transpose's peak memory is output-sized plus this per-thread scratch)
  const int64_t most = wsrc ? std::min<int64_t>(16, std::max<int64_t>(2, (96 << 10) / (KK * p.wbw * sizeof(acc_t)))) : 16;
  const int64_t ch = chunk_rows(B * G, Ho, most), nch = ceil_div(Ho, ch);
  const int64_t wbw = p.wbw, rowstride = s * p.pw;
  const SourceWeights sw = wsrc ? SourceWeights(plan) : SourceWeights();

  const int64_t nrr_max = max_row_span(rows, Kh, Ho, ch), cstride = nrr_max * rowstride;
  p.plan_fill(nrr_max);
  // copied weights of a task: (K*K, ch, wbw), so each tap plane streams ch rows
  // (+ one cache line, so the K*K tap rows do not all map to the same L1 sets). Rows under
  // a vector are packed (pitch Wo): a tap's rows are then one contiguous copy, and the lanes
  // past Wo that a block reads (the next rows, or the slack) only reach output columns that
  // are dropped.
  const bool packed = !wsrc && !direct && wHW > 1 && Wo < L;
  const int64_t wpitch = packed ? Wo : wbw;
  const int64_t wts = ch * wpitch + 64 / static_cast<int64_t>(sizeof(acc_t));
  ThreadScratch scratch(bytes_of({Cg * nrr_max * rowstride, direct ? 0 : KK * wts, odirect ? 0 : 2 * Cg * wbw},
                                 sizeof(acc_t)));

  at::parallel_for(0, B * G * nch, 1, [&](int64_t t0, int64_t t1) {
    at::Tensor own;
    Carver cv{scratch.base(own)};
    Buf<acc_t> xs = cv.take<acc_t>(Cg * nrr_max * rowstride), wbig = cv.take<acc_t>(direct ? 0 : KK * wts),
               ob = cv.take<acc_t>(odirect ? 0 : 2 * Cg * wbw);
    std::vector<int64_t> rru(2 * Kh), steps(6 * Kh);
    std::vector<char> used(Kh);
    for (int64_t task = t0; task < t1; ++task) {
      const TaskAt at(task, G, nch);
      const int64_t b = at.b, g = at.g, i0 = at.c * ch, i1 = std::min(Ho, i0 + ch);
      const auto span = row_span(rows, Kh, Ho, i0, i1);
      const int64_t rmin = span.first, nrr = span.second;
      if (nrr > 0) {
        fill_rows<scalar_t, acc_t>(xs.data(), cstride, xd + (b * C + g * Cg) * H * W, Cg, H, rmin, nrr, p);
      }
      // the next task's input rows and (when copied) weights, fetched a slice per row below
      Prefetch pfx, pfw;
      if (task + 1 < t1) {
        const TaskAt nt(task + 1, G, nch);
        const int64_t nb = nt.b, ng = nt.g, ni0 = nt.c * ch, ni1 = std::min(Ho, ni0 + ch);
        const auto nspan = row_span(rows, Kh, Ho, ni0, ni1);
        pfx = Prefetch(xd + ((nb * C + ng * Cg) * H + nspan.first) * W, Cg, H * W, nspan.second * W);
        if (wsrc && wHW > 1)
          pfw = Prefetch(wd + ((wB == 1 ? 0 : nb) * G + ng) * KK * wHW + nspan.first * wW, KK, wHW, nspan.second * wW);
        else if (!direct && wHW > 1)
          pfw = Prefetch(wd + ((wB == 1 ? 0 : nb) * G + ng) * KK * wHW + ni0 * Wo, KK, wHW, (ni1 - ni0) * Wo);
      }
      const scalar_t* wg = wd + ((wB == 1 ? 0 : b) * G + g) * KK * wHW;
      scalar_t* yg = yd + (b * C + g * Cg) * Ho * Wo;
      if (packed) {
        for (int64_t t = 0; t < KK; ++t) {
          const scalar_t* src = wg + t * wHW + i0 * Wo;
          acc_t* dst = wbig.data() + t * wts;
          convert(dst, src, (i1 - i0) * Wo);
        }
      } else if (wsrc) {
        sw.copy(wbig.data(), wts, wbw, wg, KK, wHW, wW, rows, Ho, i0, i1);
      } else if (!direct) {
        for (int64_t t = 0; t < KK; ++t) {
          for (int64_t i = i0; i < i1; ++i) {
            acc_t* dst = wbig.data() + t * wts + (i - i0) * wbw;
            if (wHW == 1) {
              std::fill(dst, dst + Wo, static_cast<acc_t>(wg[t]));
            } else {
              const scalar_t* src = wg + t * wHW + i * Wo;
              convert(dst, src, Wo);
            }  // columns [Wo, wbw) stay zero
          }
        }
      }
      for (int64_t i = i0; i < i1;) {
        const int64_t n = i + 1 < i1 ? 2 : 1;  // output rows computed together
        for (int64_t k = 0; k < n; ++k) {
          pfx.slice(i + k - i0, i1 - i0);
          pfw.slice(i + k - i0, i1 - i0);
        }
        tap_scratch_rows(rows, Kh, Ho, i, n, rmin, rru.data());
        // weights of row i + k: tap t at wb + k * wrow + t * wstep + j; outputs of channel c at
        // orow + k * orow2 + c * ostep + j
        const acc_t* wb;
        int64_t wstep, ostep, wrow, orow2;
        acc_t* orow;
        if (direct) {
          wb = reinterpret_cast<const acc_t*>(wg) + i * Wo;
          wstep = wHW;
          wrow = Wo;
        } else {
          wb = wbig.data() + (i - i0) * wpitch;
          wstep = wts;
          wrow = wpitch;
        }
        if (odirect) {
          orow = reinterpret_cast<acc_t*>(yg) + i * Wo;
          ostep = Ho * Wo;
          orow2 = Wo;
        } else {
          orow = ob.data();
          ostep = wbw;
          orow2 = Cg * wbw;
        }
        if (nrr == 0) {
          for (int64_t k = 0; k < n; ++k)
            for (int64_t c = 0; c < Cg; ++c)
              std::fill(orow + k * orow2 + c * ostep, orow + k * orow2 + c * ostep + Wo, acc_t(0));
        } else {
          // channel blocks outer, column blocks inner: the x rows of one channel block (a few
          // KiB) and the weights of the rows stay in L1 while the blocks sweep the rows
          // in place: the first channel block prefetches the next rows' weights, every block
          // its outputs' next rows
          const int64_t ahead = odirect && i + n < Ho ? n * Wo : 0, wahead = direct ? ahead : 0;
          if (n == 2) {
            const int64_t nsteps = row_steps({rru.data(), nullptr, Kh}, {rru.data() + Kh, nullptr, Kh}, true,
                                             used.data(), steps.data());
            channel_blocks2(Cg, [&](auto cb, int64_t c) {
              for_blocks(p, block, [&](int64_t j0) {
                agg_block2<acc_t, decltype(cb)::value>(xs.data() + c * cstride, cstride, rowstride, wb, wstep, wrow, ostep,
                                                       orow2, steps.data(), nsteps, Kw, p.phoff.data(), j0,
                                                       orow + c * ostep, c == 0 ? wahead : 0, ahead);
              });
            });
          } else {
            channel_blocks(Cg, [&](auto cb, int64_t c) {
              for_blocks(p, block, [&](int64_t j0) {
                agg_block<acc_t, decltype(cb)::value>(xs.data() + c * cstride, cstride, rowstride, wb, wstep, ostep,
                                                      rru.data(), Kh, Kw, p.phoff.data(), j0, orow + c * ostep,
                                                      c == 0 ? wahead : 0, ahead);
              });
            });
          }
          // scalar path: columns outside the affine range (clamp-border edges)
          for (int64_t k = 0; k < n && !p.all_fast(); ++k) {
            const int64_t* rk = rru.data() + k * Kh;
            const acc_t* wk = wb + k * wrow;
            acc_t* ok = orow + k * orow2;
            for (int64_t j = 0; j < Wo; ++j) {
              if (in_fast(p, j)) continue;
              for (int64_t c = 0; c < Cg; ++c) {
                const acc_t* xc = xs.data() + c * cstride;
                acc_t acc = 0;
                for (int64_t u = 0; u < Kh; ++u) {
                  if (rk[u] < 0) continue;
                  for (int64_t v = 0; v < Kw; ++v) {
                    int64_t col = p.cols[v * Wo + j];
                    if (col < 0) continue;
                    acc += wk[(u * Kw + v) * wstep + j] * xc[rk[u] * rowstride + p.pos(col)];
                  }
                }
                ok[c * ostep + j] = acc;
              }
            }
          }
        }
        if (!odirect) {
          for (int64_t k = 0; k < n; ++k)
            for (int64_t c = 0; c < Cg; ++c) {
              scalar_t* dst = yg + (c * Ho + i + k) * Wo;
              const acc_t* src = ob.data() + k * orow2 + c * wbw;
              convert(dst, src, Wo);
            }
        }
        i += n;
      }
    }
  });
  return y;
}

// ------------------------------------------------------------------------------ correlate
template <typename acc_t, int TV>
__attribute__((noinline)) void corr_block(const acc_t* ks, int64_t cstride, const acc_t* qs, int64_t qstep, int64_t Cg,
                       const int64_t* phoff, int64_t j0, acc_t* rb, int64_t rstep) {
  using V = typename VecOf<acc_t>::type;
  V acc[TV];
  for (int tv = 0; tv < TV; ++tv) acc[tv] = V{};
  for (int64_t c = 0; c < Cg; ++c) {
    const V qv = loadu(qs + c * qstep + j0);
    const acc_t* kc = ks + c * cstride + j0;
    for (int tv = 0; tv < TV; ++tv) acc[tv] = fmadd(qv, loadu(kc + phoff[tv]), acc[tv]);
  }
  for (int tv = 0; tv < TV; ++tv) storeu(rb + tv * rstep + j0, acc[tv]);
}

// Two output rows i and i + 1 that read input row ks with tap rows u0 and u1: a0 / a1 hold TV
// taps of each row, and each input vector loaded feeds both (8 accumulators, 2 query vectors, 1
// input vector in registers for TV = 4). r0 / r1: the two rows' results of the first tap.
template <typename acc_t, int TV>
__attribute__((noinline)) void corr_block2(const acc_t* ks, int64_t cstride, const acc_t* qs, int64_t qstep, int64_t q2,
                                           int64_t Cg, const int64_t* phoff, int64_t j0, acc_t* r0, acc_t* r1,
                                           int64_t rstep) {
  using V = typename VecOf<acc_t>::type;
  V a0[TV], a1[TV];
  for (int tv = 0; tv < TV; ++tv) a0[tv] = a1[tv] = V{};
  for (int64_t c = 0; c < Cg; ++c) {
    const V q0 = in_register(loadu(qs + c * qstep + j0)), q1 = in_register(loadu(qs + q2 + c * qstep + j0));
    const acc_t* kc = ks + c * cstride + j0;
    for (int tv = 0; tv < TV; ++tv) {
      const V kv = in_register(loadu(kc + phoff[tv]));
      a0[tv] = fmadd(q0, kv, a0[tv]);
      a1[tv] = fmadd(q1, kv, a1[tv]);
    }
  }
  for (int tv = 0; tv < TV; ++tv) storeu(r0 + tv * rstep + j0, a0[tv]), storeu(r1 + tv * rstep + j0, a1[tv]);
}

// ------------------------------------------------- correlate, channels-last narrow planes
// out[m] = sum of the lanes of a[m], m < 8 (8 x 8 register transpose + adds for float).
template <typename V, typename acc_t>
inline void lane_sums8(V (&a)[8], acc_t* out) {
#if defined(__AVX2__)
  if constexpr (std::is_same<acc_t, float>::value) {
    __m256 r[8];
    for (int m = 0; m < 8; ++m) r[m] = (__m256)a[m];
    transpose8x8(r);
    __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(r[0], r[1]), _mm256_add_ps(r[2], r[3])),
                             _mm256_add_ps(_mm256_add_ps(r[4], r[5]), _mm256_add_ps(r[6], r[7])));
    _mm256_storeu_ps(out, s);
    return;
  }
#endif
  for (int m = 0; m < 8; ++m) {
    acc_t t = 0;
    for (int l = 0; l < VecOf<acc_t>::N; ++l) t += a[m][l];
    out[m] = t;
  }
}

// v[l] = p[2 * l], l < L, from the 2L elements at p (the last one unused).
template <typename T>
inline typename VecOf<T>::type even_lanes(const T* p) {
  using V = typename VecOf<T>::type;
#if defined(__AVX2__)
  if constexpr (std::is_same<T, float>::value)
    return (V)phase8<0>(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8));
  else
    return (V)even4(_mm256_loadu_pd(p), _mm256_loadu_pd(p + 4));
#else
  V v;
  for (int l = 0; l < VecOf<T>::N; ++l) v[l] = p[2 * l];
  return v;
#endif
}

// v[l] = p[l * s] for the lanes lo <= l < hi, 0 for the others, reading nothing else (the
// other lanes' addresses may lie outside the tensor): masked loads / gathers.
template <typename T>
inline typename VecOf<T>::type masked_step(const T* p, int64_t s, int64_t lo, int64_t hi) {
  using V = typename VecOf<T>::type;
#if defined(__AVX2__)
  constexpr int L = VecOf<T>::N;
  const __m256i m = lane_range<T>(lo, hi);
  // stride 2: the elements 2 lo .. 2 (hi - 1) of both halves, then the even ones
  const __m256i m0 = lane_range<T>(2 * lo, 2 * hi - 1), m1 = lane_range<T>(2 * lo, 2 * hi - 1, L);
  if constexpr (std::is_same<T, float>::value) {
    if (s == 1) return (V)_mm256_maskload_ps(p, m);
    if (s == 2) return (V)phase8<0>(_mm256_maskload_ps(p, m0), _mm256_maskload_ps(p + L, m1));
    const __m256i idx = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                           _mm256_set1_epi32(static_cast<int>(s)));
    return (V)_mm256_mask_i32gather_ps(_mm256_setzero_ps(), p, idx, _mm256_castsi256_ps(m), 4);
  } else {
    if (s == 1) return (V)_mm256_maskload_pd(p, m);
    if (s == 2) return (V)even4(_mm256_maskload_pd(p, m0), _mm256_maskload_pd(p + L, m1));
    const __m256i idx = _mm256_mul_epi32(_mm256_setr_epi64x(0, 1, 2, 3), _mm256_set1_epi64x(s));
    return (V)_mm256_mask_i64gather_pd(_mm256_setzero_pd(), p, idx, _mm256_castsi256_pd(m), 8);
  }
#else
  V v{};
  for (int64_t l = std::max<int64_t>(lo, 0); l < std::min<int64_t>(hi, VecOf<T>::N); ++l) v[l] = p[l * s];
  return v;
#endif
}

#if defined(__AVX2__)
// 8 bfloat16 / float16 values, as 16-bit integers in the low halves of 32-bit lanes, to float
// (exact: bfloat16 is the high half of a float; float16 through F16C where compiled in).
template <typename scalar_t>
inline __m256 half_to_float(__m256i low16) {
  if constexpr (std::is_same<scalar_t, at::BFloat16>::value) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(low16, 16));
  } else {
#if defined(__F16C__)
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(low16), _mm256_extracti128_si256(low16, 1));
    return _mm256_cvtph_ps(packed);
#else
    alignas(32) int32_t b[8];
    alignas(32) float f[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(b), low16);
    for (int l = 0; l < 8; ++l)
      f[l] = static_cast<float>(c10::Half(static_cast<uint16_t>(b[l]), c10::Half::from_bits()));
    return _mm256_load_ps(f);
#endif
  }
}
#endif

// v[l] = p[S * l], l < L, in the accumulation type (the 16-bit types converted), S = 1 or 2
// (stride 2 reads the 2L elements at p, the last one unused).
template <int S, typename scalar_t>
inline typename VecOf<at::opmath_type<scalar_t>>::type load_acc(const scalar_t* p) {
  static_assert(S == 1 || S == 2, "load_acc: stride 1 or 2");
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (std::is_same<scalar_t, acc_t>::value) {
    if constexpr (S == 1) return loadu(p);
    else return even_lanes(p);
  } else {
#if defined(__AVX2__)
    if constexpr (S == 1) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      return (typename VecOf<acc_t>::type)half_to_float<scalar_t>(_mm256_cvtepu16_epi32(h));
    } else {  // 16 values = 8 32-bit lanes, each holding elements 2l (low half) and 2l + 1
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      return (typename VecOf<acc_t>::type)half_to_float<scalar_t>(_mm256_and_si256(x, _mm256_set1_epi32(0xFFFF)));
    }
#else
    typename VecOf<acc_t>::type v;
    for (int l = 0; l < VecOf<acc_t>::N; ++l) v[l] = static_cast<acc_t>(p[S * l]);
    return v;
#endif
  }
}

// A block of L output columns of NT taps of one tap row, for correlate_tail: out[m * ostep + l]
// = sum over c of q[c * qstep + l] * k[c * kstep + coff[m] + l * s], one fused multiply-add
// chain per output in channel order, in the accumulation type. S = 1 or 2: s compiled in
// (stride 2 loads 2L elements and keeps the even ones: the caller makes sure the odd last one
// is inside the tensor); S = -1: any s, each tap's lanes outside the row's W columns read as
// zeros (a zero border's edge blocks, as the column kernels' zero padding: the same chains),
// with masked loads (the 16-bit types: a plain load with the lanes cleared where it stays
// inside k's tensor [kbeg, kend), else lane by lane). The 16-bit types store lane by lane.
template <typename scalar_t, int NT, int S>
__attribute__((noinline)) void tail_block(const scalar_t* q, int64_t qstep, const scalar_t* k, int64_t kstep,
                                          int64_t Cg, const int64_t* coff, int64_t s, scalar_t* out, int64_t ostep,
                                          int64_t col0 = 0, int64_t W = 0, const scalar_t* kbeg = nullptr,
                                          const scalar_t* kend = nullptr) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = typename VecOf<acc_t>::type;
  constexpr int L = VecOf<acc_t>::N;
  constexpr bool same = std::is_same<scalar_t, acc_t>::value;
  V acc[NT];
  int64_t lo[NT], hi[NT];
  for (int m = 0; m < NT; ++m) {
    acc[m] = V{};
    if constexpr (S == -1) {  // lanes l with 0 <= col0 + coff[m] + l * s < W
      const int64_t c0 = col0 + coff[m];
      lo[m] = c0 >= 0 ? 0 : ceil_div(-c0, s);
      hi[m] = W - 1 - c0 >= 0 ? std::min<int64_t>(L, (W - 1 - c0) / s + 1) : 0;
    }
  }
  for (int64_t c = 0; c < Cg; ++c) {
    const V qv = load_acc<1>(q + c * qstep);
    const scalar_t* kc = k + c * kstep;
    for (int m = 0; m < NT; ++m) {
      V kv;
      if constexpr (S == 1) {
        kv = load_acc<1>(kc + coff[m]);
      } else if constexpr (S == 2) {
        kv = load_acc<2>(kc + coff[m]);
      } else if constexpr (S == -1 && same) {
        kv = masked_step(kc + coff[m], s, lo[m], hi[m]);
      } else if constexpr (S == -1) {  // the 16-bit types
        const scalar_t* p = kc + coff[m];
        bool loaded = false;
#if defined(__AVX2__)
        if (p >= kbeg && p + s * L <= kend && (s == 1 || s == 2)) {
          const V all = s == 1 ? load_acc<1>(p) : load_acc<2>(p);
          kv = (V)_mm256_and_ps((__m256)all, _mm256_castsi256_ps(lane_range<float>(lo[m], hi[m])));
          loaded = true;
        }
#endif
        for (int l = 0; l < L && !loaded; ++l)
          kv[l] = l >= lo[m] && l < hi[m] ? static_cast<acc_t>(p[l * s]) : acc_t(0);
      }
      acc[m] = fmadd(qv, kv, acc[m]);
    }
  }
  for (int m = 0; m < NT; ++m) {
    if constexpr (same) {
      storeu(out + m * ostep, acc[m]);
    } else {
      for (int l = 0; l < L; ++l) out[m * ostep + l] = static_cast<scalar_t>(acc[m][l]);
    }
  }
}

// correlate of the planes [p0, p1) of (batch x group) with no scratch at all (the planes
// correlate lent to its other tasks, see lent_planes): q and k are read in place, each output
// row written once. Every result is the same fused multiply-add chain over the channels, in
// channel order from 0, as the column kernels' (corr_block, corr_block2 and the scalar path),
// so the tail is bit-identical to them. Per (plane, output row, tap row):
// - float rows of at most 8 output and 16 input columns (the 7x7 and 14x14 stages): the whole
//   row at once, each tap's k columns picked by a lane permutation of the k row (index tables
//   from the column table, so any border, stride and dilation);
// - else blocks of L output columns (tail_block), each q vector serving up to 8 taps: where
//   every tap column of the block is affine and inside the image (columns [ja, jb)) plain or
//   stride-2 loads; a zero border's edge blocks with masked loads (taps outside the row read 0);
// - the other columns (the clamp border's edges) through the tables.
// The 16-bit types sum in float32, as the column kernels do; they load and store lane by lane.
template <typename scalar_t>
void correlate_tail(const scalar_t* qd, const scalar_t* qend, const scalar_t* kd, const scalar_t* kend, scalar_t* od,
                    int64_t p0, int64_t p1, int64_t Cg, int64_t H, int64_t W, int64_t Ho, int64_t Wo,
                    const int64_t* rows, int64_t Kh, const int64_t* cols, int64_t Kw, const int64_t* coff, int64_t s,
                    int64_t fa, int64_t fb) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int L = VecOf<acc_t>::N;
  const int64_t KK = Kh * Kw;
  int64_t ja = std::max<int64_t>(fa, 0), jb = std::min(fb, Wo);
  for (int64_t v = 0; v < Kw; ++v) {  // in the image: 0 <= j * s + coff[v] < W
    ja = std::max(ja, ceil_div(std::max<int64_t>(-coff[v], 0), s));
    jb = std::min(jb, W - 1 - coff[v] >= 0 ? (W - 1 - coff[v]) / s + 1 : 0);
  }
  const bool vec = jb - ja >= L;
  if (!vec) ja = jb = 0;
  // a zero border's table (every column affine, -1 outside the image): the edge blocks mask
  bool zero_affine = Wo >= L;
  for (int64_t v = 0; v < Kw && zero_affine; ++v)
    for (int64_t j = 0; j < Wo; ++j) {
      const int64_t col = j * s + coff[v];
      zero_affine = zero_affine && cols[v * Wo + j] == (col >= 0 && col < W ? col : -1);
    }
#if defined(__AVX2__)
  const bool narrow = std::is_same<acc_t, float>::value && Wo <= 8 && W <= 16;
  std::vector<int32_t> pidx(narrow ? Kw * 8 : 0);  // per tap column v, lane j: its input column, -1 = none
  for (int64_t v = 0; v < (narrow ? Kw : 0); ++v)
    for (int64_t j = 0; j < 8; ++j) pidx[v * 8 + j] = j < Wo ? static_cast<int32_t>(cols[v * Wo + j]) : -1;
#else
  const bool narrow = false;
#endif
  // per (plane, output row): its tap rows one after the other, so its q rows and the k rows
  // (shared with the next output row) stay in L1
  at::parallel_for(0, (p1 - p0) * Ho, 1, [&](int64_t a0, int64_t a1) {
    for (int64_t au = a0 * Kh; au < a1 * Kh; ++au) {
      const int64_t pl = p0 + au / (Kh * Ho), i = (au / Kh) % Ho, u = au % Kh;
      const int64_t r = rows[u * Ho + i];
      scalar_t* o = od + ((pl * KK + u * Kw) * Ho + i) * Wo;  // tap (u, v) at o + v * Ho * Wo
      if (r < 0) {
        for (int64_t v = 0; v < Kw; ++v) std::fill(o + v * Ho * Wo, o + v * Ho * Wo + Wo, scalar_t(0));
        continue;
      }
      const scalar_t* q = qd + pl * Cg * Ho * Wo + i * Wo;  // channel c at q + c * Ho * Wo
      const scalar_t* k = kd + pl * Cg * H * W + r * W;     // channel c at k + c * H * W
#if defined(__AVX2__)
      if constexpr (std::is_same<acc_t, float>::value) {
        if (narrow) {
          // the n <= 8 elements at p (the 16-bit types converted), zeros after them; reads
          // past them only inside the tensor (end)
          auto row8 = [](const scalar_t* p, int64_t n, const scalar_t* end) {
            if constexpr (std::is_same<scalar_t, float>::value) {
              return _mm256_maskload_ps(p, lane_range<float>(0, n));
            } else {
              if (p + 8 <= end)
                return _mm256_and_ps((__m256)load_acc<1>(p), _mm256_castsi256_ps(lane_range<float>(0, n)));
              alignas(32) float t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
              for (int64_t j = 0; j < n; ++j) t[j] = static_cast<float>(p[j]);
              return _mm256_load_ps(t);
            }
          };
          for (int64_t v0 = 0; v0 < Kw; v0 += 8)
            with_count<8>(Kw - v0, [&](auto tv) {
              constexpr int NT = decltype(tv)::value;
              __m256i idx[NT], hi[NT], ok[NT];
              for (int m = 0; m < NT; ++m) {
                const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pidx.data() + (v0 + m) * 8));
                idx[m] = c;  // permutevar uses the low 3 bits
                hi[m] = _mm256_cmpgt_epi32(c, _mm256_set1_epi32(7));
                ok[m] = _mm256_cmpgt_epi32(c, _mm256_set1_epi32(-1));
              }
              __m256 acc[NT];
              for (int m = 0; m < NT; ++m) acc[m] = _mm256_setzero_ps();
              for (int64_t c = 0; c < Cg; ++c) {
                const __m256 qv = row8(q + c * Ho * Wo, Wo, qend);
                const scalar_t* kc = k + c * H * W;
                const __m256 k0 = row8(kc, std::min<int64_t>(W, 8), kend);
                const __m256 k1 = row8(kc + 8, std::max<int64_t>(W - 8, 0), kend);
                for (int m = 0; m < NT; ++m) {
                  const __m256 kv = _mm256_blendv_ps(_mm256_permutevar8x32_ps(k0, idx[m]),
                                                     _mm256_permutevar8x32_ps(k1, idx[m]), _mm256_castsi256_ps(hi[m]));
                  acc[m] = _mm256_fmadd_ps(qv, _mm256_and_ps(kv, _mm256_castsi256_ps(ok[m])), acc[m]);
                }
              }
              for (int m = 0; m < NT; ++m) {
                alignas(32) float t[8];
                _mm256_store_ps(t, acc[m]);
                std::copy(t, t + Wo, o + (v0 + m) * Ho * Wo);
              }
            });
          continue;
        }
      }
#endif
      if (vec || zero_affine) {
        auto block = [&](int64_t j0) {
          // stride 2 reads one element past a block's last column: past the tensor only on
          // its very last row, which then goes through masked loads
          const bool two = s == 2 && k + (Cg - 1) * H * W + j0 * s + coff[Kw - 1] + 2 * L <= kend;
          const bool edge = j0 < ja || j0 + L > jb;
          for (int64_t v0 = 0; v0 < Kw; v0 += 8)
            with_count<8>(Kw - v0, [&](auto tv) {
              constexpr int NT = decltype(tv)::value;
              const scalar_t* qj = q + j0;
              const scalar_t* kj = k + j0 * s;
              scalar_t* oj = o + v0 * Ho * Wo + j0;
              if (!edge && s == 1)
                tail_block<scalar_t, NT, 1>(qj, Ho * Wo, kj, H * W, Cg, coff + v0, s, oj, Ho * Wo);
              else if (!edge && two)
                tail_block<scalar_t, NT, 2>(qj, Ho * Wo, kj, H * W, Cg, coff + v0, s, oj, Ho * Wo);
              else  // edges, other strides (every lane inside the row: none cleared)
                tail_block<scalar_t, NT, -1>(qj, Ho * Wo, kj, H * W, Cg, coff + v0, s, oj, Ho * Wo, j0 * s, W, kd,
                                             kend);
            });
        };
        if (zero_affine) {  // blocks over the whole row, the edge ones masked
          int64_t j0 = 0;
          for (; j0 + L <= Wo; j0 += L) block(j0);
          if (j0 < Wo) block(Wo - L);  // the last block shifted left: recomputes a few columns
          continue;
        }
        int64_t j0 = ja;
        for (; j0 + L <= jb; j0 += L) block(j0);
        if (j0 < jb) block(jb - L);
      }
      for (int64_t j = 0; j < Wo; ++j) {
        if (j >= ja && j < jb) continue;
        for (int64_t v = 0; v < Kw; ++v) {
          const int64_t col = cols[v * Wo + j];
          acc_t acc = 0;
          if (col >= 0)
            for (int64_t c = 0; c < Cg; ++c)
              acc = std::fma(static_cast<acc_t>(q[c * Ho * Wo + j]), static_cast<acc_t>(k[c * H * W + col]), acc);
          o[v * Ho * Wo + j] = static_cast<scalar_t>(acc);
        }
      }
    }
  });
}

// The taps of Wo pixels of one output row, 8 at a time: each tap's NV channel vectors of the
// pixel's q (the gradient) times its input pixel's, summed over lanes. trow[t] + tcol[j * KKp
// + t]: scratch offset of tap t of pixel j (taps outside the image and the padding taps
// t >= K*K read a zero pixel); results at out[j * KKp + t].
// Only the blocks from tap ta on, up to tap tb, are computed (the taps before ta and from the
// end of the last block on read zeros only): out holds zeros there.
template <typename acc_t>
__attribute__((noinline)) void corr_row_cl(const acc_t* xs, const int64_t* trow, const int64_t* tcol, int64_t KKp,
                                           int64_t ta, int64_t tb, int64_t Wo, const acc_t* q, int64_t NV,
                                           acc_t* out) {
  using V = typename VecOf<acc_t>::type;
  constexpr int L = VecOf<acc_t>::N;
  for (int64_t j = 0; j < Wo; ++j) {
    const acc_t* qj = q + j * NV * L;
    const int64_t* tc = tcol + j * KKp;
    std::fill(out + j * KKp, out + j * KKp + ta, acc_t(0));
    int64_t t0 = ta;
    for (; t0 < tb; t0 += 8) {
      V a[8];
      for (int m = 0; m < 8; ++m) a[m] = V{};
      int64_t k = 0;
      for (; k + 2 <= NV; k += 2) {
        const V q0 = in_register(loadu(qj + k * L)), q1 = in_register(loadu(qj + (k + 1) * L));
        for (int m = 0; m < 8; ++m) {
          const acc_t* xp = xs + trow[t0 + m] + tc[t0 + m] + k * L;
          a[m] += q0 * loadu(xp) + q1 * loadu(xp + L);
        }
      }
      if (k < NV) {
        const V q0 = loadu(qj + k * L);
        for (int m = 0; m < 8; ++m) a[m] += q0 * loadu(xs + trow[t0 + m] + tc[t0 + m] + k * L);
      }
      lane_sums8(a, out + j * KKp + t0);
    }
    std::fill(out + j * KKp + t0, out + (j + 1) * KKp, acc_t(0));
  }
}

template <typename scalar_t>
at::Tensor correlate_cl(const at::Tensor& q, const at::Tensor& k, const Plan& plan, int64_t G) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int L = VecOf<acc_t>::N;
  const int64_t B = q.size(0), C = q.size(1), H = k.size(2), W = k.size(3), Cg = C / G;
  const int64_t Kh = plan.Kh, Ho = plan.Ho, Kw = plan.Kw, Wo = plan.Wo;
  const int64_t KK = Kh * Kw, KKp = round_up(KK + 7, 8);  // a block starting at any tap < K*K fits
  const int64_t* rows = plan.rows.data();
  const int64_t* cols = plan.cols.data();
  at::Tensor out = at::empty({B, G, KK, Ho, Wo}, q.options());
  const scalar_t* qd = q.data_ptr<scalar_t>();
  const scalar_t* kd = k.data_ptr<scalar_t>();
  scalar_t* od = out.data_ptr<scalar_t>();
  const int64_t ch = chunk_rows(B * G, Ho, 16), nch = ceil_div(Ho, ch);
  const int64_t nrr_max = max_row_span(rows, Kh, Ho, ch);
  const LastRows lr(W, Cg);
  const int64_t pitch = lr.pitch, zero_row = nrr_max * pitch;  // never written: zeros
  const std::vector<int64_t> cidx = lr.tap_columns(cols, Kw, Wo), xoff = lr.elements(nrr_max),
                             qoff = strided(ch * Wo, Cg), roff = strided(ch * Wo, KKp);
  std::vector<int64_t> tcol(Wo * KKp, 0);  // per tap t = u * Kw + v: its column's offset
  for (int64_t j = 0; j < Wo; ++j)
    for (int64_t t = 0; t < KK; ++t) tcol[j * KKp + t] = cidx[j * Kw + t % Kw];
  auto per_thread = [&](int64_t rows_per_task, int64_t nrr) {
    return bytes_of({(nrr + 1) * pitch, rows_per_task * Wo * Cg, rows_per_task * Wo * KKp}, sizeof(acc_t));
  };
  const int64_t ch_max = max_chunk_rows(Ho, 16), plane = KK * Ho * Wo;
  const int64_t need = kLendThreads * per_thread(ch_max, max_row_span(rows, Kh, Ho, ch_max));
  const int64_t lent = lent_planes(B * G, plane * sizeof(scalar_t), need);
  ThreadScratch scratch(per_thread(ch, nrr_max), reinterpret_cast<char*>(od + (B * G - lent) * plane),
                        lent * plane * sizeof(scalar_t));
  at::parallel_for(0, (B * G - lent) * nch, 1, [&](int64_t t0, int64_t t1) {
    at::Tensor own;
    Carver cv{scratch.base(own)};
    Buf<acc_t> xs = cv.take<acc_t>((nrr_max + 1) * pitch), qs = cv.take<acc_t>(ch * Wo * Cg),
               rb = cv.take<acc_t>(ch * Wo * KKp);
    std::vector<int64_t> trow(KKp, zero_row);
    for (int64_t task = t0; task < t1; ++task) {
      const TaskAt at(task, G, nch);
      const int64_t b = at.b, g = at.g, i0 = at.c * ch, i1 = std::min(Ho, i0 + ch);
      const auto span = row_span(rows, Kh, Ho, i0, i1);
      const int64_t rmin = span.first, nrr = span.second;
      to_last(xs.data(), xoff.data(), kd + ((b * C + g * Cg) * H + rmin) * W, H * W, Cg, nrr * W);
      to_last(qs.data(), qoff.data(), qd + (b * C + g * Cg) * Ho * Wo + i0 * Wo, Ho * Wo, Cg, (i1 - i0) * Wo);
      for (int64_t i = i0; i < i1; ++i) {
        int64_t ta = KK, tb = 0;  // taps of the first and past the last tap row inside the image
        for (int64_t t = 0; t < KK; ++t) {
          const int64_t r = rows[(t / Kw) * Ho + i];
          trow[t] = r >= 0 ? (r - rmin) * pitch : zero_row;
          if (r >= 0) ta = std::min(ta, t), tb = t + 1;
        }
        ta = std::min(ta, tb);
        corr_row_cl(xs.data(), trow.data(), tcol.data(), KKp, ta, tb, Wo, qs.data() + (i - i0) * Wo * Cg, Cg / L,
                    rb.data() + (i - i0) * Wo * KKp);
      }
      from_last(od + (b * G + g) * KK * Ho * Wo + i0 * Wo, Ho * Wo, rb.data(), roff.data(), KK, (i1 - i0) * Wo);
    }
  });
  if (lent > 0)
    correlate_tail(qd, qd + q.numel(), kd, kd + k.numel(), od, B * G - lent, B * G, Cg, H, W, Ho, Wo, rows, Kh,
                   cols, Kw, plan.col_offset.data(), plan.col_stride, plan.affine_begin, plan.affine_end);
  return out;
}

template <typename scalar_t>
at::Tensor correlate_impl(const at::Tensor& q, const at::Tensor& k, const Plan& plan, int64_t G, bool sum_batch,
                          bool sum_space) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int L = VecOf<acc_t>::N;
  const int64_t B = q.size(0), C = q.size(1), H = k.size(2), W = k.size(3), Cg = C / G;
  const int64_t Kh = plan.Kh, Ho = plan.Ho, Kw = plan.Kw, Wo = plan.Wo;
  const int64_t KK = Kh * Kw;
  // rows of at most half a vector (the column layout leaves half the lanes idle): channels-last
  if (2 * Wo <= L && Cg % L == 0 && !sum_batch && !sum_space)
    return correlate_cl<scalar_t>(q, k, plan, G);
  // direct: q rows are read in place (one dtype, rows of a vector or more; the last block of a row
  // is shifted left to end at Wo, so no read leaves the row)
  const bool direct = std::is_same<scalar_t, acc_t>::value && Wo >= L;
  ColPlan p = make_colplan(plan, L, direct);
  const int64_t* rows = plan.rows.data();
  const int64_t nb = sum_batch ? 1 : B;
  at::Tensor out = at::empty({nb, G, KK, sum_space ? 1 : Ho, sum_space ? 1 : Wo}, q.options());
  const scalar_t* qd = q.data_ptr<scalar_t>();
  const scalar_t* kd = k.data_ptr<scalar_t>();
  scalar_t* od = out.data_ptr<scalar_t>();
  // rows per task: up to 16 where the packed result buffer stays within about 96 KiB (it is
  // part of the scratch the result's last planes lend), fewer rows re-copy more shared input rows
  const int64_t most = std::min<int64_t>(16, std::max<int64_t>(8, (96 << 10) / (KK * Wo * sizeof(acc_t))));
  const int64_t wbw = p.wbw, rowstride = p.s * p.pw;
  // packed: per-pixel results go to a per-task buffer of pitch Wo (a block's lanes past Wo land
  // on the next row, which is computed after it, or in the slack), so each tap's rows are one
  // contiguous copy out; measured faster than storing rows in place into the K*K planes. A
  // large float32 result is written with streaming stores (no read of the lines it replaces).
  const bool packed = !sum_batch && !sum_space;
  const bool stream = std::is_same<scalar_t, float>::value && out.numel() * 4 > (8 << 20);
  const bool narrow_in_place = std::is_same<scalar_t, acc_t>::value && packed && Wo < L;
  // scratch per thread for tasks of `rows_per_task` output rows: the input rows they read, two
  // rows of q (when copied), the results (packed: all of the task's; else two rows, for the
  // two-row blocks) and a batch sum's accumulators
  auto per_thread = [&](int64_t rows_per_task) {
    const int64_t nrr = max_row_span(rows, Kh, Ho, rows_per_task);
    const int64_t tp = packed ? rows_per_task * Wo + L : wbw;
    const int64_t nacc = sum_batch && !sum_space ? KK * rows_per_task * Wo : 0;
    return bytes_of({Cg * nrr * rowstride, direct ? 0 : 2 * Cg * wbw, KK * tp * (packed ? 1 : 2), nacc},
                    sizeof(acc_t));
  };
  // per-pixel results: the last planes lend the scratch (lent_planes; the tail sums in this
  // kernel's order, so how many it takes may depend on the thread count). Where the threads'
  // scratch needs too many planes, fewer rows per task (halved down to 2: the results do not
  // depend on the chunking) make it fit; the rows per task otherwise only trade row copies.
  int64_t ch = chunk_rows(nb * G, Ho, most), lent = 0;
  const int64_t plane = KK * Ho * Wo, nthreads = std::max<int64_t>(1, at::get_num_threads());
  for (int64_t c = ch; packed; c = std::max<int64_t>(2, (c / 2) & ~int64_t(1))) {
    lent = lent_planes(nb * G, plane * sizeof(scalar_t), nthreads * per_thread(c));
    if (lent > 0) ch = c;
    if (lent > 0 || c <= 2) break;
  }
  const int64_t nch = ceil_div(Ho, ch), ntask = nb * G * nch;
  // spatial sums: one partial per (output row, tap), reduced over the rows in a fixed order
  // afterwards (not per task: the rows per task depend on the thread count, the sums must not)
  at::Tensor part_t;  // (none otherwise: not even an element, the peak is the output's alone)
  double* part = nullptr;
  if (sum_space) {
    part_t = at::zeros({nb * G * Ho * KK}, at::TensorOptions().dtype(at::kDouble));
    part = part_t.data_ptr<double>();
  }
  const int64_t nrr_max = max_row_span(rows, Kh, Ho, ch), cstride = nrr_max * rowstride;
  p.plan_fill(nrr_max);
  const int64_t nacc = sum_batch && !sum_space ? KK * ch * Wo : 0;
  const int64_t rtp = packed ? ch * Wo + L : wbw;  // tap pitch of the result rows
  ThreadScratch scratch(per_thread(ch), reinterpret_cast<char*>(od + (nb * G - lent) * plane),
                        lent * plane * sizeof(scalar_t));

  at::parallel_for(0, ntask - lent * nch, 1, [&](int64_t t0, int64_t t1) {
    at::Tensor own;
    Carver cv{scratch.base(own)};
    Buf<acc_t> ks = cv.take<acc_t>(Cg * nrr_max * rowstride), qs = cv.take<acc_t>(direct ? 0 : 2 * Cg * wbw),
               rb = cv.take<acc_t>(KK * rtp * (packed ? 1 : 2)), accb = cv.take<acc_t>(nacc);
    std::vector<int64_t> rru(2 * Kh), steps(6 * Kh), order(2 * Kh);
    std::vector<char> used(Kh);
    for (int64_t task = t0; task < t1; ++task) {
      const TaskAt at(task, G, nch);
      const int64_t bb = at.b, g = at.g, i0 = at.c * ch, i1 = std::min(Ho, i0 + ch);
      const auto span = row_span(rows, Kh, Ho, i0, i1);
      const int64_t rmin = span.first, nrr = span.second;
      std::fill(accb.begin(), accb.end(), acc_t(0));
      const int64_t b0 = sum_batch ? 0 : bb, b1 = sum_batch ? B : bb + 1;
      for (int64_t b = b0; b < b1; ++b) {
        if (nrr > 0) {
          fill_rows<scalar_t, acc_t>(ks.data(), cstride, kd + (b * C + g * Cg) * H * W, Cg, H, rmin, nrr, p);
        }
        // what comes next (the next batch element of a batch sum, else the next task): its k and
        // q rows, fetched a slice per row below
        Prefetch pfk, pfq;
        {
          int64_t nb = -1, ng = g, ni0 = i0, ni1 = i1;
          if (b + 1 < b1) {
            nb = b + 1;
          } else if (task + 1 < t1) {
            const TaskAt nt(task + 1, G, nch);
            nb = sum_batch ? 0 : nt.b, ng = nt.g;
            ni0 = nt.c * ch, ni1 = std::min(Ho, ni0 + ch);
          }
          if (nb >= 0) {
            const auto nspan = row_span(rows, Kh, Ho, ni0, ni1);
            pfk = Prefetch(kd + ((nb * C + ng * Cg) * H + nspan.first) * W, Cg, H * W, nspan.second * W);
            pfq = Prefetch(qd + ((nb * C + ng * Cg) * Ho + ni0) * Wo, Cg, Ho * Wo, (ni1 - ni0) * Wo);
          }
        }
        for (int64_t i = i0; i < i1;) {
          const int64_t n = i + 1 < i1 ? 2 : 1;  // output rows computed together
          for (int64_t k = 0; k < n; ++k) {
            pfk.slice(i + k - i0, i1 - i0);
            pfq.slice(i + k - i0, i1 - i0);
          }
          // q row i + k of channel c at qrow[k * q2 + c * qstep + j]; tap t of row i + k of the
          // result at rrow[k * rrow2 + t * rstep + j]
          const acc_t* qrow = qs.data();
          int64_t qstep = wbw, q2 = Cg * wbw;
          // rows under a vector (packed results) are read in place too, where a block's full
          // vector stays inside q: the lanes past Wo only reach results that are overwritten
          const bool over = !direct && narrow_in_place &&
                            ((b * C + g * Cg + Cg - 1) * Ho + i + n - 1) * Wo + L <= q.numel();
          if (direct || over) {
            qrow = reinterpret_cast<const acc_t*>(qd) + ((b * C + g * Cg) * Ho + i) * Wo;
            qstep = Ho * Wo;
            q2 = Wo;
          } else {
            for (int64_t k = 0; k < n; ++k)
              for (int64_t c = 0; c < Cg; ++c) {
                const scalar_t* src = qd + ((b * C + g * Cg + c) * Ho + i + k) * Wo;
                acc_t* dst = qs.data() + k * q2 + c * wbw;
                convert(dst, src, Wo);
              }  // columns [Wo, wbw) stay zero
          }
          acc_t* rrow = rb.data() + (packed ? (i - i0) * Wo : 0);
          const int64_t rstep = rtp, rrow2 = packed ? Wo : KK * rtp;
          tap_scratch_rows(rows, Kh, Ho, i, n, rmin, rru.data());
          // (input row, tap row of row i, of row i + 1): paired where both rows read the row.
          // Blocks that overrun a packed row write into the next row's start, which must then be
          // computed later: (i, t) no later than (i + 1, t). That holds for both borders of
          // Window (rows non-decreasing in i); a geometry where it did not goes one row at a time
          const TapList r0{rru.data(), nullptr, Kh}, r1{rru.data() + Kh, nullptr, n == 2 ? Kh : 0};
          int64_t nsteps = row_steps(r0, r1, true, used.data(), steps.data());
          if (n == 2 && p.fb > Wo && packed && !later_rows_later(steps.data(), nsteps, Kh, order.data()))
            nsteps = row_steps(r0, r1, false, used.data(), steps.data());
          for (int64_t a = 0; a < nsteps; ++a) {
            const int64_t u0 = steps[3 * a + 1], u1 = steps[3 * a + 2];
            const acc_t* kr = ks.data() + steps[3 * a] * rowstride;
            acc_t* rb0 = rrow + u0 * Kw * rstep;
            acc_t* rb1 = rrow + rrow2 + u1 * Kw * rstep;
            for_blocks(p, L, [&](int64_t j0) {
              if (u0 >= 0 && u1 >= 0) {
                // taps in near-equal chunks of at most 6 (7 = 4 + 3)
                const int64_t nchunk = ceil_div(Kw, 6);
                for (int64_t q = 0, v0 = 0; q < nchunk; ++q) {
                  const int64_t v1 = (q + 1) * Kw / nchunk;
                  with_count<6>(v1 - v0, [&](auto tv) {
                    corr_block2<acc_t, decltype(tv)::value>(kr, cstride, qrow, qstep, q2, Cg, p.phoff.data() + v0, j0,
                                                            rb0 + v0 * rstep, rb1 + v0 * rstep, rstep);
                  });
                  v0 = v1;
                }
                return;
              }
              const acc_t* qk = u0 >= 0 ? qrow : qrow + q2;
              acc_t* rk = u0 >= 0 ? rb0 : rb1;
              for (int64_t v0 = 0; v0 < Kw; v0 += 8)
                with_count<8>(Kw - v0, [&](auto tv) {
                  corr_block<acc_t, decltype(tv)::value>(kr, cstride, qk, qstep, Cg, p.phoff.data() + v0, j0,
                                                         rk + v0 * rstep, rstep);
                });
            });
          }
          for (int64_t k = 0; k < n; ++k) {
            const acc_t* qk = qrow + k * q2;
            acc_t* rk = rrow + k * rrow2;
            for (int64_t u = 0; u < Kh; ++u) {
              const int64_t r = rru[k * Kh + u];
              acc_t* rbu = rk + u * Kw * rstep;
              if (r < 0) {
                for (int64_t v = 0; v < Kw; ++v) std::fill(rbu + v * rstep, rbu + v * rstep + Wo, acc_t(0));
                continue;
              }
              // scalar path: columns outside the affine range (clamp-border edges)
              const acc_t* kr = ks.data() + r * rowstride;
              for (int64_t j = 0; j < Wo && !p.all_fast(); ++j) {
                if (in_fast(p, j)) continue;
                for (int64_t v = 0; v < Kw; ++v) {
                  const int64_t col = p.cols[v * Wo + j];
                  acc_t acc = 0;
                  if (col >= 0) {
                    const int64_t pc = p.pos(col);
                    for (int64_t c = 0; c < Cg; ++c) acc = std::fma(qk[c * qstep + j], kr[c * cstride + pc], acc);
                  }
                  rbu[v * rstep + j] = acc;
                }
              }
            }
            // per-pixel results stay in the packed buffer until the task's rows are done (below)
            if (sum_space) {
              double* pt = part + ((at.b * G + g) * Ho + i + k) * KK;
              for (int64_t t = 0; t < KK; ++t) {
                double sacc = 0;
                const acc_t* r = rk + t * rstep;
                for (int64_t j = 0; j < Wo; ++j) sacc += static_cast<double>(r[j]);
                pt[t] += sacc;
              }
            } else if (sum_batch) {
              for (int64_t t = 0; t < KK; ++t) {
                acc_t* dst = accb.data() + (t * ch + (i + k - i0)) * Wo;
                const acc_t* r = rk + t * rstep;
                for (int64_t j = 0; j < Wo; ++j) dst[j] += r[j];
              }
            }
          }
          i += n;
        }
        if (packed)
          for (int64_t t = 0; t < KK; ++t) {
            scalar_t* dst = od + (((b * G + g) * KK + t) * Ho + i0) * Wo;
            const acc_t* r = rb.data() + t * rtp;
            const int64_t n = (i1 - i0) * Wo;
            int64_t j = 0;
#if defined(__AVX2__)
            if constexpr (std::is_same<scalar_t, float>::value) {
              if (stream) {
                float* d = reinterpret_cast<float*>(dst);
                for (; j < n && (reinterpret_cast<uintptr_t>(d + j) & 31); ++j) d[j] = r[j];
                for (; j + 8 <= n; j += 8) _mm256_stream_ps(d + j, _mm256_loadu_ps(r + j));
              }
            }
#endif
            convert(dst + j, r + j, n - j);
          }
#if defined(__AVX2__)
        if (stream) _mm_sfence();  // streaming stores are weakly ordered: drain them in this task
#endif
      }
      if (sum_batch && !sum_space) {
        for (int64_t t = 0; t < KK; ++t)
          for (int64_t i = i0; i < i1; ++i) {
            scalar_t* dst = od + ((g * KK + t) * Ho + i) * Wo;
            const acc_t* src = accb.data() + (t * ch + (i - i0)) * Wo;
            convert(dst, src, Wo);
          }
      }
    }
  });
  if (sum_space) {
    for (int64_t bb = 0; bb < nb; ++bb)
      for (int64_t g = 0; g < G; ++g)
        for (int64_t t = 0; t < KK; ++t) {
          double sacc = 0;
          for (int64_t i = 0; i < Ho; ++i) sacc += part[((bb * G + g) * Ho + i) * KK + t];
          od[(bb * G + g) * KK + t] = static_cast<scalar_t>(sacc);
        }
  }
  if (lent > 0)
    correlate_tail(qd, qd + q.numel(), kd, kd + k.numel(), od, nb * G - lent, nb * G, Cg, H, W, Ho, Wo, rows, Kh,
                   plan.cols.data(), Kw, plan.col_offset.data(), plan.col_stride, plan.affine_begin, plan.affine_end);
  return out;
}

// -------------------------------------------------------------------- aggregate_transpose
// x[c, h, col] = sum over (u, i) with rows[u][i] = h and (v, j) with cols[v][j] = col of
// w[t, i, j] * y[c, i, j]. Affine columns: col + padc = s*m + phase_v with j = m - e_v, so for
// a fixed phase the sum over taps is unit-stride in m. Output-side scratch (y and w rows of
// the task) is zero-padded by lp on the left so that j = m - e_v outside [0, Wo) reads 0.
// One vector of phase-row entries [m0, m0 + L) for CB channels over the (tap, output) pairs.
template <typename acc_t, int CB>
__attribute__((noinline)) void tr_block(const acc_t* ys, const acc_t* wb, int64_t cplane, int64_t tplane, int64_t lpw,
                     const int64_t* ru, const int64_t* ri, int64_t p0, int64_t p1, int64_t imin, const int64_t* vl,
                     int64_t nv, int64_t Kw, const int64_t* base, int64_t m0, acc_t* xo, int64_t obw) {
  using V = typename VecOf<acc_t>::type;
  V acc[CB];
  for (int c = 0; c < CB; ++c) acc[c] = V{};
  for (int64_t pp = p0; pp < p1; ++pp) {
    const int64_t u = ru[pp], ii = ri[pp] - imin;
    for (int64_t a = 0; a < nv; ++a) {
      const int64_t v = vl[a];
      const int64_t off = ii * lpw + base[v] + m0;
      const acc_t* wp = wb + (u * Kw + v) * tplane + off;
      const acc_t* yp = ys + off;
      const V wv = loadu(wp);
      for (int c = 0; c < CB; ++c) acc[c] += wv * loadu(yp + c * cplane);
    }
  }
  for (int c = 0; c < CB; ++c) storeu(xo + c * obw + m0, acc[c]);
}

// tr_block for two input rows (outputs x2 apart) over the steps of row_steps (key: output row).
template <typename acc_t, int CB>
__attribute__((noinline)) void tr_block2(const acc_t* ys, const acc_t* wb, int64_t cplane, int64_t tplane, int64_t lpw,
                                         const int64_t* steps, int64_t nsteps, int64_t imin, const int64_t* vl,
                                         int64_t nv, int64_t Kw, const int64_t* base, int64_t m0, acc_t* xo,
                                         int64_t obw, int64_t x2) {
  using V = typename VecOf<acc_t>::type;
  V a0[CB], a1[CB];
  for (int c = 0; c < CB; ++c) a0[c] = a1[c] = V{};
  for (int64_t k = 0; k < nsteps; ++k) {
    const int64_t ii = steps[3 * k] - imin, u0 = steps[3 * k + 1], u1 = steps[3 * k + 2];
    if (u0 >= 0 && u1 >= 0) {
      for (int64_t a = 0; a < nv; ++a) {
        const int64_t v = vl[a], off = ii * lpw + base[v] + m0;
        const V w0 = loadu(wb + (u0 * Kw + v) * tplane + off), w1 = loadu(wb + (u1 * Kw + v) * tplane + off);
        const acc_t* yp = ys + off;
        for (int c = 0; c < CB; ++c) {
          const V yv = in_register(loadu(yp + c * cplane));
          a0[c] += w0 * yv;
          a1[c] += w1 * yv;
        }
      }
    } else {  // an output row read by one of the two only
      auto one = [&](V(&acc)[CB], int64_t u) {
        for (int64_t a = 0; a < nv; ++a) {
          const int64_t v = vl[a], off = ii * lpw + base[v] + m0;
          const V wv = loadu(wb + (u * Kw + v) * tplane + off);
          for (int c = 0; c < CB; ++c) acc[c] += wv * loadu(ys + off + c * cplane);
        }
      };
      if (u0 >= 0)
        one(a0, u0);
      else
        one(a1, u1);
    }
  }
  for (int c = 0; c < CB; ++c) storeu(xo + c * obw + m0, a0[c]), storeu(xo + x2 + c * obw + m0, a1[c]);
}

// ------------------------------------------ aggregate_transpose, channels-last narrow planes
// The same layout for the transpose (gradient of x): a task owns a band of input rows of one
// (batch, group), accumulated channels-last in scratch (rows of W + 1 pixels; taps outside the
// image land in column W, taps on rows outside the band are skipped, and neither is read
// back). Every output row reading the band adds its taps that land there: each output pixel's
// gradient vectors stay in registers while its taps add weight x gradient to their input
// pixels. Each (pixel, tap) product is computed once, in the band of its input row, and every
// input pixel sums its terms in the same order (output row, tap, ...) whatever the bands.
template <typename scalar_t, typename acc_t, int NB, int NP>
__attribute__((noinline)) void tr_pixels_cl(acc_t* gs, const int64_t* rr, const int64_t* cidx, int64_t Kh, int64_t Kw,
                                            const scalar_t* w, int64_t wstep, int64_t wpix, const acc_t* gy,
                                            int64_t gstep) {
  using V = typename VecOf<acc_t>::type;
  constexpr int L = VecOf<acc_t>::N;
  V q[NP][NB];
  for (int p = 0; p < NP; ++p)
    for (int k = 0; k < NB; ++k) q[p][k] = loadu(gy + p * gstep + k * L);
  for (int64_t u = 0; u < Kh; ++u) {
    if (rr[u] < 0) continue;
    acc_t* xr = gs + rr[u];
    const scalar_t* wr = w + u * Kw * wstep;
    for (int64_t v = 0; v < Kw; ++v) {
      for (int p = 0; p < NP; ++p) {
        acc_t* xp = xr + cidx[p * Kw + v];
        const V wv = splat(static_cast<acc_t>(wr[v * wstep + p * wpix]));
        for (int k = 0; k < NB; ++k) storeu(xp + k * L, loadu(xp + k * L) + wv * q[p][k]);
      }
    }
  }
}

// The same scatter for NP pixels whose taps land on the columns p * S + v of a band row (tap v
// of pixel p, unit dilation; the layout and vectors of agg_pixels_cl_affine): each of the
// block's S * (NP - 1) + K columns is loaded and stored once per tap row, with the terms of
// every (pixel, tap) that lands on it added in registers, instead of one load and store per
// term. A column adds its terms in a fixed order (tap row, then block, then v ascending within
// the block): blocks depend on Wo only, so results do not depend on the bands or threads.
// gs + rr[u] + c0: the block's first column in tap row u's band row; gy + p * CG: pixel p's
// gradient channels.
template <typename scalar_t, typename acc_t, int CG, int NP, int K, int S>
__attribute__((noinline)) void tr_pixels_cl_affine(acc_t* gs, const int64_t* rr, int64_t c0, int64_t Kh,
                                                   const scalar_t* w, int64_t wstep, const acc_t* gy) {
  using AV = AffineVec<acc_t, CG>;
  using V = typename AV::type;
  constexpr int L = AV::L, NB = AV::NB, NC = S * (NP - 1) + K;
  V q[NP][NB];
  for (int p = 0; p < NP; ++p)
    for (int k = 0; k < NB; ++k) q[p][k] = AV::load(gy + p * CG + k * L);
  for (int64_t u = 0; u < Kh; ++u) {
    if (rr[u] < 0) continue;
    acc_t* xr = gs + rr[u] + c0;
    const scalar_t* wv[K];
    for (int v = 0; v < K; ++v) wv[v] = w + (u * K + v) * wstep;
    static_for<NC>([&](auto c) {
      V a[NB];
      for (int k = 0; k < NB; ++k) a[k] = AV::load(xr + c * CG + k * L);
      static_for<NP>([&](auto pr) {  // p descending: v = c - p * S ascending
        constexpr int p = NP - 1 - decltype(pr)::value, v = decltype(c)::value - p * S;
        if constexpr (v >= 0 && v < K) {
          const V wvv = AV::splat(static_cast<acc_t>(wv[v][p]));
          for (int k = 0; k < NB; ++k) a[k] += wvv * q[p][k];
        }
      });
      for (int k = 0; k < NB; ++k) AV::store(xr + c * CG + k * L, a[k]);
    });
  }
}

template <typename scalar_t>
at::Tensor aggregate_transpose_cl(const at::Tensor& gy, const at::Tensor& w, const Plan& plan) {
  const int64_t s = plan.col_stride, H = plan.H, W = plan.W;
  const bool pad_ok = plan.zero_border;
  const int64_t* coff = plan.col_offset.data();
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int L = VecOf<acc_t>::N;
  const int64_t B = gy.size(0), C = gy.size(1), Ho = gy.size(2), Wo = gy.size(3);
  const int64_t G = w.size(1), KK = w.size(2), Cg = C / G;
  const int64_t Kh = plan.Kh, Kw = plan.Kw;
  const int64_t wB = w.size(0), wHW = w.size(3) * w.size(4);
  const int64_t* rows = plan.rows.data();
  const int64_t* cols = plan.cols.data();
  at::Tensor gx = at::empty({B, C, H, W}, gy.options());
  const scalar_t* gyd = gy.data_ptr<scalar_t>();
  const scalar_t* wd = w.data_ptr<scalar_t>();
  scalar_t* gxd = gx.data_ptr<scalar_t>();
  const LastRows lr = LastRows::for_taps(W, Cg, coff, s, Kw, Wo, pad_ok);
  const int64_t pitch = lr.pitch, wpix = wHW == 1 ? 0 : 1;  // static weights: one per tap
  const int64_t band = chunk_rows(B * G, H, 16), nband = ceil_div(H, band);
  // output rows [olo[k], ohi[k]) read input band k (empty: olo = ohi)
  std::vector<int64_t> olo(nband, Ho), ohi(nband, 0);
  for (int64_t u = 0; u < Kh; ++u)
    for (int64_t i = 0; i < Ho; ++i) {
      const int64_t r = rows[u * Ho + i];
      if (r < 0) continue;
      olo[r / band] = std::min(olo[r / band], i), ohi[r / band] = std::max(ohi[r / band], i + 1);
    }
  int64_t onmax = 0;
  for (int64_t k = 0; k < nband; ++k) onmax = std::max(onmax, ohi[k] - olo[k]);
  const std::vector<int64_t> cidx = lr.tap_columns(cols, Kw, Wo, coff, s),
                             xoff = lr.elements(band), pix = strided(onmax * Wo, Cg);
  const bool affine = affine_cl<scalar_t>(Cg, wpix == 1, Kw, s, coff, pad_ok);
  ThreadScratch scratch(bytes_of({band * pitch, onmax * Wo * Cg}, sizeof(acc_t)));
  at::parallel_for(0, B * G * nband, 1, [&](int64_t t0, int64_t t1) {
    at::Tensor own;
    Carver cv{scratch.base(own)};
    Buf<acc_t> gs = cv.take<acc_t>(band * pitch), gys = cv.take<acc_t>(onmax * Wo * Cg);
    std::vector<int64_t> rr(Kh);
    for (int64_t task = t0; task < t1; ++task) {
      const TaskAt at(task, G, nband);
      const int64_t b = at.b, g = at.g, r0 = at.c * band, r1 = std::min(H, r0 + band);
      const int64_t i0 = olo[at.c], i1 = std::max(ohi[at.c], i0);
      std::fill(gs.begin(), gs.begin() + (r1 - r0) * pitch, acc_t(0));
      to_last(gys.data(), pix.data(), gyd + (b * C + g * Cg) * Ho * Wo + i0 * Wo, Ho * Wo, Cg, (i1 - i0) * Wo);
      const scalar_t* wg = wd + ((wB == 1 ? 0 : b) * G + g) * KK * wHW;
      for (int64_t i = i0; i < i1; ++i) {
        for (int64_t u = 0; u < Kh; ++u) {
          const int64_t r = rows[u * Ho + i];
          rr[u] = r >= r0 && r < r1 ? (r - r0) * pitch : -1;
        }
        const acc_t* qrow = gys.data() + (i - i0) * Wo * Cg;
        if constexpr (std::is_same<scalar_t, float>::value) {
          if (affine) {
            with_affine(Cg, Kw, s, [&](auto cg, auto kc, auto sc) {
              constexpr int CG = decltype(cg)::value, KA = decltype(kc)::value, SA = decltype(sc)::value;
              affine_blocks<AffineVec<acc_t, CG>::NP>(Wo, [&](auto np, int64_t j) {
                tr_pixels_cl_affine<scalar_t, acc_t, CG, decltype(np)::value, KA, SA>(
                    gs.data(), rr.data(), cidx[j * Kw], Kh, wg + i * Wo + j, wHW, qrow + j * CG);
              });
            });
            continue;
          }
        }
        pixel_blocks(Wo, Cg / L, [&](auto np, auto nb, int64_t j, int64_t k) {
          tr_pixels_cl<scalar_t, acc_t, decltype(nb)::value, decltype(np)::value>(
              gs.data() + k * L, rr.data(), cidx.data() + j * Kw, Kh, Kw, wg + (i * Wo + j) * wpix, wHW, wpix,
              qrow + j * Cg + k * L, Cg);
        });
      }
      from_last(gxd + ((b * C + g * Cg) * H + r0) * W, H * W, gs.data(), xoff.data(), Cg, (r1 - r0) * W);
    }
  });
  return gx;
}

template <typename scalar_t>
at::Tensor aggregate_transpose_impl(const at::Tensor& y, const at::Tensor& w, const Plan& plan) {
  const int64_t s = plan.col_stride, H = plan.H, W = plan.W;
  const int64_t ca = plan.affine_input_begin, cb = plan.affine_input_end;
  const bool pad_ok = plan.zero_border;
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int L = VecOf<acc_t>::N;
  const int64_t B = y.size(0), C = y.size(1), Ho = y.size(2), Wo = y.size(3);
  const int64_t G = w.size(1), KK = w.size(2), Cg = C / G;
  const int64_t Kh = plan.Kh, Kw = plan.Kw;
  const int64_t wB = w.size(0), wHW = w.size(3) * w.size(4);
  // Channels-last (bands of input rows) on rows under four vectors: measured faster than the
  // column kernels there (A/B, one thread: 64@56x56 stride 2 -37%, 128@28x28 -17% (stride 1)
  // and -18..-31% (stride 2), 512@7x7 stride 2 -68%; 256@14x14 stride 1 equal), with less
  // scratch than their per-task row copies.
  // Every row when the affine kernel covers the plane (against the wsrc aggregate below, one
  // thread: 64@56x56 stride 1 -34%, 256@14x14 -50%).
  const bool affine = affine_cl<scalar_t>(Cg, wHW > 1, Kw, s, plan.col_offset.data(), pad_ok);
  const bool last = (Wo < 4 * L || affine) && Cg % L == 0;
  // Stride 1, zero border: x's gradient is an aggregate of y over the mirrored window, input
  // pixel (r, q) reading y at each output (i, j) whose tap (u, v) reads (r, q), with that
  // output's weight (aggregate_impl's wsrc mode: the weights at the source pixel). It runs the
  // aggregate's two-row kernels on aligned shifted weight copies, with no masked edges (A/B
  // against the column and channels-last kernels, one thread, paired medians: 64@56x56
  // -16..-30%, 256@14x14 -43..-59%). Rows of two to four vectors, rows under a vector and the
  // planes of the affine kernel keep the channels-last scatter where it applies (128@28x28
  // +0..+20%, 512@7x7 +5..+36% with wsrc there).
  if (s == 1 && pad_ok && W >= L && !(last && (Wo >= 2 * L || affine)))
    return aggregate_impl<scalar_t>(y, w, *plan.mirrored, true);
  if (last) return aggregate_transpose_cl<scalar_t>(y, w, plan);
  const int64_t* off = plan.col_offset.data();
  const int64_t* rptr = plan.row_readers_begin.data();
  const int64_t* rpair = plan.row_readers.data();  // (n, 2): u, i
  const int64_t* cptr = plan.col_readers_begin.data();
  const int64_t* cpair = plan.col_readers.data();  // (n, 3): v, j, affine
  const int64_t npair = static_cast<int64_t>(plan.row_readers.size()) / 2;
  std::vector<int64_t> ru(npair), ri(npair);
  for (int64_t a = 0; a < npair; ++a) ru[a] = rpair[2 * a], ri[a] = rpair[2 * a + 1];

  int64_t mn = 0;
  for (int64_t v = 0; v < Kw; ++v) mn = std::min(mn, off[v]);
  const int64_t padc = -mn;
  std::vector<int64_t> e(Kw), ph(Kw);
  int64_t emax = 0;
  for (int64_t v = 0; v < Kw; ++v) {
    e[v] = (off[v] + padc) / s;
    ph[v] = (off[v] + padc) % s;
    emax = std::max(emax, e[v]);
  }
  const int64_t mw = (W - 1 + padc) / s + 1;  // phase-row length covering every input column
  const int64_t block = L;  // one vector of columns per block
  // fast m range per phase: all of [0, mw) (zero border) or the clamp interior
  int64_t m_a = 0, m_b = round_up(mw, block);
  if (!pad_ok) {
    m_a = ca + padc;
    m_b = cb + padc;
    if (m_b - m_a < block) m_a = m_b = 0;
  }
  // stride 1, zero border: only m = col + padc of image columns is needed; a row narrower
  // than a block takes one block from padc (writing a few phase-row entries past the row)
  if (s == 1 && pad_ok) m_a = padc, m_b = padc + std::max(W, block);
  // the entries of phase f that are image columns: m in [plo[f], plo[f] + pcnt[f]) (pair mode
  // computes only these: at W=14, s=2 one block per phase instead of two)
  std::vector<int64_t> plo(s), pcnt(s);
  int64_t pend = 0;
  for (int64_t f = 0; f < s; ++f) {
    plo[f] = ceil_div(std::max<int64_t>(padc - f, 0), s);
    const int64_t col = plo[f] * s + f - padc;
    pcnt[f] = col < W ? (W - 1 - col) / s + 1 : 0;
    pend = std::max(pend, plo[f] + round_up(pcnt[f], block));
  }
  const int64_t obw = round_up(std::max({mw, m_b, pend}), block);
  // direct: stride 1, one dtype and rows at least a block wide: the blocks store straight into
  // the rows of x (m = col + padc; the zero border's range is exactly the image columns, the last
  // block shifted left to end there), with no phase row, scatter or row copy
  const bool direct = std::is_same<scalar_t, acc_t>::value && s == 1 && W >= block;
  // pair: stride 2, or stride 1 on rows narrower than a block (zero border, so every column is
  // covered by the blocks): each phase keeps its own row, and the rows are interleaved (stride
  // 2) or copied (stride 1) into x at the end, without the scalar scatter
  const bool pair = std::is_same<scalar_t, acc_t>::value && (s == 2 || (s == 1 && !direct)) && pad_ok;
  const int64_t lp = emax, lpw = lp + std::max(obw, Wo) + 1;
  std::vector<int64_t> base(Kw);  // scratch index of j = m - e_v at m = 0
  for (int64_t v = 0; v < Kw; ++v) base[v] = lp - e[v];
  // taps per phase
  std::vector<int64_t> vptr(s + 1, 0), vlist;
  for (int64_t f = 0; f < s; ++f) {
    for (int64_t v = 0; v < Kw; ++v)
      if (ph[v] == f) vlist.push_back(v);
    vptr[f + 1] = static_cast<int64_t>(vlist.size());
  }

  at::Tensor x = at::empty({B, C, H, W}, y.options());
  const scalar_t* yd = y.data_ptr<scalar_t>();
  const scalar_t* wd = w.data_ptr<scalar_t>();
  scalar_t* xd = x.data_ptr<scalar_t>();
  // 16 input rows per task: the y and w rows a task copies (its rows plus the window's reach)
  // are re-read by the next task less often than with 8
  const int64_t ch = chunk_rows(B * G, H, 16), nch = ceil_div(H, ch);

  auto out_span = [&](int64_t h0, int64_t h1) {
    int64_t imin = Ho, imax = -1;
    for (int64_t a = rptr[h0]; a < rptr[h1]; ++a) imin = std::min(imin, ri[a]), imax = std::max(imax, ri[a]);
    return imax >= imin ? std::make_pair(imin, imax - imin + 1) : std::make_pair<int64_t, int64_t>(0, 0);
  };
  // per tap row u: the output rows [first, second) its pairs with input rows [h0, h1) read
  // (empty: first == second)
  auto tap_rows = [&](int64_t h0, int64_t h1, std::vector<std::pair<int64_t, int64_t>>& r) {
    for (auto& q : r) q = {Ho, 0};
    for (int64_t a = rptr[h0]; a < rptr[h1]; ++a) {
      auto& q = r[ru[a]];
      q.first = std::min(q.first, ri[a]), q.second = std::max(q.second, ri[a] + 1);
    }
    for (auto& q : r) q.second = std::max(q.first, q.second);
  };
  int64_t nri_max = 0;
  for (int64_t h0 = 0; h0 < H; h0 += ch) nri_max = std::max(nri_max, out_span(h0, std::min(H, h0 + ch)).second);
  const int64_t cplane = nri_max * lpw, tplane = nri_max * lpw;
  // y and w rows copied per task
  const int64_t ysize = Cg * cplane, wsize = KK * tplane;
  ThreadScratch scratch(
      bytes_of({ysize, wsize, direct ? 0 : (pair ? 2 * s : 1) * Cg * obw, direct || pair ? 0 : Cg * W}, sizeof(acc_t)));

  at::parallel_for(0, B * G * nch, 1, [&](int64_t t0, int64_t t1) {
    at::Tensor own;
    Carver cv{scratch.base(own)};
    Buf<acc_t> ys = cv.take<acc_t>(ysize), wb = cv.take<acc_t>(wsize),
               xo = cv.take<acc_t>(direct ? 0 : (pair ? 2 * s : 1) * Cg * obw),
               xrow = cv.take<acc_t>(direct || pair ? 0 : Cg * W);
    std::vector<std::pair<int64_t, int64_t>> urows(Kh), nrows(Kh);
    std::vector<Prefetch> pfw(Kh);
    int64_t most = 0;  // the most (tap, output) pairs of an input row
    for (int64_t h = 0; h < H; ++h) most = std::max(most, rptr[h + 1] - rptr[h]);
    std::vector<int64_t> steps(6 * most);
    std::vector<char> used(most);
    for (int64_t task = t0; task < t1; ++task) {
      const TaskAt at(task, G, nch);
      const int64_t b = at.b, g = at.g, h0 = at.c * ch, h1 = std::min(H, h0 + ch);
      const auto span = out_span(h0, h1);
      const int64_t imin = span.first, nri = span.second;
      const scalar_t* wg = wd + ((wB == 1 ? 0 : b) * G + g) * KK * wHW;
      if (nri > 0) {
        // rows land at fixed positions (row slot ii, columns [lp, lp + Wo)); everything around
        // them stays as zeroed once per thread, which is the zero padding the blocks read
        for (int64_t c = 0; c < Cg; ++c)
          for (int64_t ii = 0; ii < nri; ++ii) {
            const scalar_t* src = yd + ((b * C + g * Cg + c) * Ho + imin + ii) * Wo;
            acc_t* dst = ys.data() + c * cplane + ii * lpw + lp;
            convert(dst, src, Wo);
          }
        // weights: only the rows the task's (u, i) pairs read, [urows[u].first, urows[u].second)
        // of the tap row u planes (each weight is read by exactly one input row, so tasks do not
        // copy the same weight twice)
        tap_rows(h0, h1, urows);
        for (int64_t u = 0; u < Kh; ++u)
          for (int64_t t = u * Kw; t < (u + 1) * Kw; ++t)
            for (int64_t i = urows[u].first; i < urows[u].second; ++i) {
              acc_t* dst = wb.data() + t * tplane + (i - imin) * lpw + lp;
              if (wHW == 1) {
                std::fill(dst, dst + Wo, static_cast<acc_t>(wg[t]));
              } else {
                const scalar_t* src = wg + t * wHW + i * Wo;
                convert(dst, src, Wo);
              }
            }
      }
      // the next task's y and w rows, fetched a slice per input row below
      Prefetch pfy;
      if (task + 1 < t1) {
        const TaskAt nt(task + 1, G, nch);
        const int64_t nb = nt.b, ng = nt.g, nh0 = nt.c * ch, nh1 = std::min(H, nh0 + ch);
        const auto next = out_span(nh0, nh1);
        pfy = Prefetch(yd + ((nb * C + ng * Cg) * Ho + next.first) * Wo, Cg, Ho * Wo, next.second * Wo);
        tap_rows(nh0, nh1, nrows);
        for (int64_t u = 0; u < Kh; ++u)
          pfw[u] = wHW > 1 ? Prefetch(wd + (((wB == 1 ? 0 : nb) * G + ng) * KK + u * Kw) * wHW + nrows[u].first * Wo, Kw,
                                      wHW, (nrows[u].second - nrows[u].first) * Wo)
                           : Prefetch();
      } else {
        for (auto& f : pfw) f = Prefetch();
      }
      for (int64_t h = h0; h < h1;) {
        // two input rows at once where the rows are written in place or per phase (direct,
        // pair): both read most of the same output rows, so each y vector feeds two FMAs
        const int64_t n = (direct || pair) && h + 1 < h1 ? 2 : 1;
        for (int64_t k = 0; k < n; ++k) {
          pfy.slice(h + k - h0, h1 - h0);
          for (const auto& f : pfw) f.slice(h + k - h0, h1 - h0);
        }
        // input row h of channel c at xout[c * xstep + col], row h + 1 (n = 2) W further; in
        // direct mode the blocks write column m - padc through bout = xout - padc
        acc_t* xout;
        int64_t xstep;
        if (direct || pair) {
          xout = reinterpret_cast<acc_t*>(xd) + ((b * C + g * Cg) * H + h) * W;
          xstep = H * W;
        } else {
          xout = xrow.data();
          xstep = W;
          std::fill(xrow.begin(), xrow.end(), acc_t(0));
        }
        acc_t* bout = direct ? xout - padc : xo.data();
        const int64_t bstep = direct ? xstep : obw;
        const int64_t x2 = direct ? W : s * Cg * obw;  // the blocks' second row (pair: own phase rows)
        const int64_t p0 = rptr[h], p2 = rptr[h + n];
        const int64_t p1 = rptr[h + 1];
        const int64_t nsteps =
            n == 2 ? row_steps({ri.data() + p0, ru.data() + p0, p1 - p0}, {ri.data() + p1, ru.data() + p1, p2 - p1}, true,
                               used.data(), steps.data())
                   : 0;
        if (p2 <= p0 && (direct || pair)) {
          for (int64_t k = 0; k < n; ++k)
            for (int64_t c = 0; c < Cg; ++c) std::fill(xout + k * W + c * xstep, xout + k * W + c * xstep + W, acc_t(0));
        } else if (p2 > p0) {
          for (int64_t f = 0; f < s; ++f) {
            const int64_t* vl = vlist.data() + vptr[f];
            const int64_t nv = vptr[f + 1] - vptr[f];
            if (pair) bout = xo.data() + f * Cg * obw;  // this phase's own rows
            if (nv == 0 || m_b <= m_a) {
              if (pair)  // a phase no tap reads
                for (int64_t k = 0; k < n; ++k) std::fill(bout + k * x2, bout + k * x2 + Cg * obw, acc_t(0));
              continue;
            }
            auto run = [&](int64_t m0) {
              if (n == 2) {
                channel_blocks2(Cg, [&](auto cb, int64_t c) {
                  tr_block2<acc_t, decltype(cb)::value>(ys.data() + c * cplane, wb.data(), cplane, tplane, lpw,
                                                        steps.data(), nsteps, imin, vl, nv, Kw, base.data(), m0,
                                                        bout + c * bstep, bstep, x2);
                });
                return;
              }
              channel_blocks(Cg, [&](auto cb, int64_t c) {
                tr_block<acc_t, decltype(cb)::value>(ys.data() + c * cplane, wb.data(), cplane, tplane, lpw,
                                                         ru.data(), ri.data(), p0, p2, imin, vl, nv, Kw, base.data(),
                                                         m0, bout + c * bstep, bstep);
              });
            };
            if (pair) {
              for (int64_t m0 = plo[f]; m0 < plo[f] + pcnt[f]; m0 += block) run(m0);
              continue;
            }
            auto for_m = [&](auto&& g) {
              int64_t m0 = m_a;
              for (; m0 + block <= m_b; m0 += block) g(m0);
              if (m0 < m_b) g(m_b - block);
            };
            for_m(run);
            if (direct) continue;
            // scatter the phase row into the input row: col = s*m + f - padc (n = 1 here)
            const int64_t mlo = std::max<int64_t>(m_a, ceil_div(std::max<int64_t>(padc - f, 0), s));
            for (int64_t c = 0; c < Cg; ++c) {
              const acc_t* src = xo.data() + c * obw;
              acc_t* dst = xrow.data() + c * W;
              for (int64_t m = mlo; m < m_b; ++m) {
                const int64_t col = s * m + f - padc;
                if (col >= W) break;
                if (col >= 0) dst[col] = src[m];
              }
            }
          }
          if (pair && s == 1) {  // column col = m - padc
            for (int64_t k = 0; k < n; ++k)
              for (int64_t c = 0; c < Cg; ++c) convert(xout + k * W + c * xstep, xo.data() + k * x2 + c * obw + padc, W);
          } else if (pair) {
            // column col = 2m + f - padc: even columns from the phase of padc, odd from the other
            const int64_t f0 = padc % 2, m0 = padc / 2, m1 = (padc + 1) / 2;
            for (int64_t k = 0; k < n; ++k)
              for (int64_t c = 0; c < Cg; ++c) {
                const acc_t* pe = xo.data() + k * x2 + (f0 * Cg + c) * obw + m0;
                const acc_t* po = xo.data() + k * x2 + ((1 - f0) * Cg + c) * obw + m1;
                acc_t* dst = xout + k * W + c * xstep;
                interleave2(dst, pe, po, W / 2);
                if (W % 2) dst[W - 1] = pe[W / 2];
              }
          }
          // scalar path: pairs the affine blocks did not cover (clamp-border edges)
          const int64_t ca_used = m_b > m_a ? m_a - padc : 0, cb_used = m_b > m_a ? m_b - padc : 0;
          for (int64_t k = 0; k < n; ++k) {
            acc_t* xk = xout + k * W;
            if (direct)  // the blocks wrote columns [ca_used, cb_used); the scalar path adds to the rest
              for (int64_t c = 0; c < Cg; ++c)
                for (int64_t col = 0; col < W; ++col)
                  if (col < ca_used || col >= cb_used) xk[c * xstep + col] = 0;
            for (int64_t col = 0; col < W; ++col) {
              const bool fast = pad_ok || (col >= ca_used && col < cb_used);
              for (int64_t a = cptr[col]; a < cptr[col + 1]; ++a) {
                const int64_t v = cpair[3 * a], j = cpair[3 * a + 1], aff = cpair[3 * a + 2];
                if (fast && aff) continue;
                for (int64_t pp = rptr[h + k]; pp < rptr[h + k + 1]; ++pp) {
                  const int64_t u = ru[pp], ii = ri[pp] - imin;
                  const acc_t wv = wb[(u * Kw + v) * tplane + ii * lpw + lp + j];
                  for (int64_t c = 0; c < Cg; ++c) xk[c * xstep + col] += wv * ys[c * cplane + ii * lpw + lp + j];
                }
              }
            }
          }
        }
        if (!direct && !pair)
          for (int64_t c = 0; c < Cg; ++c) {
            scalar_t* dst = xd + ((b * C + g * Cg + c) * H + h) * W;
            const acc_t* src = xrow.data() + c * W;
            convert(dst, src, W);
          }
        h += n;
      }
    }
  });
  return x;
}

}  // namespace

namespace tokenmix_cpu {

at::Tensor aggregate(const at::Tensor& x, const at::Tensor& w, const Plan& plan) {
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "tokenmix_aggregate", [&] {
    out = aggregate_impl<scalar_t>(x, w, plan);
  });
  return out;
}

at::Tensor correlate(const at::Tensor& q, const at::Tensor& k, const Plan& plan, int64_t groups, bool sum_batch,
                     bool sum_space) {
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "tokenmix_correlate", [&] {
    out = correlate_impl<scalar_t>(q, k, plan, groups, sum_batch, sum_space);
  });
  return out;
}

at::Tensor aggregate_transpose(const at::Tensor& y, const at::Tensor& w, const Plan& plan) {
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "tokenmix_aggregate_transpose", [&] {
    out = aggregate_transpose_impl<scalar_t>(y, w, plan);
  });
  return out;
}

#ifdef TOKENMIX_TEST_HOOKS
int64_t lent_planes_override(int64_t n) { return lent_override.exchange(n); }
#endif

}  // namespace tokenmix_cpu
