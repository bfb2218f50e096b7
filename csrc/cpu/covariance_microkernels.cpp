// Register-blocked micro-kernels for the covariance SYRK and the row widening used by packing.
//
// Each ISA version is compiled with a target attribute and chosen at run time, so the
// extension still loads on any x86-64 (and builds on other architectures with the generic
// kernel). Shapes follow the register files: AVX-512 keeps a 32 x 12 tile in 24 of its 32 zmm
// registers, AVX2 a 16 x 6 tile in 12 of its 16 ymm registers; both leave room for the two
// A vectors and the broadcast B value, so the inner loop is one FMA per accumulator.
//
// Accuracy: registers restart from zero every kSubRows products and are then added into acc,
// a two-level summation whose rounding error grows with kSubRows + T / kSubRows instead of T.
// That keeps the error at or below a BLAS GEMM's for the same data while adding only one
// load/add/store of the (L1-resident) C tile per kSubRows FMAs per accumulator.
#include <algorithm>
#include <cstdlib>
#include <cstring>

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include "covariance_kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#define CURVFAST_X86 1
#include <immintrin.h>
#endif

namespace curvfast::cpu {
namespace {

constexpr int64_t kSubRows = 64;

// ------------------------------------------------------------------------------------------
// Micro-kernels
// ------------------------------------------------------------------------------------------
template <int MR, int NR>
void micro_generic(int64_t kc, const float* a, const float* b, float* c, int64_t ldc) {
  for (int64_t p0 = 0; p0 < kc; p0 += kSubRows) {
    const int64_t p1 = std::min(kc, p0 + kSubRows);
    float t[NR][MR] = {};
    for (int64_t p = p0; p < p1; ++p) {
      for (int r = 0; r < NR; ++r) {
        const float br = b[p * NR + r];
        for (int v = 0; v < MR; ++v) t[r][v] += br * a[p * MR + v];
      }
    }
    for (int r = 0; r < NR; ++r)
      for (int v = 0; v < MR; ++v) c[r * ldc + v] += t[r][v];
  }
}

#ifdef CURVFAST_X86
__attribute__((target("avx512f"))) void micro_avx512_32x12(int64_t kc, const float* a,
                                                            const float* b, float* c,
                                                            int64_t ldc) {
  constexpr int NR = 12;
  for (int64_t p0 = 0; p0 < kc; p0 += kSubRows) {
  const int64_t steps = std::min(kSubRows, kc - p0);
  __m512 acc0[NR], acc1[NR];
#pragma GCC unroll 12
  for (int r = 0; r < NR; ++r) {
    acc0[r] = _mm512_setzero_ps();
    acc1[r] = _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < steps; ++p) {
    _mm_prefetch(reinterpret_cast<const char*>(a + 32 * 8), _MM_HINT_T0);
    const __m512 a0 = _mm512_load_ps(a);
    const __m512 a1 = _mm512_load_ps(a + 16);
#pragma GCC unroll 12
    for (int r = 0; r < NR; ++r) {
      const __m512 br = _mm512_set1_ps(b[r]);
      acc0[r] = _mm512_fmadd_ps(a0, br, acc0[r]);
      acc1[r] = _mm512_fmadd_ps(a1, br, acc1[r]);
    }
    a += 32;
    b += NR;
  }
#pragma GCC unroll 12
  for (int r = 0; r < NR; ++r) {
    float* cr = c + r * ldc;
    _mm512_storeu_ps(cr, _mm512_add_ps(_mm512_loadu_ps(cr), acc0[r]));
    _mm512_storeu_ps(cr + 16, _mm512_add_ps(_mm512_loadu_ps(cr + 16), acc1[r]));
  }
  }
}

__attribute__((target("avx2,fma"))) void micro_avx2_16x6(int64_t kc, const float* a,
                                                         const float* b, float* c,
                                                         int64_t ldc) {
  constexpr int NR = 6;
  for (int64_t p0 = 0; p0 < kc; p0 += kSubRows) {
  const int64_t steps = std::min(kSubRows, kc - p0);
  __m256 acc0[NR], acc1[NR];
#pragma GCC unroll 6
  for (int r = 0; r < NR; ++r) {
    acc0[r] = _mm256_setzero_ps();
    acc1[r] = _mm256_setzero_ps();
  }
  for (int64_t p = 0; p < steps; ++p) {
    const __m256 a0 = _mm256_load_ps(a);
    const __m256 a1 = _mm256_load_ps(a + 8);
#pragma GCC unroll 6
    for (int r = 0; r < NR; ++r) {
      const __m256 br = _mm256_broadcast_ss(b + r);
      acc0[r] = _mm256_fmadd_ps(a0, br, acc0[r]);
      acc1[r] = _mm256_fmadd_ps(a1, br, acc1[r]);
    }
    a += 16;
    b += NR;
  }
#pragma GCC unroll 6
  for (int r = 0; r < NR; ++r) {
    float* cr = c + r * ldc;
    _mm256_storeu_ps(cr, _mm256_add_ps(_mm256_loadu_ps(cr), acc0[r]));
    _mm256_storeu_ps(cr + 8, _mm256_add_ps(_mm256_loadu_ps(cr + 8), acc1[r]));
  }
  }
}
#endif  // CURVFAST_X86

constexpr SyrkKernel kGeneric{"generic", 16, 4, &micro_generic<16, 4>};
#ifdef CURVFAST_X86
constexpr SyrkKernel kAvx512{"avx512", 32, 12, &micro_avx512_32x12};
constexpr SyrkKernel kAvx2{"avx2", 16, 6, &micro_avx2_16x6};

bool has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
}
#endif

// ------------------------------------------------------------------------------------------
// Panel packing: x[t0 + p, c0 : c0 + cols] in its own dtype -> fp32 (times w[p]) at
// dst[p * W + v]. Lanes v >= cols are left alone (the driver zeroes them once).
// ------------------------------------------------------------------------------------------
inline float bf16_bits_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline float load_scalar(const uint16_t* s, bool is_half) {
  return is_half ? static_cast<float>(c10::Half(*s, c10::Half::from_bits()))
                 : bf16_bits_to_float(*s);
}

void pack_generic(const void* src, c10::ScalarType dtype, int64_t ld, int64_t rows, int64_t cols,
                  int W, const float* w, float* dst) {
  for (int64_t p = 0; p < rows; ++p) {
    const float scale = w != nullptr ? w[p] : 1.0f;
    float* o = dst + p * W;
    if (dtype == c10::ScalarType::Float) {
      const float* s = static_cast<const float*>(src) + p * ld;
      for (int64_t v = 0; v < cols; ++v) o[v] = s[v] * scale;
    } else {
      const uint16_t* s = static_cast<const uint16_t*>(src) + p * ld;
      const bool is_half = dtype == c10::ScalarType::Half;
      for (int64_t v = 0; v < cols; ++v) o[v] = load_scalar(s + v, is_half) * scale;
    }
  }
}

#ifdef CURVFAST_X86
// Eight lanes of one row widened to fp32.
template <c10::ScalarType T>
__attribute__((target("avx2,f16c"))) inline __m256 load8(const void* s, int64_t v) {
  if constexpr (T == c10::ScalarType::Float) {
    return _mm256_loadu_ps(static_cast<const float*>(s) + v);
  } else {
    const __m128i h =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(s) + v));
    if constexpr (T == c10::ScalarType::Half) {
      return _mm256_cvtph_ps(h);
    } else {
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
  }
}

