// Stage 1 of the two-stage eigensolver: dense symmetric -> band, blocked Householder.
// Each panel of b columns is QR-factored (at::geqrf) and the trailing matrix gets the two-sided
// update Q^T A Q as one GEMM of inner dimension 2r, so ~all 2n^3 flops of this stage are GEMM.
#include "eigh_twostage.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <exception>
#include <mutex>
#include <thread>

// MKL's C entry point (mkl_set_num_threads_local is a macro for it; the lowercase symbol is
// the Fortran one, which takes a pointer).
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
extern "C" void omp_set_num_threads(int) __attribute__((weak));
extern "C" int omp_get_max_threads() __attribute__((weak));

// The BLAS that ATen calls (MKL in the CPU wheels; LP64 Fortran interface), called directly for
// the many small GEMMs of the back-transformations: no dispatcher overhead per call.
extern "C" void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                       const int*, const float*, const int*, const float*, float*, const int*) __attribute__((weak));
extern "C" void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
                       const int*, const double*, const int*, const double*, double*, const int*)
    __attribute__((weak));

namespace curvfast {
namespace eigh2 {
namespace {

// Storage of a 2-D CPU view for a column-major BLAS call: 'N' for row-major rows (the BLAS sees
// the transpose), 'T' for column-major; false when neither (or the leading dimension is invalid).
bool blas_layout(const at::Tensor& X, char& trans, int64_t& ld) {
  const int64_t r = X.size(0), c = X.size(1);
  if (X.stride(1) == 1 && X.stride(0) >= std::max<int64_t>(1, c)) {
    trans = 'N', ld = X.stride(0);
    return true;
  }
  if (X.stride(0) == 1 && X.stride(1) >= std::max<int64_t>(1, r)) {
    trans = 'T', ld = X.stride(1);
    return true;
  }
  return false;
}

// C = alpha A B + beta C (row-major C), straight to the BLAS when possible, else ATen.
void gemm(const at::Tensor& A, const at::Tensor& B, at::Tensor& C, double alpha, double beta) {
  const int64_t M = A.size(0), K = A.size(1), N = B.size(1);
  char ta, tb, tc;
  int64_t lda, ldb, ldc;
  const bool direct = C.device().is_cpu() && M > 0 && N > 0 && K > 0 && blas_layout(A, ta, lda) &&
                      blas_layout(B, tb, ldb) && blas_layout(C, tc, ldc) && tc == 'N' &&
                      std::max({lda, ldb, ldc, M, N, K}) < (int64_t(1) << 31) &&
                      A.scalar_type() == C.scalar_type() && B.scalar_type() == C.scalar_type() &&
                      ((C.scalar_type() == at::kFloat && sgemm_) || (C.scalar_type() == at::kDouble && dgemm_));
  if (!direct) {
    if (beta == 0 && alpha == 1)
      at::mm_out(C, A, B);
    else if (beta == 0)
      at::mm_out(C, A, B).mul_(alpha);
    else
      C.addmm_(A, B, beta, alpha);
    return;
  }
  const int m = (int)N, n = (int)M, k = (int)K, la = (int)lda, lb = (int)ldb, lc = (int)ldc;
  if (C.scalar_type() == at::kFloat) {
    const float al = (float)alpha, be = (float)beta;
    sgemm_(&tb, &ta, &m, &n, &k, &al, B.data_ptr<float>(), &lb, A.data_ptr<float>(), &la, &be, C.data_ptr<float>(),
           &lc);
  } else {
    dgemm_(&tb, &ta, &m, &n, &k, &alpha, B.data_ptr<double>(), &lb, A.data_ptr<double>(), &la, &beta,
           C.data_ptr<double>(), &lc);
  }
}

}  // namespace

SingleThreadedBlas::SingleThreadedBlas(int threads) {
  if (MKL_Set_Num_Threads_Local) mkl_threads_ = MKL_Set_Num_Threads_Local(threads);  // returns the previous
  if (omp_get_max_threads) omp_threads_ = omp_get_max_threads();
  if (omp_set_num_threads) omp_set_num_threads(threads);
}
SingleThreadedBlas::~SingleThreadedBlas() {
  if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(mkl_threads_);  // 0: the global setting
  if (omp_set_num_threads && omp_threads_ > 0) omp_set_num_threads(omp_threads_);
}

void run_concurrently(int64_t count, const std::function<void(int64_t)>& body) {
  std::exception_ptr err;
  std::mutex mu;
  auto guarded = [&](int64_t t) {
    try {
      body(t);
    } catch (...) {
      std::lock_guard<std::mutex> g(mu);
      if (!err) err = std::current_exception();
    }
  };
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < count; ++t) pool.emplace_back(guarded, t);
  guarded(0);
  for (auto& th : pool) th.join();
  if (err) std::rethrow_exception(err);
}

at::Tensor larft(const at::Tensor& V, const at::Tensor& tau) {
  const int64_t r = V.size(1);
  // S = V^T V is one GEMM; the triangular recurrence T[:i,i] = -tau_i T[:i,:i] S[:i,i] is O(r^3).
  // On CUDA tensors the recurrence runs on the host (r x r): one small copy each way.
  at::Tensor S = at::mm(V.t(), V).to(at::kCPU, at::kDouble).contiguous();
  at::Tensor tau_d = tau.to(at::kCPU, at::kDouble).contiguous();
  at::Tensor T = at::zeros({r, r}, S.options());
  const double* s = S.data_ptr<double>();
  const double* tp = tau_d.data_ptr<double>();
  double* t = T.data_ptr<double>();
  std::vector<double> tmp(r);
  for (int64_t i = 0; i < r; ++i) {
    t[i * r + i] = tp[i];
    for (int64_t a = 0; a < i; ++a) {
      double acc = 0;
      for (int64_t c = a; c < i; ++c) acc += t[a * r + c] * s[c * r + i];
      tmp[a] = -tp[i] * acc;
    }
    for (int64_t a = 0; a < i; ++a) t[a * r + i] = tmp[a];
  }
  return T.to(V.options());
}

// lower_only: only the lower triangle of the trailing matrix is kept up to date, in column
// blocks of cb columns (cb a multiple of b, aligned in absolute coordinates, so every block of
// the trailing matrix on or below the block diagonal stays valid, diagonal blocks whole): the
// rank-2r update costs half a full GEMM, and A22 V is a blocked symmetric product over the valid
// blocks. Stale entries above the block diagonal are overwritten by later panels (R^T rows) or
// lie in the band, which is mirrored from the lower part at the end. Otherwise one column block
// (cb >= n): A22 V and the update are one full GEMM each, twice the update's flops in ~m/cb
// times fewer calls (on a GPU, where each call is a kernel launch).
at::Tensor sy2sb(const at::Tensor& A_in, int64_t b, Sy2sbReflectors& refl, bool lower_only) {
  const int64_t n = A_in.size(0);
  const int64_t cb = lower_only ? b * std::max<int64_t>(1, (256 + b - 1) / b) : b * ((n + b - 1) / b);
  at::Tensor A = A_in.clone(at::MemoryFormat::Contiguous);
  for (int64_t k = 0; k + b < n - 1; k += b) {
    const int64_t r0 = k + b, m = n - r0;            // rows below the band
    const int64_t pw = std::min(b, n - k);           // panel width
    at::Tensor panel = A.narrow(0, r0, m).narrow(1, k, pw);
    auto [qr, tau] = at::geqrf(panel);
    const int64_t r = std::min(m, pw);
    at::Tensor V = qr.narrow(1, 0, r).tril(-1);
    V.diagonal().fill_(1);
    at::Tensor R = qr.triu();
    panel.copy_(R);
    A.narrow(0, k, pw).narrow(1, r0, m).copy_(R.t());
    at::Tensor T = larft(V, tau.narrow(0, 0, r));
    // Two-sided update of the trailing block: A22 -= V Z^T + Z V^T with
    // Y = A22 V T, Z = Y - 1/2 V (T^T V^T Y).
    at::Tensor A22 = A.narrow(0, r0, m).narrow(1, r0, m);
    std::vector<int64_t> edge{0};
    for (int64_t c = (r0 / cb + 1) * cb - r0; c < m; c += cb) edge.push_back(c);
    edge.push_back(m);
    at::Tensor Y = at::zeros({m, r}, A.options());
    for (size_t q = 0; q + 1 < edge.size(); ++q) {
      const int64_t j0 = edge[q], w = edge[q + 1] - j0, j1 = edge[q + 1];
      at::Tensor col = A22.narrow(1, j0, w);
      Y.narrow(0, j0, m - j0).addmm_(col.narrow(0, j0, m - j0), V.narrow(0, j0, w));
      if (j1 < m) Y.narrow(0, j0, w).addmm_(col.narrow(0, j1, m - j1).t(), V.narrow(0, j1, m - j1));
    }
    Y = at::mm(Y, T);
    at::Tensor Z = Y - 0.5 * at::mm(V, at::mm(T.t(), at::mm(V.t(), Y)));
    at::Tensor VZ = at::cat({V, Z}, 1), ZV = at::cat({Z, V}, 1);
    for (size_t q = 0; q + 1 < edge.size(); ++q) {
      const int64_t j0 = edge[q], w = edge[q + 1] - j0;
      A22.narrow(1, j0, w).narrow(0, j0, m - j0).addmm_(VZ.narrow(0, j0, m - j0), ZV.narrow(0, j0, w).t(), 1.0, -1.0);
    }
    refl.off.push_back(r0);
    refl.V.push_back(V);
    refl.T.push_back(T);
  }
  for (int64_t d = 1; d <= std::min(b, n - 1); ++d) A.diagonal(d).copy_(A.diagonal(-d));
  return A;
}

void apply_wy_blocks(const std::vector<WYBlock>& blocks, at::Tensor& Z) {
  const int64_t k = Z.size(1);
  if (k == 0 || blocks.empty()) return;
  // On CUDA one chunk: the GEMMs are already parallel, and other threads would not see the
  // caller's current stream.
  const int64_t chunks = !Z.device().is_cpu()
                             ? 1
                             : std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (k + 63) / 64));
  const int64_t width = (k + chunks - 1) / chunks;
  int64_t rmax = 0;
  for (const auto& blk : blocks) rmax = std::max<int64_t>(rmax, blk.V.size(1));
  // Each chunk is processed in strips of columns whose rows (all of Z's) fit a share of the
  // last-level cache: every block passes over the rows below its offset, so strips that stay in
  // cache across blocks save most of the memory traffic (blocks are re-read per strip instead).
  // 8 MiB per thread (L3 32 MiB here): at n = 4096, b = 64, Q2 1.27 s vs 1.35 s unstripped, Q1 0.74
  // vs 0.81 s.
  constexpr int64_t kStripBytes = int64_t(8) << 20;
  const int64_t rowbytes = std::max<int64_t>(1, Z.size(0) * (int64_t)Z.element_size());
  const int64_t strip = !Z.device().is_cpu() ? width : std::max<int64_t>(64, (kStripBytes / rowbytes) / 16 * 16);
  auto run = [&](int64_t c) {
    const int64_t lo = c * width, w = std::min(k, lo + width) - lo;
    if (w <= 0) return;
    // Y = V^T Z into one reused buffer; Z -= W Y (or V (T Y)) in place: no temporaries of Z's size.
    at::Tensor Ybuf = at::empty({rmax, std::min(w, strip)}, Z.options());
    for (int64_t s0 = 0; s0 < w; s0 += strip) {
      const int64_t sw = std::min(strip, w - s0);
      at::Tensor Zc = Z.narrow(1, lo + s0, sw);
      for (auto it = blocks.rbegin(); it != blocks.rend(); ++it) {
        at::Tensor Zr = Zc.narrow(0, it->off, it->V.size(0));
        at::Tensor Y = Ybuf.narrow(0, 0, it->V.size(1)).narrow(1, 0, sw);
        gemm(it->V.t(), Zr, Y, 1.0, 0.0);
        if (it->W.defined())
          gemm(it->W, Y, Zr, -1.0, 1.0);
        else
          gemm(it->V, at::mm(it->T, Y), Zr, -1.0, 1.0);
      }
    }
  };
  if (chunks == 1) return run(0);
  // Plain threads, each with a thread-local single-threaded BLAS (inside an OpenMP region the
  // BLAS still nested its own threads and ran ~20x slower).
  run_concurrently(chunks, [&](int64_t c) {
    SingleThreadedBlas guard;
    run(c);
  });
}

