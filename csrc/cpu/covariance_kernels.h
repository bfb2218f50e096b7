// Building blocks of the CPU covariance update (a SYRK: C += Xᵀ diag(w) X, one triangle).
//
// The driver (covariance.cpp) walks T in chunks of kc rows. Each chunk of x is widened to
// fp32 and packed into two panel layouts that the micro-kernel streams:
//   A: panels of MR columns, element (p, v) at a[p * MR + v]   (weighted by w[t] if given)
//   B: panels of NR columns, element (p, r) at b[p * NR + r]   (unweighted)
// A micro-kernel call adds the MR x NR outer-product sum over p into acc[j0 + r, i0 + v].
// Columns past d stay zero in the packed buffers, so edge tiles need no special casing
// inside the kernel.
#pragma once
#include <cstdint>

#include <c10/core/ScalarType.h>

namespace curvfast::cpu {

// c[r * ldc + v] += sum_p b[p * NR + r] * a[p * MR + v]  for r < NR, v < MR.
using MicroKernel = void (*)(int64_t kc, const float* a, const float* b, float* c, int64_t ldc);

struct SyrkKernel {
  const char* name;  // ISA the kernel was compiled for, reported by curvfast._C.cpu_isa()
  int mr;            // micro-tile width along the vectorised (contiguous) index
  int nr;            // micro-tile height (broadcast index)
  MicroKernel micro;
};

// Best kernel this CPU supports. CURVFAST_CPU_ISA=avx512|avx2|generic forces a lower one
// (read on every call, so tests can exercise every path on one machine).
const SyrkKernel& select_syrk_kernel();

// Pack one panel: rows x cols elements of x (row stride ld, in x's dtype) widened to fp32 and
// multiplied by w[p] (when w is given) into dst[p * W + v]; lanes cols..W-1 are not written.
// Uses F16C/AVX2 when the CPU has them.
void pack_panel(const void* src, c10::ScalarType dtype, int64_t ld, int64_t rows, int64_t cols,
                int W, const float* w, float* dst);

// Run fn(tid, nthreads) on torch's intra-op threads (the OpenMP runtime torch already loaded,
// so no second runtime competes for the cores). Serial inside an outer parallel region.
void run_parallel(int nthreads, void (*fn)(void* ctx, int tid, int nthreads), void* ctx);

template <typename F>
void run_parallel(int nthreads, F& f) {
  run_parallel(
      nthreads, [](void* ctx, int tid, int n) { (*static_cast<F*>(ctx))(tid, n); }, &f);
}

}  // namespace curvfast::cpu
