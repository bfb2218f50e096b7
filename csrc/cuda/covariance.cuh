// Device side of the CUDA covariance update (see covariance.cu for the design notes).
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace curvfast {
namespace covariance_cuda {

constexpr int kTile = 128;      // output tile side (rows = cols: triangle maps cleanly)
constexpr int kK = 16;          // rows of x staged per step
constexpr int kThreads = 256;   // 16 x 16 threads, 8 x 8 outputs each
constexpr int kMaxGroups = 16;  // groups per launch (descriptor passed by value)
constexpr int64_t kMinChunk = 256;  // fewest rows of x per split

struct Group {
  const void* x;  // (T, d) contiguous, scalar_t
  float* acc;     // (d, d) fp32 contiguous
  const float* w; // (T,) fp32 or null
  int64_t T, d, chunk;
  int32_t ntri;   // lower-triangle tiles per split: nb (nb + 1) / 2
  int32_t first;  // first block index of this group
};

struct Groups {
  Group g[kMaxGroups];
  int32_t n;
  int32_t atomic;
};

inline int64_t tiles_per_side(int64_t d) { return (d + kTile - 1) / kTile; }

__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ float widen(c10::BFloat16 v) { return static_cast<float>(v); }
__device__ __forceinline__ float widen(c10::Half v) { return static_cast<float>(v); }

// Stage rows [t, t + kK) x columns [col0, col0 + kTile) of x into s (fp32), times w if given.
template <typename scalar_t>
__device__ __forceinline__ void stage(float (*s)[kTile + 4], const scalar_t* __restrict__ x,
                                      const float* __restrict__ w, int64_t t, int64_t t_end, int64_t d,
                                      int64_t col0, int tid) {
  const int lr = tid / 16;         // 0..15: row within the step
  const int lc = (tid % 16) * 8;   // 0..120: first of 8 columns
  const int64_t row = t + lr;
  const bool row_ok = row < t_end;
  const float scale = (row_ok && w != nullptr) ? w[row] : 1.0f;
  const scalar_t* src = x + row * d + col0 + lc;
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const bool ok = row_ok && (col0 + lc + e) < d;
    s[lr][lc + e] = ok ? widen(src[e]) * scale : 0.0f;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) covariance_tiles_kernel(const __grid_constant__ Groups gs) {
  __shared__ __align__(16) float As[kK][kTile + 4];
  __shared__ __align__(16) float Bs[kK][kTile + 4];

  const int bid = static_cast<int>(blockIdx.x);
  int gi = 0;
  for (int i = 1; i < gs.n; ++i) {
    if (bid >= gs.g[i].first) gi = i;
  }
  const Group& G = gs.g[gi];
  const int local = bid - G.first;
  const int split = local / G.ntri;
  const int tri = local % G.ntri;
  // Row block bi is the largest with bi (bi + 1) / 2 <= tri; float guess, integer fix-up.
  int bi = static_cast<int>((sqrtf(8.0f * static_cast<float>(tri) + 1.0f) - 1.0f) * 0.5f);
  while ((bi + 1) * (bi + 2) / 2 <= tri) ++bi;
  while (bi * (bi + 1) / 2 > tri) --bi;
  const int bj = tri - bi * (bi + 1) / 2;

  const int64_t d = G.d;
  const int64_t row0 = static_cast<int64_t>(bi) * kTile;
  const int64_t col0 = static_cast<int64_t>(bj) * kTile;
  const int64_t t_begin = static_cast<int64_t>(split) * G.chunk;
  const int64_t t_end = min(t_begin + G.chunk, G.T);
  const scalar_t* x = static_cast<const scalar_t*>(G.x);

  const int tid = static_cast<int>(threadIdx.x);
  const int ty = tid / 16, tx = tid % 16;
  float c[8][8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
#pragma unroll
    for (int j = 0; j < 8; ++j) c[i][j] = 0.0f;
  }

  for (int64_t t = t_begin; t < t_end; t += kK) {
    stage<scalar_t>(As, x, G.w, t, t_end, d, row0, tid);
    stage<scalar_t>(Bs, x, nullptr, t, t_end, d, col0, tid);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kK; ++k) {
      const float4 a0 = *reinterpret_cast<const float4*>(&As[k][ty * 4]);
      const float4 a1 = *reinterpret_cast<const float4*>(&As[k][64 + ty * 4]);
      const float4 b0 = *reinterpret_cast<const float4*>(&Bs[k][tx * 4]);
      const float4 b1 = *reinterpret_cast<const float4*>(&Bs[k][64 + tx * 4]);
      const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
      const float b[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
      for (int i = 0; i < 8; ++i) {
#pragma unroll
        for (int j = 0; j < 8; ++j) c[i][j] = fmaf(a[i], b[j], c[i][j]);
      }
    }
    __syncthreads();
  }

  float* acc = G.acc;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int64_t r = row0 + (i < 4 ? ty * 4 + i : 64 + ty * 4 + (i - 4));
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int64_t col = col0 + (j < 4 ? tx * 4 + j : 64 + tx * 4 + (j - 4));
      if (r < d && col < d && r >= col) {
        const float v = c[i][j];
        if (gs.atomic) {
          atomicAdd(acc + r * d + col, v);
          if (r > col) atomicAdd(acc + col * d + r, v);
        } else {
          acc[r * d + col] += v;
          if (r > col) acc[col * d + r] += v;
        }
      }
    }
  }
}

}  // namespace covariance_cuda
}  // namespace curvfast
