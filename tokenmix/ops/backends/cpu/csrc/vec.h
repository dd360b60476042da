// Vector helpers of the kernels: GCC/Clang vector extensions (a 256-bit vector of 8 floats or
// 4 doubles; AffineVec: 64 bytes where AVX-512 is compiled in), with AVX2 intrinsics only where
// the extensions have no equivalent (broadcasts, lane masks, the stride-2 (de)interleave, the
// 8 x 8 transposes of the channels-last layouts, the 16-bit conversions) and plain fallbacks.
// No kernel uses AVX2 masked loads where a plain load with lanes cleared (keep_lanes) will do:
// they measured far slower on AMD Zen 3.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace tokenmix_cpu {

// One broadcast instruction per register width and element type, for Vec::splat.
#if defined(__AVX512F__)
inline __m512 set1_512(float a) { return _mm512_set1_ps(a); }
inline __m512d set1_512(double a) { return _mm512_set1_pd(a); }
#endif
#if defined(__AVX2__)
inline __m256 set1_256(float a) { return _mm256_set1_ps(a); }
inline __m256d set1_256(double a) { return _mm256_set1_pd(a); }
#endif

// A vector of Bytes bytes of T (a GCC/Clang vector extension): 32 bytes (8 floats, 4 doubles)
// in every kernel, 64 (AVX-512) for a pixel's channels in the affine channels-last kernels
// (AffineVec).
template <typename T, int Bytes = 32>
struct Vec {
  typedef T type __attribute__((vector_size(Bytes)));
  static constexpr int N = Bytes / int(sizeof(T));

  static type load(const T* p) {
    type v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static void store(T* p, type v) { std::memcpy(p, &v, sizeof(v)); }
  // Every lane = a (one broadcast instruction; a lane-by-lane fill compiles to insert chains).
  static type splat(T a) {
#if defined(__AVX512F__)
    if constexpr (Bytes == 64) return (type)set1_512(a);
#endif
#if defined(__AVX2__)
    if constexpr (Bytes == 32) return (type)set1_256(a);
#endif
    type v;
    for (int k = 0; k < N; ++k) v[k] = a;
    return v;
  }
};

template <typename T>
inline typename Vec<T>::type loadu(const T* p) {
  return Vec<T>::load(p);
}
template <typename T>
inline void storeu(T* p, typename Vec<T>::type v) {
  Vec<T>::store(p, v);
}
template <typename T>
inline typename Vec<T>::type splat(T a) {
  return Vec<T>::splat(a);
}

// a * b + c rounded once, lane by lane: an explicit fused multiply-add where a sum's rounding
// must not depend on what the compiler contracts (GCC's Zen tunings split loop-carried FMA
// chains into a multiply and an add), e.g. correlate's column kernels and its tail.
template <typename V>
inline V fmadd(V a, V b, V c) {
#if defined(__FMA__)
  if constexpr (std::is_same<V, Vec<float>::type>::value)
    return (V)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
  else
    return (V)_mm256_fmadd_pd((__m256d)a, (__m256d)b, (__m256d)c);
#else
  for (int l = 0; l < static_cast<int>(sizeof(V) / sizeof(a[0])); ++l) c[l] = std::fma(a[l], b[l], c[l]);
  return c;
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
inline typename Vec<T>::type keep_lanes(const T* p, int64_t lo, int64_t hi) {
  using V = typename Vec<T>::type;
#if defined(__AVX2__)
  if constexpr (std::is_same<T, float>::value)
    return (V)_mm256_and_ps(_mm256_loadu_ps(p), _mm256_castsi256_ps(lane_range<T>(lo, hi)));
  else
    return (V)_mm256_and_pd(_mm256_loadu_pd(p), _mm256_castsi256_pd(lane_range<T>(lo, hi)));
#else
  V v{};
  for (int64_t k = std::max<int64_t>(lo, 0); k < std::min<int64_t>(hi, Vec<T>::N); ++k) v[k] = p[k];
  return v;
#endif
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

// to_last (ToLast) or from_last: element (c, k) at c * cs + k channel-major, off[k] + c
// channels-last.
template <bool ToLast, typename From, typename To>
void relayout(To* dst, const From* src, const int64_t* off, int64_t cs, int64_t nc, int64_t n) {
  auto major = [cs](int64_t c, int64_t k) { return c * cs + k; };
  auto last = [off](int64_t c, int64_t k) { return off[k] + c; };
  auto from = [&](int64_t c, int64_t k) { return ToLast ? major(c, k) : last(c, k); };
  auto to = [&](int64_t c, int64_t k) { return ToLast ? last(c, k) : major(c, k); };
  int64_t c0 = 0;
#if defined(__AVX2__)
  if constexpr (std::is_same<From, float>::value && std::is_same<To, float>::value) {
    // 8 x 8 blocks: the channel-major side as 8 rows of 8 positions, the channels-last side as
    // 8 rows of 8 channels
    auto row = [&](bool channel_major, int m, int64_t k) { return channel_major ? major(c0 + m, k) : last(c0, k + m); };
    for (; c0 + 8 <= nc; c0 += 8) {
      int64_t k = 0;
      for (; k + 8 <= n; k += 8) {
        __m256 r[8];
        for (int m = 0; m < 8; ++m) r[m] = _mm256_loadu_ps(src + row(ToLast, m, k));
        transpose8x8(r);
        for (int m = 0; m < 8; ++m) _mm256_storeu_ps(dst + row(!ToLast, m, k), r[m]);
      }
      for (; k < n; ++k)
        for (int64_t c = c0; c < c0 + 8; ++c) dst[to(c, k)] = src[from(c, k)];
    }
  }
#endif
  for (int64_t c = c0; c < nc; ++c)
    for (int64_t k = 0; k < n; ++k) dst[to(c, k)] = static_cast<To>(src[from(c, k)]);
}

template <typename From, typename To>
void to_last(To* dst, const int64_t* off, const From* src, int64_t cs, int64_t nc, int64_t n) {
  relayout<true>(dst, src, off, cs, nc, n);
}

template <typename From, typename To>
void from_last(To* dst, int64_t cs, const From* src, const int64_t* off, int64_t nc, int64_t n) {
  relayout<false>(dst, src, off, cs, nc, n);
}

// n rows of width elements, converted: row r from src + r * src_step to dst + r * dst_step.
template <typename From, typename To>
inline void convert_rows(To* dst, int64_t dst_step, const From* src, int64_t src_step, int64_t n, int64_t width) {
  for (int64_t r = 0; r < n; ++r) convert(dst + r * dst_step, src + r * src_step, width);
}

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
    for (int l = 0; l < Vec<acc_t>::N; ++l) t += a[m][l];
    out[m] = t;
  }
}

// v[l] = p[2 * l], l < L, from the 2L elements at p (the last one unused).
template <typename T>
inline typename Vec<T>::type even_lanes(const T* p) {
  using V = typename Vec<T>::type;
#if defined(__AVX2__)
  if constexpr (std::is_same<T, float>::value)
    return (V)phase8<0>(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8));
  else
    return (V)even4(_mm256_loadu_pd(p), _mm256_loadu_pd(p + 4));
#else
  V v;
  for (int l = 0; l < Vec<T>::N; ++l) v[l] = p[2 * l];
  return v;
#endif
}

