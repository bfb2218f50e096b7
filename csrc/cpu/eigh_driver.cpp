// Two-stage symmetric eigensolver: the driver, the batched driver and the op registrations
// (torch.ops.curvfast.eigh_*). The schemas are declared in csrc/bindings.cpp.
#include "eigh_twostage.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <optional>


namespace curvfast {
namespace eigh2 {
namespace {

void check_square(const at::Tensor& A, const char* what) {
  TORCH_CHECK(A.dim() == 2 && A.size(0) == A.size(1), what, ": expected a square (n, n) matrix, got shape ",
              A.sizes());
  TORCH_CHECK(A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble, what,
              ": expected float32 or float64, got ", A.scalar_type());
  TORCH_CHECK(A.device().is_cpu(), what, ": the C++ eigensolver runs on CPU tensors, got ", A.device(),
              "; use backend='torch' or 'auto' for other devices");
}

// Wider bands make the chase (~n^2 b) dearer but the back-transformation of its reflectors
// (blocks of 32 sweeps, padding (b+31)/b) and stage 1 cheaper. Interleaved medians at n = 4096
// (2 cores): b = 64 3.61 s, 96 3.44-3.47 s, 128 3.42 s; n = 2048: 64 0.540 s, 96 0.525 s.
int64_t auto_band(int64_t n) { return n >= 3072 ? 128 : n >= 1536 ? 96 : 32; }

// Below this size one thread is faster: the solver is a chain of small GEMMs and short loops
// whose thread barriers dominate (and stall for whole time slices when cores are shared).
constexpr int64_t kSerialBelow = 1024;

// (A + A^T) / 2, contiguous, in 64 x 64 tiles (the transposed tile stays in L1): ~5x faster than
// the elementwise ops at n = 4096, whose transposed reads are strided; same rounding.
at::Tensor symmetrize(const at::Tensor& A) {
  const int64_t n = A.size(0);
  at::Tensor S = at::empty({n, n}, A.options().memory_format(at::MemoryFormat::Contiguous));
  constexpr int64_t kTile = 64;
  const int64_t tiles = (n + kTile - 1) / kTile;
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "eigh_symmetrize", [&] {
    const scalar_t* a = A.data_ptr<scalar_t>();
    scalar_t* o = S.data_ptr<scalar_t>();
    const int64_t s0 = A.stride(0), s1 = A.stride(1);
    at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t ti = t0; ti < t1; ++ti) {
        const int64_t i0 = ti * kTile, i1 = std::min(n, i0 + kTile);
        for (int64_t j0 = 0; j0 < n; j0 += kTile) {
          const int64_t j1 = std::min(n, j0 + kTile);
          for (int64_t i = i0; i < i1; ++i)
            for (int64_t j = j0; j < j1; ++j) o[i * n + j] = (a[i * s0 + j * s1] + a[j * s0 + i * s1]) * scalar_t(0.5);
        }
      }
    });
  });
  return S;
}

