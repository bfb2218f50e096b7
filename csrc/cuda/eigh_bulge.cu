// Band -> tridiagonal bulge chasing on the GPU: one thread block per sweep, sweeps pipelined.
//
// Scheme (details and the proof of the rule in csrc/cpu/eigh_chase.h):
// - a persistent grid of G blocks; each block takes the next sweep j from an atomic ticket, so
//   sweeps start in increasing order and the block owning the oldest unfinished sweep never
//   waits (no deadlock whatever the residency, no cooperative launch);
// - before step s of sweep j, thread 0 spins (volatile load + __nanosleep) until progress[j-1]
//   >= min(s+3, steps(j-1)), then __threadfence (acquire side);
// - the block runs the window's kPhases phases, __syncthreads between phases (the same
//   functions the CPU emulation runs with the same thread partition);
// - after the step every thread fences its band writes, the block syncs and thread 0 publishes
//   progress[j] = s+1 (release side).
// About steps(0)/3 sweeps are in flight at once (n/(3b): ~21 for n = 4096, b = 64), so G is
// capped there and at 2 blocks per SM. Band loads go through L2 (__ldcg, in eigh_chase.h):
// L1 is not coherent across SMs and other blocks write the same lines.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>

#include <cuda_runtime.h>

#include <algorithm>

#include "../cpu/eigh_chase.h"
#include "eigh_bulge.cuh"

namespace curvfast {
namespace eigh2 {
namespace {

constexpr int kChaseThreads = 128;

template <typename T>
__global__ void __launch_bounds__(kChaseThreads)
    chase_kernel(chase::Window<T> W, int* __restrict__ progress, int* __restrict__ ticket) {
  extern __shared__ double smem[];  // red (nt), scal (4), then v, p, w (b each, T)
  const int nt = static_cast<int>(blockDim.x), tid = static_cast<int>(threadIdx.x);
  const int64_t n = W.n, b = W.b, sweeps = n - 1;
  W.red = smem;
  W.scal = smem + nt;
  T* ts = reinterpret_cast<T*>(smem + nt + 4);
  W.v = ts;
  W.p = ts + b;
  W.w = ts + 2 * b;
  __shared__ int sj;
  for (;;) {
    if (tid == 0) sj = atomicAdd(ticket, 1);
    __syncthreads();
    const int64_t j = sj;
    __syncthreads();  // sj is rewritten next round
    if (j >= sweeps) break;
    const int64_t steps = chase::steps_of(n, b, j);
    for (int64_t s = 0; s < steps; ++s) {
      if (tid == 0 && j > 0) {
        const int need = static_cast<int>(chase::wait_for(n, b, j, s));
        const volatile int* prev = progress + (j - 1);
        while (*prev < need) __nanosleep(64);
        __threadfence();
      }
      __syncthreads();
      const chase::Geometry g = chase::geometry(n, b, j, s);
      for (int ph = 0; ph < chase::kPhases; ++ph) {
        const bool go = chase::phase(W, g, ph, tid, nt);
        __syncthreads();
        if (!go) break;  // uniform: every thread read the same tau from shared memory
      }
      __threadfence();
      __syncthreads();
      if (tid == 0) atomicExch(progress + j, static_cast<int>(s + 1));
    }
  }
}

int sm_count(int device) {
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
  return v;
}

}  // namespace

void chase_band_cuda(at::Tensor& band, Sb2stBlocks& q, cudaStream_t stream) {
  const int64_t n = q.n, b = q.b, sweeps = n - 1;
  TORCH_CHECK(band.is_cuda() && band.is_contiguous() && band.size(0) == n && band.size(1) == 2 * b + 1,
              "curvfast eigh (cuda): band buffer must be a contiguous CUDA tensor of shape (", n, ", ", 2 * b + 1,
              "), got ", band.sizes());
  TORCH_CHECK(sweeps < (int64_t(1) << 30), "curvfast eigh (cuda): n = ", n, " is too large for the chase counters");
  if (sweeps <= 0) return;
  at::Tensor counters = at::zeros({sweeps + 1}, band.options().dtype(at::kInt));  // progress, ticket
  int* progress = counters.data_ptr<int>();
  int* ticket = progress + sweeps;
  const int64_t in_flight = chase::steps_of(n, b, 0) / 3 + 2;
  const int grid = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>({sweeps, in_flight, 2 * (int64_t)sm_count(band.get_device())})));
  AT_DISPATCH_FLOATING_TYPES(band.scalar_type(), "curvfast_eigh_chase", [&] {
    const size_t smem = (kChaseThreads + 4) * sizeof(double) + 3 * b * sizeof(scalar_t);
    TORCH_CHECK(smem <= 48 * 1024, "curvfast eigh (cuda): bandwidth ", b, " needs ", smem,
                " bytes of shared memory per block (max 48 KiB); use band <= 1024");
    chase::Window<scalar_t> W{};
    W.band = band.data_ptr<scalar_t>();
    W.ld = 2 * b + 1, W.n = n, W.b = b, W.nb = q.nb;
    W.gfirst = q.gfirst_t.data_ptr<int64_t>();
    W.V = q.V.data_ptr<scalar_t>();
    W.tau = q.tau.data_ptr<scalar_t>();
    chase_kernel<scalar_t><<<grid, kChaseThreads, smem, stream>>>(W, progress, ticket);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace eigh2
}  // namespace curvfast
