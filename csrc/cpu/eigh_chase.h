// Band -> tridiagonal bulge chasing as a window algorithm shared by the CUDA kernel
// (csrc/cuda/eigh_bulge.cu) and its CPU emulation (csrc/cpu/eigh_emulate.cpp). Host-only
// C++ when included from a .cpp, __host__ __device__ under nvcc.
//
// Same arithmetic as csrc/cpu/eigh_bulge.cpp (sequential sb2st): step (j, s) of sweep j builds a
// reflector on rows r0 = j+1+s*b .. r0+L-1 that annihilates column c0 below r0, left-applies it
// to the rest of the block rows (s >= 1), two-sided to the diagonal block and right-applies it
// to the block below (which creates the next bulge). Band buffer: compact, column-major, lower
// part only, ld = 2b+1: entry (r, c), 0 <= r-c <= 2b, at band[c*ld + (r-c)].
//
// Threads. One step is split into kPhases phases; inside a phase every thread `tid` of `nt`
// does its own tasks and writes only its own outputs, phases are separated by a barrier
// (__syncthreads on the GPU; the CPU emulation runs tid = 0..nt-1 one after the other). So the
// emulation reproduces the kernel's partition and summation order exactly.
//
// Sweeps in flight (the pipelining rule). Step (j, s) touches rows [R, R+2b-1] x columns
// [R-b, R+b-1], R = j+1+s*b. Two steps of sweeps j' > j overlap only if their R differ by at most
// 2b-1, so (j, s) conflicts with (j-1, s') only for s' <= s+2, and with older sweeps only where
// the chain j-1 -> j-2 .. already orders them. Hence: sweep j may run step s once sweep j-1 has
// completed min(s+3, steps(j-1)) steps. Each sweep keeps a progress counter (completed steps);
// the sweep's owner publishes it after each step (release), its successor waits on it
// (acquire). Every datum then sees the same sequence of operations as in the sequential order,
// so results do not depend on how many sweeps run at once (the emulation test checks bitwise
// equality across worker counts). Sweeps are handed out by an atomic ticket in increasing
// order to whichever block (worker) asks next: the owner of the oldest unfinished sweep is
// always running and never waits, so the pipeline cannot deadlock even when not all blocks are
// resident (no cooperative launch needed, safe next to other kernels on other streams).
//
// Reflector record (for the blocked back-transformation, eigh_twostage.h: Sb2stBlocks): the
// reflectors of nb consecutive sweeps J*nb .. at one step s form block g = gfirst[J] + s of
// V (G, 2b, nb) and tau (G, nb); sweep j = J*nb + t writes column t, rows t .. t+L-1 (v[0] = 1).
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define CURVFAST_HD __host__ __device__ __forceinline__
#else
#define CURVFAST_HD inline
#endif

namespace curvfast {
namespace eigh2 {
namespace chase {

constexpr int kPhases = 6;

CURVFAST_HD int64_t steps_of(int64_t n, int64_t b, int64_t j) { return (n - 1 - j + b - 1) / b; }

// Completed steps of sweep j-1 that step (j, s) must wait for (0 for the first sweep).
CURVFAST_HD int64_t wait_for(int64_t n, int64_t b, int64_t j, int64_t s) {
  if (j == 0) return 0;
  const int64_t prev = steps_of(n, b, j - 1);
  return s + 3 < prev ? s + 3 : prev;
}

struct Geometry {
  int64_t j, s, r0, L, c0, rb, Lb;
};

CURVFAST_HD Geometry geometry(int64_t n, int64_t b, int64_t j, int64_t s) {
  Geometry g;
  g.j = j;
  g.s = s;
  g.r0 = j + 1 + s * b;
  g.L = b < n - g.r0 ? b : n - g.r0;
  g.c0 = s == 0 ? j : g.r0 - b;
  g.rb = g.r0 + b;
  g.Lb = g.rb < n ? (b < n - g.rb ? b : n - g.rb) : 0;
  return g;
}

// Band loads bypass the (non-coherent) L1 on the GPU: other blocks write the same lines.
template <typename T>
CURVFAST_HD T ld(const T* p) {
#if defined(__CUDA_ARCH__)
  return __ldcg(p);
#else
  return *p;
#endif
}

template <typename T>
struct Window {
  T* band;         // compact band buffer
  int64_t ld, n, b, nb;
  const int64_t* gfirst;  // per sweep block J: index of block (J, 0)
  T* V;            // (G, 2b, nb) reflector blocks
  T* tau;          // (G, nb)
  // Scratch of one block / worker: v, p, w (b each), red (nt), scal (4).
  T* v;
  T* p;
  T* w;
  double* red;
  double* scal;    // [0] tau, [1] scale, [2] tau/2 * (p.v)

