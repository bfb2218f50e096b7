// CUDA two-stage symmetric eigensolver: the driver, the batched driver and the CUDA
// registrations of torch.ops.curvfast.eigh_twostage / eigh_twostage_batched (schemas in
// csrc/bindings.cpp; CPU implementations in csrc/cpu/eigh_driver.cpp).
//
// The stage sequence is eigh_twostage_blocked (csrc/cpu/eigh_blocks.cpp, shared with the CPU
// emulation op eigh_twostage_emulate, so it is tested without a GPU) with the chase kernel
// plugged in. Same structure as the CPU solver (csrc/cpu/eigh_twostage.h), stage by stage:
//   1. dense -> band: sy2sb (csrc/cpu/eigh_band.cpp) unchanged on CUDA tensors: at::geqrf
//      (cuSOLVER) per panel, trailing two-sided updates as GEMMs (cuBLAS); the r x r larft
//      recurrence runs on the host (one small copy per panel);
//   2. band -> tridiagonal: the bulge-chasing kernel (eigh_bulge.cu) on a compact band buffer,
//      reflectors recorded in blocked layout;
//   3. tridiagonal -> eigenpairs: divide and conquer (stedc_factored, csrc/cpu/eigh_tridiag.cpp):
//      the host solves the subproblems of ~1024 rows and, for every merge above them, the
//      secular equations and the merge's coefficients (double scalars); the merges' products
//      (all but ~1024/n of the stage's flops) run as GEMMs on the GPU. Only the subproblems'
//      eigenvectors and the coefficients (the wanted top-k columns at the top) cross over;
//   4. back-transformations Z <- Q1 Q2 Z: blocked WY GEMMs on the GPU (sb2st_blocks_apply,
//      sy2sb_apply).
// Everything runs on the caller's current stream; the batched driver gives each decomposition
// in flight its own host thread and pool stream (the host stages of one overlap the GPU stages
// of the others), and the caching allocator gives each its own workspace.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "../cpu/eigh_twostage.h"
#include "eigh_bulge.cuh"

namespace curvfast {
namespace eigh2 {
namespace {

void check_cuda_square(const at::Tensor& A, const char* what) {
  TORCH_CHECK(A.dim() == 2 && A.size(0) == A.size(1), what, ": expected a square (n, n) matrix, got shape ",
              A.sizes());
  TORCH_CHECK(A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble, what,
              ": expected float32 or float64, got ", A.scalar_type());
  TORCH_CHECK(A.is_cuda(), what, " (cuda): expected a CUDA tensor, got ", A.device());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> eigh_twostage_cuda(const at::Tensor& A_in, int64_t band, int64_t top) {
  check_cuda_square(A_in, "eigh_twostage");
  const c10::cuda::CUDAGuard guard(A_in.device());
  const int64_t n = A_in.size(0);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(A_in.get_device()).stream();
  HostStageClock clk;
  return eigh_twostage_blocked(
      A_in, band > 0 ? band : blocked_auto_band(n), top,
      [stream](at::Tensor& buf, Sb2stBlocks& q) { chase_band_cuda(buf, q, stream); },
      [&clk, n, stream](const char* what) {
        if (clk.on) C10_CUDA_CHECK(cudaStreamSynchronize(stream));  // a stage's time includes its kernels
        clk.lap(what, n);
      });
}

namespace {

// Several decompositions in flight: `workers` host threads (default min(m, 4); the caller's
// thread is one of them), each with its own pool stream, pull jobs largest first (n^3 cost,
// longest-processing-time-first). The pool streams wait for the caller's stream before
// starting; results are recorded on the caller's stream so the caching allocator does not reuse
// them early, and every worker stream is synchronized before returning.
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> batched_cuda(at::TensorList As, int64_t band,
                                                                           int64_t top, int64_t workers) {
  const int64_t m = (int64_t)As.size();
  std::vector<at::Tensor> W(m), Z(m);
  if (m == 0) return {W, Z};
  for (const auto& A : As) {
    check_cuda_square(A, "eigh_twostage_batched");
    TORCH_CHECK(A.device() == As[0].device(), "eigh_twostage_batched (cuda): all matrices must be on one device, got ",
                A.device(), " and ", As[0].device());
  }
  std::vector<int64_t> order(m);
  for (int64_t i = 0; i < m; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return As[a].size(0) > As[b].size(0); });
  workers = workers > 0 ? workers : std::min<int64_t>(m, 4);
  workers = std::max<int64_t>(1, std::min<int64_t>(workers, m));
  const at::Device dev = As[0].device();
  const c10::cuda::CUDAGuard guard(dev);
  const c10::cuda::CUDAStream caller = c10::cuda::getCurrentCUDAStream(dev.index());
  if (workers == 1) {
    for (int64_t i : order) std::tie(W[i], Z[i]) = eigh_twostage_cuda(As[i], band, top);
    return {W, Z};
  }
  // The pool streams start after the work queued so far on the caller's stream (the inputs).
  cudaEvent_t ready;
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming));
  struct DestroyOnExit {
    cudaEvent_t e;
    ~DestroyOnExit() { cudaEventDestroy(e); }
  } destroy_ready{ready};
  C10_CUDA_CHECK(cudaEventRecord(ready, caller.stream()));
  std::vector<at::Tensor> inputs(As.begin(), As.end());
  std::atomic<int64_t> next{0};
  // Each worker's host stages (D&C, the small larft recurrences) get an equal share of the cores,
  // as in the CPU batched driver: every worker with all of them would oversubscribe the host.
  const int per = std::max(1, at::get_num_threads() / (int)workers);
  // A failed job ends its worker; the others finish the queue, then the first error is rethrown.
  run_concurrently(workers, [&](int64_t) {
    SingleThreadedBlas threads(per);
    const c10::cuda::CUDAGuard g(dev);
    const c10::cuda::CUDAStream st = c10::cuda::getStreamFromPool(false, dev.index());
    C10_CUDA_CHECK(cudaStreamWaitEvent(st.stream(), ready, 0));
    const c10::cuda::CUDAStreamGuard sg(st);
    for (int64_t t; (t = next.fetch_add(1)) < m;) {
      const int64_t i = order[t];
      auto [w, z] = eigh_twostage_cuda(inputs[i], band, top);
      w.record_stream(caller);
      z.record_stream(caller);
      W[i] = w, Z[i] = z;
    }
    st.synchronize();
  });
  return {W, Z};
}

}  // namespace
}  // namespace eigh2
}  // namespace curvfast

TORCH_LIBRARY_IMPL(curvfast, CUDA, m) {
  m.impl("eigh_twostage", &curvfast::eigh2::eigh_twostage_cuda);
  m.impl("eigh_twostage_batched", &curvfast::eigh2::batched_cuda);
}
