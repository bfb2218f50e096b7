// Host entry of the CUDA bulge-chasing kernel (csrc/cuda/eigh_bulge.cu); the window algorithm
// itself is csrc/cpu/eigh_chase.h, shared with the CPU emulation.
#pragma once
#include <ATen/core/Tensor.h>

#include <cuda_runtime.h>

#include "../cpu/eigh_twostage.h"

namespace curvfast {
namespace eigh2 {

// band (n, 2b+1) on a CUDA device, chased in place to tridiagonal (columns 0 and 1 hold d, e);
// reflectors land in q.V / q.tau (from sb2st_blocks_alloc on the same device). Runs on `stream`.
void chase_band_cuda(at::Tensor& band, Sb2stBlocks& q, cudaStream_t stream);

}  // namespace eigh2
}  // namespace curvfast