template <c10::ScalarType T>
__attribute__((target("avx2,f16c"))) float load1(const void* s, int64_t v) {
  if constexpr (T == c10::ScalarType::Float) {
    return static_cast<const float*>(s)[v];
  } else if constexpr (T == c10::ScalarType::Half) {
    return _cvtsh_ss(static_cast<const uint16_t*>(s)[v]);
  } else {
    return bf16_bits_to_float(static_cast<const uint16_t*>(s)[v]);
  }
}

template <c10::ScalarType T>
__attribute__((target("avx2,f16c"))) void pack_avx2(const void* src, int64_t ld, int64_t rows,
                                                    int64_t cols, int W, const float* w,
                                                    float* dst) {
  const int64_t esize = T == c10::ScalarType::Float ? 4 : 2;
  const char* base = static_cast<const char*>(src);
  for (int64_t p = 0; p < rows; ++p) {
    const void* s = base + p * ld * esize;
    float* o = dst + p * W;
    int64_t v = 0;
    if (w == nullptr) {
      for (; v + 8 <= cols; v += 8) _mm256_storeu_ps(o + v, load8<T>(s, v));
      for (; v < cols; ++v) o[v] = load1<T>(s, v);
    } else {
      const __m256 sc = _mm256_set1_ps(w[p]);
      for (; v + 8 <= cols; v += 8) _mm256_storeu_ps(o + v, _mm256_mul_ps(load8<T>(s, v), sc));
      for (; v < cols; ++v) o[v] = load1<T>(s, v) * w[p];
    }
  }
}

// GCC 12's AVX-512 headers build some conversions from _mm512_undefined_*(), which
// -Wmaybe-uninitialized reports as a false positive once inlined here.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// AVX-512: 16 lanes per step with fault-suppressing masked loads, so the 12-wide B panels and
// the ragged last panel need no scalar tail.
template <c10::ScalarType T>
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 load16(const void* s,
                                                                         int64_t v,
                                                                         __mmask16 m) {
  if constexpr (T == c10::ScalarType::Float) {
    return _mm512_maskz_loadu_ps(m, static_cast<const float*>(s) + v);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(s) + v);
    if constexpr (T == c10::ScalarType::Half) {
      return _mm512_cvtph_ps(h);
    } else {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
  }
}

