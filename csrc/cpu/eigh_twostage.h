// Two-stage symmetric eigensolver: the stages, each callable and testable on its own.
//
//   A (n x n, symmetric)  --sy2sb-->  band B (half-bandwidth b), A = Q1 B Q1^T
//   B                     --sb2st-->  tridiagonal (d, e),        B = Q2 T Q2^T
//   T                     --stedc-->  eigenpairs (w ascending, Z), T = Z diag(w) Z^T
//   eigenvectors of A = Q1 (Q2 Z): both back-transformations are blocked (compact WY) GEMMs.
//
// Device split, so that a CUDA path can share the structure: stage 1 and both
// back-transformations only issue GEMMs on at::Tensor blocks (they run unchanged on CUDA
// tensors: at::mm dispatches to cuBLAS); the panel QR is at::geqrf (cuSOLVER on CUDA).
// Stage 2 (bulge chasing) works on a compact band buffer and records its reflectors in a
// Sb2stReflectors object. The CUDA path (csrc/cuda/eigh_*.cu) runs eigh_twostage_blocked below:
// the same stage 1 and stage 3, stage 2 as a kernel (one thread block per sweep, sweeps
// pipelined; window algorithm in eigh_chase.h, shared with a CPU emulation) that records its
// reflectors directly in blocked layout (Sb2stBlocks). Stage 3's scalar work (secular
// equations, the subproblems of ~1024 rows) is host code in double, as in LAPACK-based GPU
// solvers; the products of its merges run on A's device (stedc_factored).
#pragma once
#include <ATen/core/Tensor.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <functional>
#include <memory>
#include <vector>

