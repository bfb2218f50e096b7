// acc += xᵀ diag(w) x on the CPU: a packed, multithreaded SYRK that computes one triangle
// at micro-tile granularity and mirrors it at the end of the call.
//
// Why not lower-triangle tiles of at::mm: every BLAS call re-packs its operands, and the
// small tiles near the diagonal run far below peak, which caps that approach near 1.6x over a
// full GEMM (MKL's own ssyrk is not exported by torch, and its internal one measured no faster
// than the GEMM on this AMD CPU). Here each chunk of kc rows of x is widened (bf16/fp16 ->
// fp32, times the row weight) and packed once per piece of the triangle, then reused by every
// micro-tile of that piece; the only redundant flops are in the micro-tiles that straddle the
// diagonal (about mr / d of the work).
//
// Threads: the triangle is cut into equal-area row bands ("pieces") that each thread packs,
// computes and mirrors on its own, with no barrier inside a call. On a shared 2-core machine a
// per-chunk barrier made the whole call wait on whichever thread the OS had descheduled.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "../checks.h"
#include "covariance_kernels.h"

namespace curvfast {
namespace {

using cpu::pack_panel;
using cpu::SyrkKernel;

// Rows of x per packed chunk: bounds the pack buffers (d x kc floats per thread) and keeps
// one A block (kBlockCols x kc) in L2 while B micro-panels (kc x nr) cycle through L1.
constexpr int64_t kChunkRows = 384;
// Rows of x scattered into all panels before moving on (they stay cache-resident).
constexpr int64_t kPackRows = 16;
// Columns of one A block reused from L2 across all B micro-panels of a piece.
constexpr int64_t kBlockCols = 256;
// Below this many multiply-adds a fork costs more than it saves.
constexpr int64_t kSerialWork = int64_t{1} << 22;
// Pieces per thread: more pieces let a thread that got more CPU take more of them (the
// machine is shared), at the price of packing the A columns once per piece. Measured on the
// 2-core box at d = 1024: 1 per thread 1.9x over addmm when quiet, 2 per thread 1.8x; under
// load the two were within noise. Tunable with CURVFAST_CPU_PIECES_PER_THREAD.
constexpr int64_t kPiecesPerThread = 1;

int intra_op_threads() { return std::max(1, at::get_num_threads()); }

// One thread's share: rows [j0, j1) of acc (a multiple of nr apart) and every column >= j0.
// Pieces touch disjoint tiles and disjoint mirror targets, so they run without any barrier:
// a descheduled thread never stalls the other (only the final join waits).
struct Piece {
  int64_t j0, j1;
};

// Equal-area row bands of the triangle: band k ends where the area above it is k / n of the
// whole, i.e. (d - j)^2 = (1 - k / n) d^2.
std::vector<Piece> plan_pieces(int64_t d, int nr, int64_t npieces) {
  const int64_t nb = (d + nr - 1) / nr;
  npieces = std::max<int64_t>(1, std::min(npieces, nb));
  std::vector<Piece> pieces;
  int64_t prev = 0;
  for (int64_t k = 1; k <= npieces; ++k) {
    int64_t end = k == npieces ? nb
                               : static_cast<int64_t>(std::llround(
                                     nb * (1.0 - std::sqrt(1.0 - double(k) / double(npieces)))));
    end = std::min(nb, std::max(end, prev + 1));
    if (end <= prev) continue;
    pieces.push_back({prev * nr, std::min(d, end * nr)});
    prev = end;
    if (prev == nb) break;
  }
  return pieces;
}

struct Problem {
  float* acc;
  int64_t d;
  const char* x;  // (T, d) contiguous, dtype xtype
  c10::ScalarType xtype;
  int64_t T;
  const float* w;  // (T,) or null
};

// Compute one piece over all of T, then mirror it.
void run_piece(const Problem& pb, const SyrkKernel& kern, const Piece& pc, float* apack,
               float* bpack) {
  const int mr = kern.mr, nr = kern.nr;
  const int64_t d = pb.d;
  const int64_t esize = c10::elementSize(pb.xtype);
  const int64_t kc_max = std::min<int64_t>(kChunkRows, pb.T);
  const int64_t a_stride = kc_max * mr, b_stride = kc_max * nr;
  const int64_t ia_first = pc.j0 / mr, na = (d + mr - 1) / mr;
  const int64_t jb_first = pc.j0 / nr, jb_end = (pc.j1 + nr - 1) / nr;
  // Lanes past d are never packed; zero them once so edge tiles read zeros.
  if (d % mr != 0) std::fill(apack + (na - 1 - ia_first) * a_stride, apack + (na - ia_first) * a_stride, 0.0f);
  if (pc.j1 - (jb_end - 1) * nr < nr)
    std::fill(bpack + (jb_end - 1 - jb_first) * b_stride, bpack + (jb_end - jb_first) * b_stride, 0.0f);
  const int64_t block_panels = std::max<int64_t>(1, kBlockCols / mr);
  alignas(64) float tile[16 * 32];  // >= nr * mr of every kernel

  for (int64_t t0 = 0; t0 < pb.T; t0 += kc_max) {
    const int64_t kc = std::min(kc_max, pb.T - t0);
    const char* xc = pb.x + t0 * d * esize;
    const float* wc = pb.w != nullptr ? pb.w + t0 : nullptr;
    // Pack a few rows at a time into every panel: the rows stay in L1/L2 while they are
    // scattered, and each panel receives a contiguous run of rows * width floats.
    for (int64_t p0 = 0; p0 < kc; p0 += kPackRows) {
      const int64_t rows = std::min(kPackRows, kc - p0);
      const char* xr = xc + p0 * d * esize;
      for (int64_t jb = jb_first; jb < jb_end; ++jb) {
        const int64_t c0 = jb * nr;
        pack_panel(xr + c0 * esize, pb.xtype, d, rows, std::min<int64_t>(nr, pc.j1 - c0), nr,
                   nullptr, bpack + (jb - jb_first) * b_stride + p0 * nr);
      }
      for (int64_t ia = ia_first; ia < na; ++ia) {
        const int64_t c0 = ia * mr;
        pack_panel(xr + c0 * esize, pb.xtype, d, rows, std::min<int64_t>(mr, d - c0), mr,
                   wc != nullptr ? wc + p0 : nullptr, apack + (ia - ia_first) * a_stride + p0 * mr);
      }
    }
    for (int64_t ib = ia_first; ib < na; ib += block_panels) {
      const int64_t ib_end = std::min(na, ib + block_panels);
      const int64_t last_col = std::min(d, ib_end * mr) - 1;
      for (int64_t jb = jb_first; jb < jb_end && jb * nr <= last_col; ++jb) {
        const int64_t j0 = jb * nr;
        const int64_t rows = std::min<int64_t>(nr, pc.j1 - j0);
        const float* bp = bpack + (jb - jb_first) * b_stride;
        for (int64_t ia = std::max(ib, j0 / mr); ia < ib_end; ++ia) {
          const int64_t i0 = ia * mr;
          const int64_t cols = std::min<int64_t>(mr, d - i0);
          const float* ap = apack + (ia - ia_first) * a_stride;
          float* c = pb.acc + j0 * d + i0;
          // The kernel sums this chunk into a zeroed, contiguous tile: acc is then touched
          // once per chunk (not once per kernel sub-block), its rows never alias in L1 for
          // power-of-two d, and the chunk sum is added to acc in one rounding (a three-level
          // summation: registers, chunk tile, acc).
          std::fill(tile, tile + nr * mr, 0.0f);
          kern.micro(kc, ap, bp, tile, mr);
          // Where the tile reaches left of this piece, its below-diagonal elements belong to
          // another piece's mirror: add only column >= row there (and inside acc's edges).
          const bool left = i0 < pc.j0;
          for (int64_t r = 0; r < rows; ++r) {
            float* cr = c + r * d;
            const float* tr = tile + r * mr;
            for (int64_t v = left ? std::max<int64_t>(0, j0 + r - i0) : 0; v < cols; ++v)
              cr[v] += tr[v];
          }
        }
      }
    }
  }

  // Mirror rows [j0, j1) (columns >= row) into columns [j0, j1) below the diagonal. Tiles
  // that straddle the diagonal also added partial sums below it; those are overwritten here.
  // A square block goes through a small buffer so that neither side is walked down a column
  // of acc (a power-of-two d would map a whole column onto a few cache sets).
  constexpr int64_t B = 32;
  alignas(64) float blk[B][B];
  for (int64_t r0 = pc.j0; r0 < pc.j1; r0 += B) {
    const int64_t r1 = std::min(pc.j1, r0 + B);
    for (int64_t c0 = r0; c0 < d; c0 += B) {
      const int64_t c1 = std::min(d, c0 + B);
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c) blk[c - c0][r - r0] = pb.acc[r * d + c];
      for (int64_t c = c0; c < c1; ++c) {
        float* dst = pb.acc + c * d;
        const int64_t rend = std::min(r1, c);  // strictly below the diagonal
        for (int64_t r = r0; r < rend; ++r) dst[r] = blk[c - c0][r - r0];
      }
    }
  }
}

// One accumulator: acc (d, d) fp32 contiguous, x (T, d) contiguous, w (T,) fp32 or null.
void syrk_update(const Problem& pb) {
  if (pb.T == 0 || pb.d == 0) return;
  const SyrkKernel& kern = cpu::select_syrk_kernel();
  const int64_t work = pb.d * pb.d * pb.T / 2;
  const int nthreads = work < kSerialWork ? 1 : intra_op_threads();
  int64_t per_thread = kPiecesPerThread;
  if (const char* env = std::getenv("CURVFAST_CPU_PIECES_PER_THREAD")) per_thread = std::max(1, std::atoi(env));
  const std::vector<Piece> pieces =
      plan_pieces(pb.d, kern.nr, nthreads == 1 ? 1 : nthreads * per_thread);
  const int64_t kc_max = std::min<int64_t>(kChunkRows, pb.T);
  const int64_t na = (pb.d + kern.mr - 1) / kern.mr;
  int64_t max_rows = 0;
  for (const Piece& pc : pieces) max_rows = std::max(max_rows, pc.j1 - pc.j0);
  const int64_t a_floats = na * kern.mr * kc_max;
  const int64_t b_floats = (max_rows + kern.nr - 1) / kern.nr * kern.nr * kc_max;
  const int64_t nbuf = std::min<int64_t>(nthreads, pieces.size());
  // One pair of pack buffers per thread (thread ids can exceed nbuf only if the runtime
  // hands out fewer threads, in which case every thread still has its own buffer).
  // Scratch is kept per calling thread: factor collection calls this thousands of times with
  // the same shapes, and a fresh multi-MB allocation would page-fault on every call.
  static thread_local at::Tensor scratch;
  const int64_t need = nbuf * (a_floats + b_floats);
  if (!scratch.defined() || scratch.numel() < need) {
    scratch = at::Tensor();  // free the old one first
    scratch = at::empty({need}, at::kFloat);
  }
  float* const base = scratch.data_ptr<float>();
  std::atomic<int64_t> next{0};
  auto body = [&](int tid, int) {
    float* apack = base + tid * (a_floats + b_floats);
    float* bpack = apack + a_floats;
    for (int64_t k = next.fetch_add(1); k < static_cast<int64_t>(pieces.size()); k = next.fetch_add(1))
      run_piece(pb, kern, pieces[k], apack, bpack);
  };
  cpu::run_parallel(static_cast<int>(nbuf), body);
}

void check_one(const at::Tensor& acc, const at::Tensor& x, const std::optional<at::Tensor>& weight) {
  CURVFAST_CHECK_FP32_SQUARE(acc);
  CURVFAST_CHECK_ROWS(x, acc);
  CURVFAST_CHECK_WEIGHT(weight, x);
  CURVFAST_CHECK_CPU(acc);
}

void update_one(at::Tensor& acc, const at::Tensor& x, const std::optional<at::Tensor>& weight) {
  const at::Tensor xc = x.contiguous();
  at::Tensor wf;
  if (weight.has_value()) wf = weight->to(at::kFloat).contiguous();
  syrk_update({acc.data_ptr<float>(), acc.size(0), static_cast<const char*>(xc.const_data_ptr()),
               xc.scalar_type(), xc.size(0),
               weight.has_value() ? wf.const_data_ptr<float>() : nullptr});
}

}  // namespace

