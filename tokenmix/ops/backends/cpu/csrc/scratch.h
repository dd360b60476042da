// Scratch memory and task scheduling: the kernels split their work into tasks of (batch,
// group, chunk of rows) run by at::parallel_for; each thread carves its buffers out of one
// per-thread slice of scratch, zeroed once, and prefetches what its next task reads.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <initializer_list>

namespace tokenmix_cpu {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// The most rows chunk_rows gives, whatever the thread count.
inline int64_t max_chunk_rows(int64_t rows, int64_t most = 8) {
  const int64_t ch = std::min(most, rows);
  return ch < rows ? std::max<int64_t>(2, ch & ~int64_t(1)) : ch;
}

// Rows per task: at most `most`, fewer when that leaves too few tasks for the threads. The
// count depends on the thread count, the results must not: the two-row kernels pair rows
// (i0, i0 + 1), (i0 + 2, i0 + 3), ... from a chunk's first row and sum a paired row's taps in
// another order than a row computed alone, so the chunk is either the whole plane or an even
// number of rows. Then every chunk starts on an even row, and a row is paired or alone
// (the last row of an odd plane) whatever the chunking.
inline int64_t chunk_rows(int64_t outer, int64_t rows, int64_t most = 8) {
  const int64_t want = 4 * std::max<int64_t>(1, at::get_num_threads());
  int64_t ch = max_chunk_rows(rows, most);
  while (ch > 2 && outer * ceil_div(rows, ch) < want) ch = std::max<int64_t>(2, (ch / 2) & ~int64_t(1));
  return std::min(ch, rows);
}

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
// eighth of the planes (narrow weights): the tail is slower per plane than the kernels it
// stands in for.
#ifdef TOKENMIX_TEST_HOOKS
// The tests' build only (lent_planes_override): >= 0 forces that many lent planes, the whole
// output included, so the tail kernel meets every geometry; -1 = sized.
inline std::atomic<int64_t> lent_override{-1};
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

// A task of the (batch, group, chunk of rows) grid: task t has batch t / (G * chunks), group
// (t / chunks) % G and chunk t % chunks. has_next / next: the task its thread runs after it
// (what to prefetch).
struct Task {
  int64_t batch, group, chunk;
  int64_t index, end, groups, chunks;
  Task(int64_t t, int64_t end_, int64_t G, int64_t nchunks)
      : batch(t / (G * nchunks)), group((t / nchunks) % G), chunk(t % nchunks), index(t), end(end_), groups(G),
        chunks(nchunks) {}
  bool has_next() const { return index + 1 < end; }
  Task next() const { return Task(index + 1, end, groups, chunks); }
};

// The tasks [begin, end) that one thread runs, in order.
struct TaskRange {
  int64_t begin_, end_, groups, chunks;
  struct iterator {
    const TaskRange* range;
    int64_t t;
    Task operator*() const { return Task(t, range->end_, range->groups, range->chunks); }
    iterator& operator++() { return ++t, *this; }
    bool operator!=(const iterator& o) const { return t != o.t; }
  };
  iterator begin() const { return {this, begin_}; }
  iterator end() const { return {this, end_}; }
};

// The one task loop of the kernels: the ntasks tasks of a grid of G groups x `chunks` chunks
// (batches outermost) split over the threads by at::parallel_for; each thread calls
// run(carver, tasks) once, with its slice of scratch (zeroed) to carve its buffers from and its
// consecutive tasks to iterate.
template <typename Run>
void for_each_task(int64_t ntasks, int64_t G, int64_t chunks, const ThreadScratch& scratch, Run&& run) {
  at::parallel_for(0, ntasks, 1, [&](int64_t t0, int64_t t1) {
    at::Tensor own;
    Carver carver{scratch.base(own)};
    run(carver, TaskRange{t0, t1, G, chunks});
  });
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

}  // namespace tokenmix_cpu
