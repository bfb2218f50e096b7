// CPU emulation of the CUDA bulge-chasing kernel (csrc/cuda/eigh_bulge.cu), for tests on machines
// without a GPU: the same window phases (eigh_chase.h) with the same thread partition (the
// block's `threads` threads run one after the other inside a phase), the same sweep pipeline
// (atomic ticket, per-sweep progress counters with release/acquire) run by `workers` real
// threads standing in for thread blocks, the same blocked reflector record and the same blocked
// back-transformation (eigh_blocks.cpp). Ops: torch.ops.curvfast.eigh_sb2st_emulate (the stage)
// and eigh_twostage_emulate (the CUDA driver's whole stage sequence with this chase).
#include "eigh_chase.h"
#include "eigh_twostage.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <atomic>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace curvfast {
namespace eigh2 {
namespace {

template <typename T>
void chase_emulate(at::Tensor& band, Sb2stBlocks& q, int64_t workers, int nt) {
  const int64_t n = q.n, b = q.b, sweeps = n - 1;
  if (sweeps <= 0) return;
  std::unique_ptr<std::atomic<int64_t>[]> progress(new std::atomic<int64_t>[sweeps]);
  for (int64_t j = 0; j < sweeps; ++j) progress[j].store(0);
  std::atomic<int64_t> ticket{0};
  chase::Window<T> base{};
  base.band = band.data_ptr<T>();
  base.ld = 2 * b + 1, base.n = n, base.b = b, base.nb = q.nb;
  base.gfirst = q.gfirst.data();
  base.V = q.V.data_ptr<T>();
  base.tau = q.tau.data_ptr<T>();
  auto work = [&]() {
    std::vector<T> v(b), p(b), w(b);
    std::vector<double> red(nt), scal(4);
    chase::Window<T> W = base;
    W.v = v.data(), W.p = p.data(), W.w = w.data(), W.red = red.data(), W.scal = scal.data();
    for (int64_t j; (j = ticket.fetch_add(1)) < sweeps;) {
      const int64_t steps = chase::steps_of(n, b, j);
      for (int64_t s = 0; s < steps; ++s) {
        const int64_t need = chase::wait_for(n, b, j, s);
        if (j > 0)
          while (progress[j - 1].load(std::memory_order_acquire) < need) std::this_thread::yield();
        const chase::Geometry g = chase::geometry(n, b, j, s);
        for (int ph = 0; ph < chase::kPhases; ++ph) {
          bool go = true;
          for (int tid = 0; tid < nt; ++tid) go = chase::phase(W, g, ph, tid, nt);
          if (!go) break;  // barrier, then every thread sees tau == 0
        }
        progress[j].store(s + 1, std::memory_order_release);
      }
    }
  };
  run_concurrently(workers, [&](int64_t) { work(); });
}

// B (n, n) band matrix (lower part within `band` read) -> d (n), e (n-1), explicit Q2 (n, n),
// and the raw record V (G, 2b, b), tau (G, b).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sb2st_emulate_op(
    const at::Tensor& B, int64_t band, int64_t workers, int64_t threads) {
  TORCH_CHECK(B.dim() == 2 && B.size(0) == B.size(1), "eigh_sb2st_emulate: expected a square (n, n) matrix, got ",
              B.sizes());
  TORCH_CHECK(B.scalar_type() == at::kFloat || B.scalar_type() == at::kDouble,
              "eigh_sb2st_emulate: expected float32 or float64, got ", B.scalar_type());
  TORCH_CHECK(B.device().is_cpu(), "eigh_sb2st_emulate: runs on CPU tensors, got ", B.device());
  TORCH_CHECK(threads >= 1 && threads <= 1024, "eigh_sb2st_emulate: threads must be in 1..1024, got ", threads);
  const int64_t n = B.size(0), b = std::max<int64_t>(1, band);
  at::Tensor buf = pack_band(B.contiguous(), b).contiguous();
  Sb2stBlocks q = sb2st_blocks_alloc(n, b, B.options());
  AT_DISPATCH_FLOATING_TYPES(B.scalar_type(), "eigh_sb2st_emulate",
                             [&] { chase_emulate<scalar_t>(buf, q, workers, (int)threads); });
  std::vector<double> d, e;
  band_tridiagonal(buf, d, e);
  at::Tensor Q = at::eye(n, B.options());
  sb2st_blocks_apply(q, Q);
  auto vec = [&](const std::vector<double>& x) { return at::tensor(x, at::kDouble).to(B.scalar_type()); };
  return {vec(d), vec(e), Q, q.V, q.tau};
}

// The CUDA driver's whole sequence (eigh_twostage_blocked) with the emulated chase: everything
// the CUDA solver runs except the kernel launch, on CPU tensors.
std::tuple<at::Tensor, at::Tensor> twostage_emulate_op(const at::Tensor& A, int64_t band, int64_t top,
                                                       int64_t workers, int64_t threads) {
  TORCH_CHECK(A.dim() == 2 && A.size(0) == A.size(1), "eigh_twostage_emulate: expected a square (n, n) matrix, got ",
              A.sizes());
  TORCH_CHECK(A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble,
              "eigh_twostage_emulate: expected float32 or float64, got ", A.scalar_type());
  TORCH_CHECK(A.device().is_cpu(), "eigh_twostage_emulate: runs on CPU tensors, got ", A.device());
  TORCH_CHECK(threads >= 1 && threads <= 1024, "eigh_twostage_emulate: threads must be in 1..1024, got ", threads);
  const int64_t n = A.size(0);
  HostStageClock clk;
  return eigh_twostage_blocked(
      A, band > 0 ? band : blocked_auto_band(n), top,
      [&](at::Tensor& buf, Sb2stBlocks& q) {
        AT_DISPATCH_FLOATING_TYPES(buf.scalar_type(), "eigh_twostage_emulate",
                                   [&] { chase_emulate<scalar_t>(buf, q, workers, (int)threads); });
      },
      [&](const char* what) { clk.lap(what, n); });
}

}  // namespace
}  // namespace eigh2
}  // namespace curvfast

TORCH_LIBRARY_IMPL(curvfast, CPU, m) {
  m.impl("eigh_sb2st_emulate", &curvfast::eigh2::sb2st_emulate_op);
  m.impl("eigh_twostage_emulate", &curvfast::eigh2::twostage_emulate_op);
}