void covariance_update_cpu(at::Tensor& acc, const at::Tensor& x,
                           const std::optional<at::Tensor>& weight) {
  check_one(acc, x, weight);
  update_one(acc, x, weight);
}

void covariance_update_grouped_cpu(at::TensorList accs, at::TensorList xs,
                                   const c10::List<std::optional<at::Tensor>>& weights) {
  TORCH_CHECK(accs.size() == xs.size(), "curvfast: covariance_update_grouped_ got ", accs.size(),
              " accumulators but ", xs.size(), " inputs");
  TORCH_CHECK(weights.empty() || weights.size() == xs.size(),
              "curvfast: covariance_update_grouped_ got ", weights.size(), " weights for ",
              xs.size(), " inputs (pass one per input, None where unweighted, or an empty list)");
  // Validate everything before touching any accumulator, so a bad entry leaves all unchanged.
  for (size_t g = 0; g < accs.size(); ++g)
    check_one(accs[g], xs[g], weights.empty() ? std::nullopt : weights.get(g));
  for (size_t g = 0; g < accs.size(); ++g) {
    at::Tensor acc = accs[g];
    update_one(acc, xs[g], weights.empty() ? std::nullopt : weights.get(g));
  }
}

const char* cpu_isa() { return cpu::select_syrk_kernel().name; }

}  // namespace curvfast