  CURVFAST_HD T* col(int64_t r, int64_t c) const { return band + c * ld + (r - c); }
};

// Phase `ph` of step g for thread tid of nt. Returns false after phase 2 when the reflector is
// the identity (tau == 0): the step ends there (the value is the same in every thread).
template <typename T>
CURVFAST_HD bool phase(const Window<T>& W, const Geometry& g, int ph, int tid, int nt) {
  const int64_t L = g.L, b = W.b;
  T* x = W.col(g.r0, g.c0);  // column c0 from row r0: the entries to annihilate
  switch (ph) {
    case 0: {  // partial sums of |x[1:]|^2 (double, like sequential sb2st)
      double acc = 0;
      for (int64_t i = 1 + tid; i < L; i += nt) {
        const double xi = double(ld(x + i));
        acc += xi * xi;
      }
      W.red[tid] = acc;
      return true;
    }
    case 1: {  // reflector H = I - tau v v^T, H x = beta e1 (LAPACK larfg convention)
      if (tid != 0) return true;
      double xn = 0;
      for (int i = 0; i < nt; ++i) xn += W.red[i];
      const T alpha = ld(x);
      T tau = 0, scale = 0, beta = alpha;
      if (xn != 0) {
        const double bt = -copysign(sqrt(double(alpha) * double(alpha) + xn), double(alpha));
        tau = T((bt - double(alpha)) / bt);
        scale = T(1.0 / (double(alpha) - bt));
        beta = T(bt);
      }
      x[0] = beta;
      W.scal[0] = double(tau);
      W.scal[1] = double(scale);
      const int64_t J = g.j / W.nb, t = g.j % W.nb;
      W.tau[(W.gfirst[J] + g.s) * W.nb + t] = tau;
      return true;
    }
    case 2: {  // v = x / (alpha - beta), x[1:] = 0, record v
      const T scale = T(W.scal[1]);
      const int64_t J = g.j / W.nb, t = g.j % W.nb;
      T* rec = W.V + ((W.gfirst[J] + g.s) * 2 * b + t) * W.nb + t;  // (row t, column t) of the block
      for (int64_t i = tid; i < L; i += nt) {
        T vi;
        if (i == 0) {
          vi = T(1);
        } else {
          vi = ld(x + i) * scale;
          x[i] = T(0);
        }
        W.v[i] = vi;
        rec[i * W.nb] = vi;
      }
      return W.scal[0] != 0.0;
    }
    case 3: {  // p = tau A v (diagonal block), w = tau A_below v, left update of columns c0+1..
      const T tau = T(W.scal[0]);
      const int64_t nl = g.s > 0 ? b - 1 : 0;
      const int64_t tasks = L + g.Lb + nl;
      for (int64_t k = tid; k < tasks; k += nt) {
        if (k < L) {  // row k of the symmetric block, lower part stored
          T acc = 0;
          for (int64_t c = 0; c <= k; ++c) acc += ld(W.col(g.r0 + k, g.r0 + c)) * W.v[c];
          for (int64_t c = k + 1; c < L; ++c) acc += ld(W.col(g.r0 + c, g.r0 + k)) * W.v[c];
          W.p[k] = tau * acc;
        } else if (k < L + g.Lb) {  // row rb+i of the block below
          const int64_t i = k - L;
          T acc = 0;
          for (int64_t c = 0; c < L; ++c) acc += ld(W.col(g.rb + i, g.r0 + c)) * W.v[c];
          W.w[i] = tau * acc;
        } else {  // column c0+1+q, rows r0 .. r0+L-1: H^T applied from the left
          T* cp = W.col(g.r0, g.c0 + 1 + (k - L - g.Lb));
          T dot = 0;
          for (int64_t i = 0; i < L; ++i) dot += W.v[i] * ld(cp + i);
          dot *= tau;
          for (int64_t i = 0; i < L; ++i) cp[i] = ld(cp + i) - dot * W.v[i];
        }
      }
      return true;
    }
    case 4: {  // half = tau/2 (p . v)
      if (tid != 0) return true;
      T pv = 0;
      for (int64_t i = 0; i < L; ++i) pv += W.p[i] * W.v[i];
      W.scal[2] = double(T(0.5) * T(W.scal[0]) * pv);
      return true;
    }
    case 5: {  // A -= v q^T + q v^T (q = p - half v) on the diagonal block; block below -= w v^T
      const T half = T(W.scal[2]);
      for (int64_t k = tid; k < L + (g.Lb > 0 ? L : 0); k += nt) {
        if (k < L) {
          const int64_t c = k;
          T* cp = W.col(g.r0 + c, g.r0 + c);
          const T vc = W.v[c], qc = W.p[c] - half * vc;
          for (int64_t i = 0; i < L - c; ++i) {
            const T qi = W.p[c + i] - half * W.v[c + i];
            cp[i] = ld(cp + i) - (W.v[c + i] * qc + qi * vc);
          }
        } else {
          const int64_t c = k - L;
          T* cp = W.col(g.rb, g.r0 + c);
          const T vc = W.v[c];
          for (int64_t i = 0; i < g.Lb; ++i) cp[i] = ld(cp + i) - W.w[i] * vc;
        }
      }
      return true;
    }
  }
  return true;
}

}  // namespace chase
}  // namespace eigh2
}  // namespace curvfast
