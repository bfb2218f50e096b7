// acc += x^T diag(w) x on CUDA tensors: lower-triangle tiles only, mirrored into the upper
// triangle, several accumulators (any sizes) in one launch, optional split over T.
//
// Kernel: 128 x 128 output tiles, 256 threads, each thread an 8 x 8 register block; x is
// staged through shared memory 16 rows at a time, widened to fp32 on the way in (bf16/fp16/
// fp32 inputs), the weight applied in fp32 to the row operand only, fp32 FMA accumulation:
// the arithmetic of an fp32 GEMM on the upcast data. Every output element (r, c), r >= c,
// is owned by exactly one thread, which adds it to acc[r, c] and, for r > c, to acc[c, r],
// so the update is exactly symmetric. With splits > 1 (few tiles, long T) partial tiles are
// added with atomics; deterministic mode (CURVFAST_DETERMINISTIC=1 or
// torch.use_deterministic_algorithms) never splits.
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../checks.h"
#include "covariance.cuh"

namespace curvfast {
namespace {

using namespace covariance_cuda;

int sm_count(int device) {
  static int cached[64] = {0};
  if (device < 64 && cached[device] > 0) return cached[device];
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  if (device < 64) cached[device] = n;
  return n;
}

bool deterministic_requested() {
  const char* env = std::getenv("CURVFAST_DETERMINISTIC");
  return (env != nullptr && std::strcmp(env, "1") == 0) || at::globalContext().deterministicAlgorithms();
}

struct Job {
  at::Tensor acc;
  at::Tensor x;  // contiguous
  at::Tensor w;  // fp32 contiguous or undefined
};

template <typename scalar_t>
void launch_batch(const std::vector<Job>& jobs, size_t begin, size_t end, bool deterministic,
                  cudaStream_t stream, int device) {
  Groups gs;
  std::memset(&gs, 0, sizeof(gs));
  int64_t total_tiles = 0;
  for (size_t i = begin; i < end; ++i) total_tiles += tiles_per_side(jobs[i].acc.size(0)) *
                                                      (tiles_per_side(jobs[i].acc.size(0)) + 1) / 2;
  // Split T only when the tiles alone cannot fill the GPU twice over; each slice keeps at
  // least kMinChunk rows so the atomics stay a small share of the traffic.
  const int64_t want = 2 * static_cast<int64_t>(sm_count(device));
  int64_t splits_wanted = 1;
  if (!deterministic && total_tiles < want) splits_wanted = (want + total_tiles - 1) / total_tiles;

  int64_t first = 0;
  bool atomic = false;
  for (size_t i = begin; i < end; ++i) {
    const Job& j = jobs[i];
    Group& g = gs.g[gs.n++];
    const int64_t T = j.x.size(0), d = j.acc.size(0);
    const int64_t nb = tiles_per_side(d);
    int64_t splits = std::max<int64_t>(1, std::min<int64_t>(splits_wanted, T / kMinChunk));
    int64_t chunk = (T + splits - 1) / splits;
    chunk = (chunk + kK - 1) / kK * kK;
    splits = (T + chunk - 1) / chunk;
    atomic = atomic || splits > 1;
    g.x = j.x.data_ptr();
    g.acc = j.acc.data_ptr<float>();
    g.w = j.w.defined() ? j.w.data_ptr<float>() : nullptr;
    g.T = T;
    g.d = d;
    g.chunk = chunk;
    g.ntri = static_cast<int32_t>(nb * (nb + 1) / 2);
    g.first = static_cast<int32_t>(first);
    first += nb * (nb + 1) / 2 * splits;
  }
  gs.atomic = atomic ? 1 : 0;
  TORCH_CHECK(first < (int64_t(1) << 31), "curvfast covariance_update (cuda): too many tiles (", first, ")");
  if (first == 0) return;
  covariance_tiles_kernel<scalar_t><<<static_cast<unsigned>(first), kThreads, 0, stream>>>(gs);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_all(const std::vector<Job>& jobs, bool deterministic, cudaStream_t stream, int device) {
  for (size_t b = 0; b < jobs.size(); b += kMaxGroups) {
    launch_batch<scalar_t>(jobs, b, std::min(jobs.size(), b + kMaxGroups), deterministic, stream, device);
  }
}

Job make_job(at::Tensor& acc, const at::Tensor& x, const std::optional<at::Tensor>& weight) {
  CURVFAST_CHECK_FP32_SQUARE(acc);
  CURVFAST_CHECK_ROWS(x, acc);
  CURVFAST_CHECK_WEIGHT(weight, x);
  TORCH_CHECK(acc.is_cuda(), "curvfast covariance_update (cuda): tensors must be on a CUDA device, got ",
              acc.device());
  Job j{acc, x.contiguous(), at::Tensor()};
  if (weight.has_value()) j.w = weight->to(at::kFloat).contiguous();
  return j;
}

void run_jobs(std::vector<Job>& jobs) {
  if (jobs.empty()) return;
  const c10::cuda::CUDAGuard guard(jobs[0].acc.device());
  const int device = jobs[0].acc.get_device();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const bool det = deterministic_requested();
  // One launch per input dtype (the kernel is templated on it).
  for (auto dtype : {at::kBFloat16, at::kHalf, at::kFloat}) {
    std::vector<Job> same;
    for (auto& j : jobs) {
      TORCH_CHECK(j.acc.device() == jobs[0].acc.device(),
                  "curvfast covariance_update_grouped_ (cuda): all tensors must be on one device, got ",
                  j.acc.device(), " and ", jobs[0].acc.device());
      if (j.x.scalar_type() == dtype && j.x.size(0) > 0 && j.acc.size(0) > 0) same.push_back(j);
    }
    if (same.empty()) continue;
    if (dtype == at::kBFloat16) launch_all<c10::BFloat16>(same, det, stream, device);
    else if (dtype == at::kHalf) launch_all<c10::Half>(same, det, stream, device);
    else launch_all<float>(same, det, stream, device);
  }
}

}  // namespace

void covariance_update_cuda(at::Tensor& acc, const at::Tensor& x, const std::optional<at::Tensor>& weight) {
  std::vector<Job> jobs{make_job(acc, x, weight)};
  run_jobs(jobs);
}

void covariance_update_grouped_cuda(at::TensorList accs, at::TensorList xs,
                                    const c10::List<std::optional<at::Tensor>>& weights) {
  TORCH_CHECK(accs.size() == xs.size() && xs.size() == weights.size(),
              "curvfast covariance_update_grouped_ (cuda): got ", accs.size(), " accumulators, ", xs.size(),
              " inputs and ", weights.size(), " weights; pass one of each per group");
  std::vector<Job> jobs;
  jobs.reserve(accs.size());
  for (size_t i = 0; i < accs.size(); ++i) {
    at::Tensor acc = accs[i];  // shares storage: the update lands in the caller's tensor
    const std::optional<at::Tensor> w = weights.get(i);
    jobs.push_back(make_job(acc, xs[i], w));
  }
  run_jobs(jobs);
}

}  // namespace curvfast

TORCH_LIBRARY_IMPL(curvfast, CUDA, m) {
  m.impl("covariance_update_", &curvfast::covariance_update_cuda);
  m.impl("covariance_update_grouped_", &curvfast::covariance_update_grouped_cuda);
}
