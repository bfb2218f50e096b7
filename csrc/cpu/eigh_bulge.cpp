// Stage 2 of the two-stage eigensolver: band -> tridiagonal by bulge chasing, and the blocked
// back-transformation of its reflectors.
//
// Sweep j annihilates column j below the subdiagonal with a reflector on rows j+1..j+b; the
// right-application to the block below creates a bulge, whose first column the next reflector
// (rows j+1+s*b ..) annihilates, and so on down the band. All work is on a b x b window of a
// compact column-major band buffer (2b+1 rows), so it stays in L1/L2; only the lower triangle
// is stored. Two workers chase consecutive sweeps in a pipeline (the rule of eigh_chase.h), and
// the step kernel is compiled for AVX2/FMA as well (picked at run time).
#include "eigh_chase.h"
#include "eigh_twostage.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <ctime>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <memory>
#include <thread>

namespace curvfast {
namespace eigh2 {
namespace {

template <typename scalar_t>
struct Band {
  int64_t n, ld;
  std::vector<scalar_t> a;
  Band(int64_t n_, int64_t b) : n(n_), ld(2 * b + 1), a((size_t)(n_ * (2 * b + 1)), scalar_t(0)) {}
  // Column c from row r (r >= c): contiguous.
  scalar_t* col(int64_t r, int64_t c) { return a.data() + c * ld + (r - c); }
};

// H = I - tau v v^T with H x = beta e1 (LAPACK larfg convention); v[0] = 1.
template <typename scalar_t>
scalar_t make_reflector(scalar_t* x, int64_t L, scalar_t* v, scalar_t& tau) {
  const scalar_t alpha = x[0];
  double xn = 0;
  for (int64_t i = 1; i < L; ++i) xn += double(x[i]) * double(x[i]);
  v[0] = 1;
  if (xn == 0) {
    tau = 0;
    for (int64_t i = 1; i < L; ++i) v[i] = 0;
    return alpha;
  }
  const double beta = -std::copysign(std::sqrt(double(alpha) * double(alpha) + xn), double(alpha));
  tau = scalar_t((beta - double(alpha)) / beta);
  const scalar_t scale = scalar_t(1.0 / (double(alpha) - beta));
  for (int64_t i = 1; i < L; ++i) v[i] = x[i] * scale;
  return scalar_t(beta);
}

#define CURVFAST_INLINE __attribute__((always_inline)) inline

// Dot product with independent partial sums (vectorizes without reassociation flags).
template <typename T>
CURVFAST_INLINE T dotv(const T* __restrict a, const T* __restrict x, int64_t L) {
  constexpr int U = 64 / sizeof(T);
  T acc[U] = {};
  int64_t i = 0;
  for (; i + U <= L; i += U)
    for (int u = 0; u < U; ++u) acc[u] += a[i + u] * x[i + u];
  T s = 0;
  for (; i < L; ++i) s += a[i] * x[i];
  for (int h = U / 2; h >= 1; h /= 2)
    for (int u = 0; u < h; ++u) acc[u] += acc[u + h];
  return acc[0] + s;
}

// Step (j, s) of the chase: reflector on rows r0 = j+1+s*b .. r0+L-1 annihilating column c0
// below r0, left-applied to the rest of the block rows, two-sided to the diagonal block and
// right-applied to the block below (which creates the next bulge). Footprint: rows
// [r0, r0+2b-1] x columns [r0-b, r0+b-1], as in the window algorithm (eigh_chase.h).
template <typename scalar_t>
CURVFAST_INLINE void chase_step(Band<scalar_t>& A, int64_t n, int64_t b, int64_t j, int64_t s,
                                Sb2stReflectors& refl, scalar_t* __restrict v, scalar_t* __restrict p,
                                scalar_t* __restrict w) {
  const int64_t r0 = j + 1 + s * b;
  const int64_t L = std::min(b, n - r0);
  const int64_t c0 = s == 0 ? j : r0 - b;  // column whose entries below r0 are annihilated
  scalar_t tau = 0;
  {
    scalar_t* xc = A.col(r0, c0);
    const scalar_t beta = make_reflector<scalar_t>(xc, L, v, tau);
    xc[0] = beta;
    for (int64_t i = 1; i < L; ++i) xc[i] = 0;
  }
  const int64_t idx = refl.first[j] + s;
  refl.tau[idx] = tau;
  for (int64_t i = 0; i < L; ++i) refl.v[idx * b + i] = v[i];
  // H = I: nothing to apply, but later steps still clean the bulge the previous sweep left.
  if (tau == scalar_t(0)) return;
  // (a) Left-apply H to the rest of the block rows r0.. x columns c0+1 .. c0+b-1 (s >= 1).
  if (s > 0) {
    for (int64_t c = c0 + 1; c < c0 + b; ++c) {
      scalar_t* __restrict col = A.col(r0, c);
      const scalar_t dot = tau * dotv(v, col, L);
      for (int64_t i = 0; i < L; ++i) col[i] -= dot * v[i];
    }
  }
  // (b) Two-sided update of the diagonal block (lower triangle): p = tau A v,
  //     w = p - tau/2 (p.v) v, A -= v w^T + w v^T.
  for (int64_t i = 0; i < L; ++i) p[i] = 0;
  for (int64_t c = 0; c < L; ++c) {
    const scalar_t* __restrict col = A.col(r0 + c, r0 + c);
    const scalar_t vc = v[c];
    p[c] += dotv(col, v + c, L - c);
    for (int64_t i = 1; i < L - c; ++i) p[c + i] += col[i] * vc;
  }
  for (int64_t i = 0; i < L; ++i) p[i] *= tau;
  const scalar_t half = scalar_t(0.5) * tau * dotv(p, v, L);
  for (int64_t i = 0; i < L; ++i) p[i] -= half * v[i];
  for (int64_t c = 0; c < L; ++c) {
    scalar_t* __restrict col = A.col(r0 + c, r0 + c);
    const scalar_t vc = v[c], pc = p[c];
    for (int64_t i = 0; i < L - c; ++i) col[i] -= v[c + i] * pc + p[c + i] * vc;
  }
  // (c) Right-apply H to the block below: rows r0+b .. r0+2b-1, columns r0 .. r0+L-1.
  const int64_t rb = r0 + b;
  if (rb < n) {
    const int64_t Lb = std::min(b, n - rb);
    for (int64_t i = 0; i < Lb; ++i) w[i] = 0;
    for (int64_t c = 0; c < L; ++c) {
      const scalar_t* __restrict col = A.col(rb, r0 + c);
      const scalar_t vc = v[c];
      for (int64_t i = 0; i < Lb; ++i) w[i] += col[i] * vc;
    }
    for (int64_t i = 0; i < Lb; ++i) w[i] *= tau;
    for (int64_t c = 0; c < L; ++c) {
      scalar_t* __restrict col = A.col(rb, r0 + c);
      const scalar_t vc = v[c];
      for (int64_t i = 0; i < Lb; ++i) col[i] -= w[i] * vc;
    }
  }
}

// Sweeps in flight: sweeps are handed out in increasing order by `ticket`; sweep j runs step s
// once sweep j-1 has completed chase::wait_for(n, b, j, s) steps (progress[j-1]). Two steps
// that the rule lets run at the same time have disjoint footprints, and every entry sees the
// same operations in the same order as the sequential chase, so the result does not depend on
// the number of workers. The owner of the oldest unfinished sweep never waits: no deadlock.
template <typename scalar_t>
struct ChaseShared {
  Band<scalar_t>* A;
  int64_t n, b;
  Sb2stReflectors* refl;
  std::atomic<int64_t> ticket{0};
  std::unique_ptr<std::atomic<int64_t>[]> progress;
};

template <typename scalar_t>
CURVFAST_INLINE void chase_worker_body(ChaseShared<scalar_t>& sh) {
  const int64_t n = sh.n, b = sh.b, sweeps = n - 1;
  std::vector<scalar_t> v(b), p(b), w(2 * b);
  for (int64_t j; (j = sh.ticket.fetch_add(1)) < sweeps;) {
    const int64_t steps = sh.refl->steps[j];
    for (int64_t s = 0; s < steps; ++s) {
      if (j > 0) {
        const int64_t need = chase::wait_for(n, b, j, s);
        for (int spin = 0; sh.progress[j - 1].load(std::memory_order_acquire) < need; ++spin)
          if (spin > 64) std::this_thread::yield();
      }
      chase_step<scalar_t>(*sh.A, n, b, j, s, *sh.refl, v.data(), p.data(), w.data());
      sh.progress[j].store(s + 1, std::memory_order_release);
    }
  }
}

template <typename scalar_t>
__attribute__((target("avx2,fma"))) void chase_worker_avx2(ChaseShared<scalar_t>& sh) {
  chase_worker_body<scalar_t>(sh);
}
template <typename scalar_t>
void chase_worker_generic(ChaseShared<scalar_t>& sh) {
  chase_worker_body<scalar_t>(sh);
}

template <typename scalar_t>
void sb2st_impl(const at::Tensor& B_in, int64_t b, std::vector<double>& d, std::vector<double>& e,
                Sb2stReflectors& refl) {
  const int64_t n = B_in.size(0);
  at::Tensor B = B_in.contiguous();
  const scalar_t* bp = B.data_ptr<scalar_t>();
  Band<scalar_t> A(n, b);
  for (int64_t c = 0; c < n; ++c)
    for (int64_t r = c; r < std::min(n, c + b + 1); ++r) *A.col(r, c) = bp[r * n + c];

  refl.n = n;
  refl.b = b;
  refl.first.assign(std::max<int64_t>(n - 1, 0), 0);
  refl.steps.assign(std::max<int64_t>(n - 1, 0), 0);
  int64_t total = 0;
  for (int64_t j = 0; j + 1 < n; ++j) {
    refl.first[j] = total;
    refl.steps[j] = (n - 1 - j + b - 1) / b;
    total += refl.steps[j];
  }
  refl.tau.assign(total, 0.0);
  refl.v.assign(total * b, 0.0);

  if (n > 1) {
    ChaseShared<scalar_t> sh;
    sh.A = &A, sh.n = n, sh.b = b, sh.refl = &refl;
    sh.progress.reset(new std::atomic<int64_t>[n - 1]);
    for (int64_t j = 0; j + 1 < n; ++j) sh.progress[j].store(0, std::memory_order_relaxed);
    static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    auto work = [&] { avx2 ? chase_worker_avx2<scalar_t>(sh) : chase_worker_generic<scalar_t>(sh); };
    // A second worker pays off once sweeps are long enough to pipeline (a few steps each).
    const int workers = (n >= 16 * b && at::get_num_threads() >= 2 && !at::in_parallel_region()) ? 2 : 1;
    run_concurrently(workers, [&](int64_t) { work(); });
  }
  d.resize(n);
  e.resize(std::max<int64_t>(n - 1, 0));
  for (int64_t i = 0; i < n; ++i) d[i] = *A.col(i, i);
  for (int64_t i = 0; i + 1 < n; ++i) e[i] = *A.col(i + 1, i);
}

}  // namespace

void sb2st(const at::Tensor& B, int64_t b, std::vector<double>& d, std::vector<double>& e,
           Sb2stReflectors& refl) {
  TORCH_CHECK(b >= 1, "sb2st: bandwidth must be >= 1, got ", b);
  if (B.scalar_type() == at::kDouble)
    sb2st_impl<double>(B, b, d, e, refl);
  else
    sb2st_impl<float>(B.to(at::kFloat), b, d, e, refl);
}

// Blocks of nb = min(b/2, 32) sweeps: (b + nb - 1) x nb parallelograms, zero fraction
// (nb-1)/(b+nb-1) (a third at b = 64, a fifth at b = 128) while the GEMM inner dimension stays 32.
// Measured at n = 2048..4096: b = 64: nb = 16..32 ~25% faster than nb = 64, nb = 8 slower again;
// b = 128: nb = 24..32 ~10% faster than nb = 64 (n = 4096, Q2 1.10 s vs 1.30 s).
int64_t sb2st_default_nb(int64_t b) { return std::max<int64_t>(1, std::min<int64_t>(b / 2, 32)); }

namespace {

// Block G(J,s) of sb2st_apply: step s of sweeps j0 .. j0+cnt-1, rows rs .. rs+rows-1.
struct Q2Desc {
  int64_t j0, cnt, s, rs, rows;
};

// Builds one block in double: Vc (cnt x rows, row t = reflector t, nonzero on [t, t+len_t)), the
// triangular T of I - V T V^T (larft recurrence on S = V^T V) and W = V T (rows x cnt), all with
// contiguous inner loops (vectorized; compiled for AVX2/FMA as well).
CURVFAST_INLINE void q2_build_body(const Sb2stReflectors& refl, const Q2Desc& q, std::vector<double>& Vc,
                                   std::vector<double>& T, std::vector<double>& W, std::vector<double>& S,
                                   std::vector<int64_t>& len) {
  const int64_t n = refl.n, b = refl.b, rows = q.rows, r = q.cnt;
  Vc.assign(r * rows, 0.0);
  T.assign(r * r, 0.0);
  W.assign(rows * r, 0.0);
  S.assign(r, 0.0);
  len.assign(r, 0);
  for (int64_t t = 0; t < r; ++t) {
    const int64_t idx = refl.first[q.j0 + t] + q.s;
    const double tau = refl.tau[idx];
    len[t] = std::min(b, n - (q.rs + t));
    double* __restrict vt = Vc.data() + t * rows;
    const double* __restrict src = refl.v.data() + idx * b;
    for (int64_t i = 0; i < len[t]; ++i) vt[t + i] = src[i];
    // S[a] = (V^T V)[a, t] over the rows both columns cover: [t, min(a+len_a, t+len_t)).
    for (int64_t a = 0; a < t; ++a) {
      const int64_t hi = std::min(a + len[a], t + len[t]);
      S[a] = hi > t ? dotv<double>(Vc.data() + a * rows + t, vt + t, hi - t) : 0.0;
    }
    T[t * r + t] = tau;
    for (int64_t a = 0; a < t; ++a) T[a * r + t] = -tau * dotv<double>(T.data() + a * r + a, S.data() + a, t - a);
  }
  // W[i, c] = sum_a V[i, a] T[a, c] (c >= a).
  for (int64_t a = 0; a < r; ++a) {
    const double* __restrict ta = T.data() + a * r;
    const double* __restrict va = Vc.data() + a * rows;
    for (int64_t i = a; i < a + len[a]; ++i) {
      const double via = va[i];
      double* __restrict wi = W.data() + i * r;
      for (int64_t c = a; c < r; ++c) wi[c] += via * ta[c];
    }
  }
}

__attribute__((target("avx2,fma"))) void q2_build_avx2(const Sb2stReflectors& refl, const Q2Desc& q,
                                                       std::vector<double>& Vc, std::vector<double>& T,
                                                       std::vector<double>& W, std::vector<double>& S,
                                                       std::vector<int64_t>& len) {
  q2_build_body(refl, q, Vc, T, W, S, len);
}
void q2_build_generic(const Sb2stReflectors& refl, const Q2Desc& q, std::vector<double>& Vc, std::vector<double>& T,
                      std::vector<double>& W, std::vector<double>& S, std::vector<int64_t>& len) {
  q2_build_body(refl, q, Vc, T, W, S, len);
}

}  // namespace

// Q2 = H(0,0) H(0,1) .. H(1,0) .. in generation order. Reflectors (j,s) of nb <= b consecutive
// sweeps at the same step s touch rows j0+1+s*b .. j0+nb-1+(s+1)*b and form one compact WY block
// G(J,s). (j,s) overlaps (j',s) and (j',s-1) for j < j' only, so within a sweep block the product
// is G(J,smax) .. G(J,1) G(J,0): Q2 Z applies blocks last to first and, inside, s = 0 first.
std::vector<WYBlock> sb2st_build_blocks(const Sb2stReflectors& refl, int64_t nb, const at::TensorOptions& opts,
                                        bool parallel) {
  const int64_t n = refl.n, b = refl.b, sweeps = n - 1;
  if (sweeps <= 0) return {};
  if (nb <= 0) nb = sb2st_default_nb(b);
  nb = std::max<int64_t>(1, std::min(nb, b));
  // Blocks in product order: sweep blocks first to last, inside one G(J,smax) .. G(J,0).
  std::vector<Q2Desc> desc;
  for (int64_t j0 = 0; j0 < sweeps; j0 += nb) {
    const int64_t jn = std::min(j0 + nb, sweeps);
    for (int64_t s = refl.steps[j0] - 1; s >= 0; --s) {
      const int64_t rs = j0 + 1 + s * b;
      int64_t cnt = 0;
      bool any = false;
      for (int64_t j = j0; j < jn && s < refl.steps[j]; ++j, ++cnt) any |= refl.tau[refl.first[j] + s] != 0.0;
      if (!any) continue;
      const int64_t rows = std::min(n, j0 + cnt + (s + 1) * b) - rs;
      desc.push_back({j0, cnt, s, rs, rows});
    }
  }
  std::vector<WYBlock> blocks(desc.size());
  const auto dt = opts.dtype().toScalarType();
  // Each block's V is stored transposed (cnt x rows, contiguous) and used through a view; W = V T
  // (rows x cnt). Plain loops in the parallel region, output written straight in Z's dtype.
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  std::vector<at::Tensor> Vts(desc.size()), Ws(desc.size());
  for (size_t g = 0; g < desc.size(); ++g) {
    Vts[g] = at::empty({desc[g].cnt, desc[g].rows}, opts);
    Ws[g] = at::empty({desc[g].rows, desc[g].cnt}, opts);
  }
  auto build = [&](int64_t g0, int64_t g1) {
    std::vector<double> Vc, T, W, S;
    std::vector<int64_t> len;
    for (int64_t g = g0; g < g1; ++g) {
      const Q2Desc& q = desc[g];
      if (avx2)
        q2_build_avx2(refl, q, Vc, T, W, S, len);
      else
        q2_build_generic(refl, q, Vc, T, W, S, len);
      const int64_t m = q.rows * q.cnt;
      if (dt == at::kDouble) {
        std::copy(Vc.begin(), Vc.begin() + m, Vts[g].data_ptr<double>());
        std::copy(W.begin(), W.begin() + m, Ws[g].data_ptr<double>());
      } else {
        float* vo = Vts[g].data_ptr<float>();
        float* wo = Ws[g].data_ptr<float>();
        for (int64_t i = 0; i < m; ++i) vo[i] = float(Vc[i]), wo[i] = float(W[i]);
      }
      blocks[g] = {q.rs, Vts[g].t(), at::Tensor(), Ws[g]};
    }
  };
  if (parallel)
    at::parallel_for(0, (int64_t)desc.size(), 16, build);
  else
    build(0, (int64_t)desc.size());
  return blocks;
}

void sb2st_apply(const Sb2stReflectors& refl, at::Tensor& Z, int64_t nb) {
  if (refl.n <= 1) return;
  auto t0 = std::chrono::steady_clock::now();
  std::vector<WYBlock> blocks = sb2st_build_blocks(refl, nb, Z.options(), true);
  sb2st_apply_blocks(blocks, Z, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
}

void sb2st_apply_blocks(const std::vector<WYBlock>& blocks, at::Tensor& Z, double build_s) {
  const auto t1 = std::chrono::steady_clock::now();
  const std::clock_t c1 = std::clock();
  apply_wy_blocks(blocks, Z);
  const double cpu = double(std::clock() - c1) / CLOCKS_PER_SEC;
  if (std::getenv("CURVFAST_EIGH_PROFILE"))
    std::fprintf(stderr, "  sb2st_apply: %zu blocks, build %.3f s, apply %.3f s (cpu %.3f s)\n", blocks.size(),
                 build_s,
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count(), cpu);
}

}  // namespace eigh2
}  // namespace curvfast
