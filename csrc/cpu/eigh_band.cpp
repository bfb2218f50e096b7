// Stage 1 of the two-stage eigensolver: dense symmetric -> band, blocked Householder.
// Each panel of b columns is QR-factored (at::geqrf) and the trailing matrix gets the two-sided
// update Q^T A Q as one GEMM of inner dimension 2r, so ~all 2n^3 flops of this stage are GEMM.
#include "eigh_twostage.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <exception>
#include <mutex>
#include <thread>

// MKL's C entry point (mkl_set_num_threads_local is a macro for it; the lowercase symbol is
// the Fortran one, which takes a pointer).
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
extern "C" void omp_set_num_threads(int) __attribute__((weak));
extern "C" int omp_get_max_threads() __attribute__((weak));

namespace curvfast {
namespace eigh2 {

SingleThreadedBlas::SingleThreadedBlas(int threads) {
  if (MKL_Set_Num_Threads_Local) mkl_threads_ = MKL_Set_Num_Threads_Local(threads);  // returns the previous
  if (omp_get_max_threads) omp_threads_ = omp_get_max_threads();
  if (omp_set_num_threads) omp_set_num_threads(threads);
}
SingleThreadedBlas::~SingleThreadedBlas() {
  if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(mkl_threads_);  // 0: the global setting
  if (omp_set_num_threads && omp_threads_ > 0) omp_set_num_threads(omp_threads_);
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

at::Tensor sy2sb(const at::Tensor& A_in, int64_t b, Sy2sbReflectors& refl) {
  const int64_t n = A_in.size(0);
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
    at::Tensor Y = at::mm(at::mm(A22, V), T);
    at::Tensor Z = Y - 0.5 * at::mm(V, at::mm(T.t(), at::mm(V.t(), Y)));
    A22.addmm_(at::cat({V, Z}, 1), at::cat({Z, V}, 1).t(), 1.0, -1.0);
    refl.off.push_back(r0);
    refl.V.push_back(V);
    refl.T.push_back(T);
  }
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
  auto run = [&](int64_t c) {
    const int64_t lo = c * width, w = std::min(k, lo + width) - lo;
    if (w <= 0) return;
    at::Tensor Zc = Z.narrow(1, lo, w);
    for (auto it = blocks.rbegin(); it != blocks.rend(); ++it) {
      at::Tensor Zr = Zc.narrow(0, it->off, it->V.size(0));
      Zr.sub_(at::mm(it->V, at::mm(it->T, at::mm(it->V.t(), Zr))));
    }
  };
  if (chunks == 1) return run(0);
  // Plain threads, each with a thread-local single-threaded BLAS (inside an OpenMP region the
  // BLAS still nested its own threads and ran ~20x slower).
  std::vector<std::thread> pool;
  std::exception_ptr err;
  std::mutex mu;
  for (int64_t c = 0; c < chunks; ++c) {
    pool.emplace_back([&, c] {
      SingleThreadedBlas guard;
      try {
        run(c);
      } catch (...) {
        std::lock_guard<std::mutex> g(mu);
        if (!err) err = std::current_exception();
      }
    });
  }
  for (auto& t : pool) t.join();
  if (err) std::rethrow_exception(err);
}

void sy2sb_apply(const Sy2sbReflectors& refl, at::Tensor& Z) {
  std::vector<WYBlock> blocks;
  for (size_t p = 0; p < refl.off.size(); ++p) blocks.push_back({refl.off[p], refl.V[p], refl.T[p]});
  apply_wy_blocks(blocks, Z);
}

}  // namespace eigh2
}  // namespace curvfast