namespace curvfast {
namespace eigh2 {

// Householder blocks of stage 1: Q1 = prod_p (I - V_p T_p V_p^T), V_p acting on rows off_p..n-1.
struct Sy2sbReflectors {
  std::vector<int64_t> off;
  std::vector<at::Tensor> V;  // (n - off_p, r_p), unit lower trapezoidal
  std::vector<at::Tensor> T;  // (r_p, r_p) upper triangular
};

// Reflectors of stage 2: for sweep j, step s, a reflector of length len(j,s) <= b on rows
// row0(j,s) = j + 1 + s*b ..; v[0] = 1 stored explicitly.
struct Sb2stReflectors {
  int64_t n = 0, b = 0;
  std::vector<int64_t> first;   // first[j]: index of sweep j's step 0 in tau / v (v at idx*b)
  std::vector<int64_t> steps;   // steps[j]: number of steps of sweep j
  std::vector<double> tau;      // one per (j, s)
  std::vector<double> v;        // b values per (j, s)
};

// T of the compact WY form I - V T V^T = H_0 H_1 ... (forward, columnwise), from V (m, r) and tau (r).
at::Tensor larft(const at::Tensor& V, const at::Tensor& tau);

// In a worker thread: BLAS (MKL, thread-local setting) and OpenMP use `threads` threads.
struct SingleThreadedBlas {
  explicit SingleThreadedBlas(int threads = 1);
  ~SingleThreadedBlas();
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  int omp_threads_ = 0, mkl_threads_ = 0;
};

// CURVFAST_EIGH_PROFILE (set at all) prints the time of each stage to stderr: wall time, and the
// process CPU time (all threads, spinning included) over the same span.
struct HostStageClock {
  bool on = std::getenv("CURVFAST_EIGH_PROFILE") != nullptr;
  std::chrono::steady_clock::time_point t = std::chrono::steady_clock::now();
  std::clock_t c = std::clock();
  void lap(const char* what, int64_t n) {
    if (!on) return;
    const auto now = std::chrono::steady_clock::now();
    const std::clock_t cnow = std::clock();
    std::fprintf(stderr, "eigh_twostage n=%lld %-12s %.3f s (cpu %.3f s)\n", (long long)n, what,
                 std::chrono::duration<double>(now - t).count(), double(cnow - c) / CLOCKS_PER_SEC);
    t = now;
    c = cnow;
  }
};

// body(0) on the calling thread and body(1) .. body(count - 1) on threads of their own; joins all
// of them, then rethrows the first exception any of them raised.
void run_concurrently(int64_t count, const std::function<void(int64_t)>& body);

// One block reflector I - V T V^T acting on rows off .. off + V.size(0) - 1. W = V T, when
// defined, replaces T (two GEMMs per application instead of three; T may then be undefined).
struct WYBlock {
  int64_t off;
  at::Tensor V, T;
  at::Tensor W = {};
};
// Z <- B_0 B_1 ... B_last Z, i.e. applies blocks.back() first. Z's columns are split into one
// chunk per thread and each thread runs every block on its chunk with single-threaded GEMMs:
// the blocks are thin (K = 32..128), and thin GEMMs split across threads spend their time in
// barriers (10x slower here when the cores are shared).
void apply_wy_blocks(const std::vector<WYBlock>& blocks, at::Tensor& Z);

// Stage 1: A (n,n) float/double, overwritten by nothing (copied). Returns the band matrix as a
// dense (n,n) tensor with zeros outside |i-j| <= b, plus the reflectors. lower_only: the
// trailing updates keep only the lower triangle, in 256-column blocks (half the flops, many
// more GEMM calls: the CPU's choice); else whole-matrix GEMMs (the GPU's).
at::Tensor sy2sb(const at::Tensor& A, int64_t b, Sy2sbReflectors& refl, bool lower_only = true);
// Z (n,k) <- Q1 Z, in place.
void sy2sb_apply(const Sy2sbReflectors& refl, at::Tensor& Z);

// Stage 2: band matrix (dense (n,n), lower part read) -> tridiagonal d (n), e (n-1) in double.
void sb2st(const at::Tensor& B, int64_t b, std::vector<double>& d, std::vector<double>& e,
           Sb2stReflectors& refl);
// Z (n,k) <- Q2 Z, in place, reflectors grouped into blocks of nb sweeps (GEMMs). A block is a
// (b+nb-1) x nb parallelogram, half zeros when nb = b: nb <= 0 picks sb2st_default_nb(b).
void sb2st_apply(const Sb2stReflectors& refl, at::Tensor& Z, int64_t nb);
int64_t sb2st_default_nb(int64_t b);
// sb2st_apply in two parts, so that the blocks can be built while stage 3 runs: the WY blocks
// (V, W = V T in `opts`; on this thread only unless `parallel`), then Z <- Q2 Z with them
// (build_s: the build time, for the profile line).
std::vector<WYBlock> sb2st_build_blocks(const Sb2stReflectors& refl, int64_t nb, const at::TensorOptions& opts,
                                        bool parallel);
void sb2st_apply_blocks(const std::vector<WYBlock>& blocks, at::Tensor& Z, double build_s = 0);

// Stage 2 for the CUDA kernel and its CPU emulation (csrc/cpu/eigh_chase.h): compact band buffer
// (n, 2b+1), column c = row c, entry (r, c) at [c, r-c]; and the reflectors recorded directly in
// blocked layout: block g = gfirst[J] + s holds step s of sweeps J*nb .. J*nb+nb-1 (nb = b),
// V (G, 2b, nb) (block rows start at row J*nb + 1 + s*b), tau (G, nb). Device-agnostic at:: ops.
struct Sb2stBlocks {
  int64_t n = 0, b = 0, nb = 0;
  std::vector<int64_t> gfirst;  // nJ + 1 entries
  at::Tensor gfirst_t;          // the same, int64, on the device of V
  at::Tensor V, tau;
};
at::Tensor pack_band(const at::Tensor& B, int64_t b);
Sb2stBlocks sb2st_blocks_alloc(int64_t n, int64_t b, const at::TensorOptions& opts);
// d (n) and e (n-1) of the chased band buffer, on the host in double.
void band_tridiagonal(const at::Tensor& band, std::vector<double>& d, std::vector<double>& e);
// Z (n,k) <- Q2 Z with GEMMs on Z's device; T of each block from T^-1 = diag(1/tau) + striu(V^T V).
// in_double: the blocks and the working copy of Z in float64 whatever Z's dtype.
void sb2st_blocks_apply(const Sb2stBlocks& q, at::Tensor& Z, bool in_double = false);

// The solver with a pluggable chase of the compact band buffer (stage 2), on A's device:
// sy2sb -> pack_band -> chase(band, blocks) -> stedc_factored (host; its merge products on A's
// device) -> sb2st_blocks_apply -> sy2sb_apply.
// The CUDA driver passes the kernel, the CPU emulation (eigh_emulate.cpp) its emulation, so this
// sequence is tested on the CPU. `lap` (may be empty) is called after each stage with its name.
// b >= 1 is the bandwidth (resolved by the caller); eigenvalues descending, top as eigh_twostage.
using ChaseFn = std::function<void(at::Tensor& band, Sb2stBlocks& q)>;
// The bandwidth eigh_twostage_blocked runs with when the caller asks for none (band <= 0): the
// CUDA driver's rule, which its CPU emulation follows.
inline int64_t blocked_auto_band(int64_t n) { return n >= 1536 ? 64 : 32; }
std::tuple<at::Tensor, at::Tensor> eigh_twostage_blocked(const at::Tensor& A, int64_t b, int64_t top,
                                                         const ChaseFn& chase,
                                                         const std::function<void(const char*)>& lap = {});

// Stage 3: divide and conquer. Returns eigenvalues ascending (double) and Z (n,n) in `dtype`;
// top_desc > 0: only the top_desc largest eigenpairs, largest first (w and Z (n, top_desc)).
at::Tensor stedc(std::vector<double> d, std::vector<double> e, at::ScalarType dtype,
                 std::vector<double>& w, int64_t top_desc = 0);

// Stage 3 with the products of the top `depth` levels of merges left undone: a node is a leaf
// (Z, its eigenvectors) or a merge, Z = diag(Z_left, Z_right) ST^T with ST (k, n) the merge's
// coefficients (U with the deflation rotations folded in). The top level holds 3/4 of the
// stage's flops, the top L levels 1 - 4^-L: they run where the eigenvectors are wanted (the GPU,
// for the CUDA solver). Columns and w: the k = top_desc largest (all when top_desc <= 0),
// largest first at the root, all ascending below.
struct StedcFactored {
  at::Tensor Z, ST;
  std::shared_ptr<StedcFactored> left, right;
  int64_t rows() const;
  at::Tensor row(int64_t r) const;      // row r of Z, double, without forming Z
  at::Tensor product() const;           // Z, with GEMMs on the tensors' device
  void to(const at::Device& device);    // every tensor of the tree
  std::vector<int64_t> leaves() const;  // the leaves' sizes, left to right
};
StedcFactored stedc_factored(std::vector<double> d, std::vector<double> e, at::ScalarType dtype,
                             std::vector<double>& w, int64_t top_desc = 0, int depth = 1);

// Whole solver; eigenvalues descending; top > 0 keeps only the top eigenpairs.
std::tuple<at::Tensor, at::Tensor> eigh_twostage(const at::Tensor& A, int64_t band, int64_t top);

}  // namespace eigh2
}  // namespace curvfast