// Consecutive panels are merged into blocks of about kMergeCols columns, so that the GEMMs of
// the back-transformation have a larger inner dimension (fewer passes over Z):
// (I - V1 T1 V1^T)(I - V2 T2 V2^T) = I - [V1 V2] [[T1, -T1 V1^T V2 T2], [0, T2]] [V1 V2]^T,
// V2 zero-padded at the top to V1's rows. 128 columns measured best at n = 4096 (b = 64): wider
// blocks carry more zero padding.
constexpr int64_t kMergeCols = 128;

void sy2sb_apply(const Sy2sbReflectors& refl, at::Tensor& Z) {
  std::vector<WYBlock> blocks;
  const int64_t cols = kMergeCols;
  const size_t np = refl.off.size();
  for (size_t p = 0; p < np;) {
    size_t q = p + 1;
    int64_t c = refl.V[p].size(1);
    while (q < np && c + refl.V[q].size(1) <= cols) c += refl.V[q++].size(1);
    if (q == p + 1) {
      blocks.push_back({refl.off[p], refl.V[p], refl.T[p]});
      p = q;
      continue;
    }
    const int64_t off = refl.off[p], m = refl.V[p].size(0);
    at::Tensor V = at::zeros({m, c}, refl.V[p].options());
    at::Tensor T = at::zeros({c, c}, refl.T[p].options());
    int64_t c0 = 0;
    for (size_t i = p; i < q; ++i) {
      const int64_t r = refl.V[i].size(1), ro = refl.off[i] - off;
      at::Tensor Vi = V.narrow(1, c0, r).narrow(0, ro, m - ro);
      Vi.copy_(refl.V[i]);
      T.narrow(0, c0, r).narrow(1, c0, r).copy_(refl.T[i]);
      if (c0 > 0) {
        // T[:c0, c0:c0+r] = -T[:c0,:c0] (V[:, :c0]^T V_i) T_i, V_i nonzero from row ro on.
        at::Tensor S = at::mm(V.narrow(1, 0, c0).narrow(0, ro, m - ro).t(), refl.V[i]);
        T.narrow(0, 0, c0).narrow(1, c0, r).copy_(at::mm(at::mm(T.narrow(0, 0, c0).narrow(1, 0, c0), S), refl.T[i]).neg_());
      }
      c0 += r;
    }
    blocks.push_back({off, V, T});
    p = q;
  }
  apply_wy_blocks(blocks, Z);
}

}  // namespace eigh2
}  // namespace curvfast