at::Tensor vec(const std::vector<double>& v, at::ScalarType dt) {
  return at::tensor(v, at::kDouble).to(dt);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> eigh_twostage(const at::Tensor& A_in, int64_t band, int64_t top) {
  check_square(A_in, "eigh_twostage");
  const int64_t n = A_in.size(0);
  const auto dt = A_in.scalar_type();
  const int64_t k = (top > 0 && top < n) ? top : n;
  if (n == 0) return {at::empty({0}, A_in.options()), at::empty({0, 0}, A_in.options())};
  std::optional<SingleThreadedBlas> serial;
  if (n < kSerialBelow) serial.emplace(1);
  at::Tensor A = symmetrize(A_in);
  const int64_t b = std::max<int64_t>(1, std::min(band > 0 ? band : auto_band(n), std::max<int64_t>(n - 1, 1)));
  HostStageClock clk;
  Sy2sbReflectors r1;
  at::Tensor B = sy2sb(A, b, r1);
  clk.lap("dense->band", n);
  std::vector<double> d, e, w;
  Sb2stReflectors r2;
  sb2st(B, b, d, e, r2);
  B.reset();
  clk.lap("band->tri", n);
  // The WY blocks of Q2 depend only on stage 2: one thread builds them while stage 3 runs (stage 3
  // leaves about a quarter of the cores idle in its serial parts).
  std::vector<WYBlock> q2;
  const auto opts = at::TensorOptions().dtype(dt);
  const bool overlap = n >= kSerialBelow && at::get_num_threads() >= 2 && !at::in_parallel_region();
  double build_s = 0;
  at::Tensor Zk;
  run_concurrently(overlap ? 2 : 1, [&](int64_t t) {
    if (t == 0) {
      Zk = stedc(std::move(d), std::move(e), dt, w, k);  // the k largest, descending
    } else {
      const auto t0 = std::chrono::steady_clock::now();
      q2 = sb2st_build_blocks(r2, 0, opts, false);
      build_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
  });
  clk.lap("tridiag D&C", n);
  std::vector<double> wk(w.begin(), w.begin() + k);
  if (!overlap) {
    const auto t0 = std::chrono::steady_clock::now();
    q2 = sb2st_build_blocks(r2, 0, opts, true);
    build_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  sb2st_apply_blocks(q2, Zk, build_s);
  q2.clear();
  clk.lap("apply Q2", n);
  sy2sb_apply(r1, Zk);
  clk.lap("apply Q1", n);
  return {vec(wk, dt), Zk};
}

namespace {

std::tuple<at::Tensor, at::Tensor> sy2sb_op(const at::Tensor& A, int64_t band, bool lower_only) {
  check_square(A, "eigh_sy2sb");
  Sy2sbReflectors r;
  at::Tensor B = sy2sb(symmetrize(A), std::max<int64_t>(1, band), r, lower_only);
  at::Tensor Q = at::eye(A.size(0), A.options());
  sy2sb_apply(r, Q);
  return {B, Q};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sb2st_op(const at::Tensor& B, int64_t band) {
  check_square(B, "eigh_sb2st");
  std::vector<double> d, e;
  Sb2stReflectors r;
  sb2st(B, std::max<int64_t>(1, band), d, e, r);
  at::Tensor Q = at::eye(B.size(0), B.options());
  sb2st_apply(r, Q, 0);
  return {vec(d, B.scalar_type()), vec(e, B.scalar_type()), Q};
}

// d (n,), e (n-1,) checked and copied to the host in double; returns their dtype.
at::ScalarType tridiagonal_input(const at::Tensor& d, const at::Tensor& e, const char* what, std::vector<double>& dv,
                                 std::vector<double>& ev) {
  TORCH_CHECK(d.dim() == 1 && e.dim() == 1 && (e.size(0) == std::max<int64_t>(d.size(0) - 1, 0)), what,
              ": expected d (n,) and e (n-1,), got ", d.sizes(), " and ", e.sizes());
  TORCH_CHECK(d.scalar_type() == at::kFloat || d.scalar_type() == at::kDouble, what,
              ": expected float32 or float64, got ", d.scalar_type());
  at::Tensor dd = d.to(at::kDouble).contiguous(), ed = e.to(at::kDouble).contiguous();
  dv.assign(dd.data_ptr<double>(), dd.data_ptr<double>() + dd.numel());
  ev.assign(ed.data_ptr<double>(), ed.data_ptr<double>() + ed.numel());
  return d.scalar_type();
}

std::tuple<at::Tensor, at::Tensor> stedc_op(const at::Tensor& d, const at::Tensor& e) {
  std::vector<double> dv, ev;
  const auto dt = tridiagonal_input(d, e, "eigh_stedc", dv, ev);
  std::vector<double> w;
  at::Tensor Z = stedc(dv, ev, dt, w);
  return {vec(w, dt), Z};
}

// stedc_factored to `depth` levels: w (the top largest, descending; all when top <= 0), Z formed
// from the tree with its GEMMs, and the leaves' sizes (the tree's shape).
std::tuple<at::Tensor, at::Tensor, at::Tensor> stedc_factored_op(const at::Tensor& d, const at::Tensor& e,
                                                                 int64_t top, int64_t depth) {
  std::vector<double> dv, ev;
  const auto dt = tridiagonal_input(d, e, "eigh_stedc_factored", dv, ev);
  TORCH_CHECK(depth >= 0 && depth <= 30, "eigh_stedc_factored: depth must be in 0..30, got ", depth);
  std::vector<double> w;
  StedcFactored f = stedc_factored(dv, ev, dt, w, top, (int)depth);
  return {vec(w, dt), f.product(), at::tensor(f.leaves(), at::kLong)};
}

// Several decompositions in flight: `workers` threads pull jobs largest-first (n^3 cost), each
// with its share of the cores for its own GEMMs (MKL / OpenMP thread counts are per thread).
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> batched_op(at::TensorList As, int64_t band,
                                                                         int64_t top, int64_t workers) {
  const int64_t m = (int64_t)As.size();
  for (const auto& A : As) check_square(A, "eigh_twostage_batched");
  std::vector<at::Tensor> W(m), Z(m);
  if (m == 0) return {W, Z};
  std::vector<int64_t> order(m);
  for (int64_t i = 0; i < m; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return As[a].size(0) > As[b].size(0); });
  const int cores = std::max(1, at::get_num_threads());
  if (workers <= 0) workers = std::min<int64_t>(m, cores);
  workers = std::max<int64_t>(1, std::min<int64_t>(workers, m));
  if (workers == 1) {
    for (int64_t i : order) std::tie(W[i], Z[i]) = eigh_twostage(As[i], band, top);
    return {W, Z};
  }
  const int per = std::max<int>(1, cores / (int)workers);
  std::atomic<int64_t> next{0};
  std::vector<at::Tensor> inputs(As.begin(), As.end());
  // A failed job ends its worker; the others finish the queue, then the first error is rethrown.
  run_concurrently(workers, [&](int64_t) {
    SingleThreadedBlas guard(per);
    for (int64_t t; (t = next.fetch_add(1)) < m;) {
      const int64_t i = order[t];
      std::tie(W[i], Z[i]) = eigh_twostage(inputs[i], band, top);
    }
  });
  return {W, Z};
}

}  // namespace
}  // namespace eigh2
}  // namespace curvfast

TORCH_LIBRARY_IMPL(curvfast, CPU, m) {
  m.impl("eigh_twostage", &curvfast::eigh2::eigh_twostage);
  m.impl("eigh_twostage_batched", &curvfast::eigh2::batched_op);
  m.impl("eigh_sy2sb", &curvfast::eigh2::sy2sb_op);
  m.impl("eigh_sb2st", &curvfast::eigh2::sb2st_op);
  m.impl("eigh_stedc", &curvfast::eigh2::stedc_op);
  m.impl("eigh_stedc_factored", &curvfast::eigh2::stedc_factored_op);
}