// Full panel of a compile-time width: the lane loop and its masks unroll away.
template <c10::ScalarType T, int W, bool Weighted>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void pack_avx512_full(
    const void* src, int64_t ld, int64_t rows, const float* w, float* dst) {
  constexpr int64_t esize = T == c10::ScalarType::Float ? 4 : 2;
  const char* base = static_cast<const char*>(src);
  for (int64_t p = 0; p < rows; ++p) {
    const void* s = base + p * ld * esize;
    float* o = dst + p * W;
#pragma GCC unroll 4
    for (int v = 0; v < W; v += 16) {
      constexpr int kRest = W % 16 == 0 ? 16 : W % 16;
      const __mmask16 m = v + 16 <= W ? __mmask16(0xFFFF) : __mmask16((1u << kRest) - 1u);
      __m512 val = load16<T>(s, v, m);
      if constexpr (Weighted) val = _mm512_mul_ps(val, _mm512_set1_ps(w[p]));
      _mm512_mask_storeu_ps(o + v, m, val);
    }
  }
}

template <c10::ScalarType T>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void pack_avx512(
    const void* src, int64_t ld, int64_t rows, int64_t cols, int W, const float* w, float* dst) {
  if (cols == W && W == 12)
    return w ? pack_avx512_full<T, 12, true>(src, ld, rows, w, dst)
             : pack_avx512_full<T, 12, false>(src, ld, rows, w, dst);
  if (cols == W && W == 32)
    return w ? pack_avx512_full<T, 32, true>(src, ld, rows, w, dst)
             : pack_avx512_full<T, 32, false>(src, ld, rows, w, dst);
  const int64_t esize = T == c10::ScalarType::Float ? 4 : 2;
  const char* base = static_cast<const char*>(src);
  for (int64_t p = 0; p < rows; ++p) {
    const void* s = base + p * ld * esize;
    float* o = dst + p * W;
    const __m512 sc = _mm512_set1_ps(w != nullptr ? w[p] : 1.0f);
    for (int64_t v = 0; v < cols; v += 16) {
      const int64_t n = std::min<int64_t>(16, cols - v);
      const __mmask16 m = static_cast<__mmask16>((1u << n) - 1u);
      __m512 val = load16<T>(s, v, m);
      if (w != nullptr) val = _mm512_mul_ps(val, sc);
      _mm512_mask_storeu_ps(o + v, m, val);
    }
  }
}

#pragma GCC diagnostic pop

bool has_avx512bw() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl");
  return ok;
}
#endif  // CURVFAST_X86

}  // namespace

namespace {

// 2: AVX-512 (F, BW, VL), 1: AVX2 + FMA + F16C, 0: portable C++. CURVFAST_CPU_ISA can only
// lower what the CPU supports.
int isa_level() {
  int level = 0;
#ifdef CURVFAST_X86
  level = has_avx512bw() ? 2 : has_avx2() ? 1 : 0;
#endif
  if (const char* force = std::getenv("CURVFAST_CPU_ISA")) {
    if (std::strcmp(force, "generic") == 0) level = 0;
    else if (std::strcmp(force, "avx2") == 0) level = std::min(level, 1);
  }
  return level;
}

}  // namespace

const SyrkKernel& select_syrk_kernel() {
  switch (isa_level()) {
#ifdef CURVFAST_X86
    case 2: return kAvx512;
    case 1: return kAvx2;
#endif
    default: return kGeneric;
  }
}

void pack_panel(const void* src, c10::ScalarType dtype, int64_t ld, int64_t rows, int64_t cols,
                int W, const float* w, float* dst) {
  TORCH_CHECK(dtype == c10::ScalarType::Float || dtype == c10::ScalarType::BFloat16 ||
                  dtype == c10::ScalarType::Half,
              "curvfast: covariance_update cannot read x of dtype ", dtype);
#ifdef CURVFAST_X86
  const int level = isa_level();
  if (level >= 2) {
    switch (dtype) {
      case c10::ScalarType::Float:
        return pack_avx512<c10::ScalarType::Float>(src, ld, rows, cols, W, w, dst);
      case c10::ScalarType::BFloat16:
        return pack_avx512<c10::ScalarType::BFloat16>(src, ld, rows, cols, W, w, dst);
      default:
        return pack_avx512<c10::ScalarType::Half>(src, ld, rows, cols, W, w, dst);
    }
  }
  if (level >= 1) {
    switch (dtype) {
      case c10::ScalarType::Float:
        return pack_avx2<c10::ScalarType::Float>(src, ld, rows, cols, W, w, dst);
      case c10::ScalarType::BFloat16:
        return pack_avx2<c10::ScalarType::BFloat16>(src, ld, rows, cols, W, w, dst);
      default:
        return pack_avx2<c10::ScalarType::Half>(src, ld, rows, cols, W, w, dst);
    }
  }
#endif
  pack_generic(src, dtype, ld, rows, cols, W, w, dst);
}

}  // namespace curvfast::cpu