// v[l] = p[l * s] for the lanes lo <= l < hi, 0 for the others, reading nothing else (the
// other lanes' addresses may lie outside the tensor): masked loads / gathers.
template <typename T>
inline typename Vec<T>::type masked_step(const T* p, int64_t s, int64_t lo, int64_t hi) {
  using V = typename Vec<T>::type;
#if defined(__AVX2__)
  constexpr int L = Vec<T>::N;
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
  for (int64_t l = std::max<int64_t>(lo, 0); l < std::min<int64_t>(hi, Vec<T>::N); ++l) v[l] = p[l * s];
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
inline typename Vec<at::opmath_type<scalar_t>>::type load_acc(const scalar_t* p) {
  static_assert(S == 1 || S == 2, "load_acc: stride 1 or 2");
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (std::is_same<scalar_t, acc_t>::value) {
    if constexpr (S == 1) return loadu(p);
    else return even_lanes(p);
  } else {
#if defined(__AVX2__)
    if constexpr (S == 1) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      return (typename Vec<acc_t>::type)half_to_float<scalar_t>(_mm256_cvtepu16_epi32(h));
    } else {  // 16 values = 8 32-bit lanes, each holding elements 2l (low half) and 2l + 1
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      return (typename Vec<acc_t>::type)half_to_float<scalar_t>(_mm256_and_si256(x, _mm256_set1_epi32(0xFFFF)));
    }
#else
    typename Vec<acc_t>::type v;
    for (int l = 0; l < Vec<acc_t>::N; ++l) v[l] = static_cast<acc_t>(p[S * l]);
    return v;
#endif
  }
}

// The vectors of the affine channels-last kernels: a pixel's CG channels in NB vectors of 64
// bytes where AVX-512 is compiled in and they fill them (one per pixel at 16 floats: half the
// loads and multiply-adds of two 32-byte vectors), else of 32 bytes; NP pixels per block, so
// that NP * NB = 8 accumulators hide the multiply-add latency.
template <typename T, int CG>
constexpr int pixel_vector_bytes() {
#if defined(__AVX512F__)
  return (CG * int(sizeof(T))) % 64 == 0 ? 64 : 32;
#else
  return 32;
#endif
}

template <typename T, int CG>
struct AffineVec : Vec<T, pixel_vector_bytes<T, CG>()> {
  static constexpr int L = Vec<T, pixel_vector_bytes<T, CG>()>::N, NB = CG / L, NP = 8 / NB;
  static_assert(CG % L == 0 && NB <= 8, "a pixel's channels must fill whole vectors");
};

}  // namespace tokenmix_cpu
