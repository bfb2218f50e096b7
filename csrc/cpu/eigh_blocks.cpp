// Stage 2 support shared by the CUDA path and its CPU emulation: the compact band buffer and the
// blocked back-transformation of the reflectors that the window algorithm (eigh_chase.h)
// records in blocked layout. Only at:: ops, so the same code runs on CPU and CUDA tensors
// (at::bmm / at::mm -> cuBLAS, at::linalg_solve_triangular -> cuBLAS trsm on CUDA).
#include "eigh_chase.h"
#include "eigh_twostage.h"

#include <ATen/ATen.h>

#include <algorithm>

namespace curvfast {
namespace eigh2 {

at::Tensor pack_band(const at::Tensor& B, int64_t b) {
  const int64_t n = B.size(0);
  at::Tensor band = at::zeros({n, 2 * b + 1}, B.options());
  for (int64_t d = 0; d <= std::min(b, n - 1); ++d) band.select(1, d).narrow(0, 0, n - d).copy_(B.diagonal(-d));
  return band;
}

Sb2stBlocks sb2st_blocks_alloc(int64_t n, int64_t b, const at::TensorOptions& opts) {
  Sb2stBlocks q;
  q.n = n, q.b = b, q.nb = b;
  const int64_t sweeps = std::max<int64_t>(n - 1, 0);
  const int64_t nJ = (sweeps + q.nb - 1) / q.nb;
  q.gfirst.assign(nJ + 1, 0);
  for (int64_t J = 0; J < nJ; ++J) q.gfirst[J + 1] = q.gfirst[J] + chase::steps_of(n, b, J * q.nb);
  const int64_t G = q.gfirst[nJ];
  q.V = at::zeros({G, 2 * b, q.nb}, opts);
  q.tau = at::zeros({G, q.nb}, opts);
  q.gfirst_t = at::tensor(q.gfirst, at::kLong).to(opts.device());
  return q;
}

void band_tridiagonal(const at::Tensor& band, std::vector<double>& d, std::vector<double>& e) {
  const int64_t n = band.size(0);
  at::Tensor dd = band.select(1, 0).to(at::kCPU, at::kDouble).contiguous();
  d.assign(dd.data_ptr<double>(), dd.data_ptr<double>() + n);
  e.clear();
  if (n > 1) {
    at::Tensor ee = band.select(1, 1).narrow(0, 0, n - 1).to(at::kCPU, at::kDouble).contiguous();
    e.assign(ee.data_ptr<double>(), ee.data_ptr<double>() + n - 1);
  }
}

// Product order Q2 = prod_J [G(J,smax) .. G(J,0)]: Q2 Z applies the last sweep block first and,
// inside one, s = 0 first (same order as sb2st_apply). Block (J, s) acts on rows
// [(J+s)b + 1, (J+s+2)b - 1] (nb = b), so it overlaps only blocks with J'+s' within 1 of J+s.
// Wavefront t(J, s) = 2(nJ-1-J) + s respects every ordered overlapping pair, and two blocks of one
// wavefront start 3b rows apart: each wavefront is one batch of disjoint blocks, applied with
// three bmm on the gathered 2b-row windows of Z (padded by 2b zero rows at the bottom; rows of a
// window past the block's own rows have V = 0 and come back unchanged). ~3n/b wavefronts instead
// of ~n^2/(2b^2) separate blocks.
void sb2st_blocks_apply(const Sb2stBlocks& q, at::Tensor& Z, bool in_double) {
  const int64_t n = q.n, b = q.b, nb = q.nb, sweeps = n - 1, k = Z.size(1);
  if (sweeps <= 0 || k == 0) return;
  TORCH_CHECK(nb == b, "sb2st_blocks_apply: the wavefront schedule assumes nb == b, got ", nb, " and ", b);
  const auto dt = Z.scalar_type();
  const auto dev = Z.device();
  // A recorded step whose reflector is the identity (tau = 0) still has v[0] = 1: zero it, and
  // give it T_ii = 1 so that the triangular inverse stays defined.
  at::Tensor nz = q.tau.ne(0);
  at::Tensor any = nz.any(1).to(at::kCPU);  // the one host sync: skip all-identity blocks
  const bool* anyp = any.data_ptr<bool>();
  const int64_t nJ = (int64_t)q.gfirst.size() - 1;
  int64_t tmax = 0;
  for (int64_t J = 0; J < nJ; ++J) tmax = std::max(tmax, 2 * (nJ - 1 - J) + q.gfirst[J + 1] - q.gfirst[J]);
  std::vector<int64_t> ord, rows, wstart{0};
  for (int64_t t = 0; t < tmax; ++t) {
    for (int64_t J = nJ - 1; J >= 0; --J) {
      const int64_t s = t - 2 * (nJ - 1 - J);
      if (s < 0) break;  // smaller J start later
      if (s >= q.gfirst[J + 1] - q.gfirst[J] || !anyp[q.gfirst[J] + s]) continue;
      ord.push_back(q.gfirst[J] + s);
      const int64_t rs = J * nb + 1 + s * b;
      for (int64_t i = 0; i < 2 * b; ++i) rows.push_back(rs + i);
    }
    if ((int64_t)ord.size() > wstart.back()) wstart.push_back((int64_t)ord.size());
  }
  const int64_t G = (int64_t)ord.size();
  if (G == 0) return;
  at::Tensor ordt = at::tensor(ord, at::kLong).to(dev);
  at::Tensor rowt = at::tensor(rows, at::kLong).to(dev);
  at::Tensor nzo = nz.index_select(0, ordt);
  at::Tensor tauo = q.tau.index_select(0, ordt);
  at::Tensor V = q.V.index_select(0, ordt) * nzo.unsqueeze(1);
  // T from T^-1 = diag(1/tau) + striu(V^T V) (compact WY, forward columnwise), in double, in
  // chunks of blocks to bound the temporaries.
  const auto work = in_double ? at::kDouble : dt;
  at::Tensor T = at::empty({G, nb, nb}, V.options().dtype(work));
  constexpr int64_t kChunk = 4096;
  for (int64_t g0 = 0; g0 < G; g0 += kChunk) {
    const int64_t c = std::min(kChunk, G - g0);
    at::Tensor Vc = V.narrow(0, g0, c).to(at::kDouble);
    at::Tensor tc = tauo.narrow(0, g0, c).to(at::kDouble);
    at::Tensor S = at::bmm(Vc.transpose(1, 2), Vc).triu(1);
    S = S + at::diag_embed(at::where(nzo.narrow(0, g0, c), tc.reciprocal(), at::ones_like(tc)));
    at::Tensor eye = at::eye(nb, S.options()).expand({c, nb, nb});
    T.narrow(0, g0, c).copy_(at::linalg_solve_triangular(S, eye, /*upper=*/true));
  }
  V = V.to(work);
  at::Tensor Zp = at::zeros({n + 2 * b, k}, Z.options().dtype(work));
  Zp.narrow(0, 0, n).copy_(Z);
  for (size_t w = 0; w + 1 < wstart.size(); ++w) {
    const int64_t o0 = wstart[w], c = wstart[w + 1] - o0;
    at::Tensor Vw = V.narrow(0, o0, c);
    at::Tensor idx = rowt.narrow(0, o0 * 2 * b, c * 2 * b);
    at::Tensor Zg = Zp.index_select(0, idx).view({c, 2 * b, k});
    at::Tensor Y = at::bmm(T.narrow(0, o0, c), at::bmm(Vw.transpose(1, 2), Zg));
    Zg.sub_(at::bmm(Vw, Y));
    Zp.index_copy_(0, idx, Zg.view({c * 2 * b, k}));
  }
  Z.copy_(Zp.narrow(0, 0, n));
}

std::tuple<at::Tensor, at::Tensor> eigh_twostage_blocked(const at::Tensor& A_in, int64_t b, int64_t top,
                                                         const ChaseFn& chase,
                                                         const std::function<void(const char*)>& lap) {
  const int64_t n = A_in.size(0);
  const auto dt = A_in.scalar_type();
  const int64_t k = (top > 0 && top < n) ? top : n;
  if (n == 0) return {at::empty({0}, A_in.options()), at::empty({0, 0}, A_in.options())};
  auto mark = [&](const char* what) {
    if (lap) lap(what);
  };
  b = std::max<int64_t>(1, std::min(b, std::max<int64_t>(n - 1, 1)));
  Sy2sbReflectors r1;
  at::Tensor buf;
  {
    at::Tensor A = ((A_in + A_in.t()) * 0.5).contiguous();
    at::Tensor B = sy2sb(A, b, r1, /*lower_only=*/false);  // whole-matrix GEMMs: fewer launches on a GPU
    A.reset();
    mark("dense->band");
    // The chase in double whatever A's dtype: the band is only n x (2b+1), and its float32
    // rounding over ~n reflectors per entry set most of the float32 solver's residual (emulated
    // sequence, n = 4096: residual 2.7e-6 -> 1.2e-6, orthogonality 1.7e-6 -> 1.4e-6; MKL 1.8e-6
    // and 2.8e-6 on the same matrix). Its reflectors are then double too, as Q2's application is.
    buf = pack_band(B, b).to(at::kDouble).contiguous();
  }
  Sb2stBlocks q = sb2st_blocks_alloc(n, b, buf.options());
  chase(buf, q);
  std::vector<double> d, e, w;
  band_tridiagonal(buf, d, e);  // on CUDA: waits for the chase
  buf.reset();
  mark("band->tri");
  // On the host, the k largest, largest first, down to subproblems of ~1024 rows; the products
  // of the merges above them (all but ~1024/n of the stage's flops) are left to A's device,
  // where their operands go.
  int depth = 1;
  while ((n >> depth) > 1024) ++depth;
  StedcFactored f = stedc_factored(std::move(d), std::move(e), dt, w, k, depth);
  mark("D&C host");
  f.to(A_in.device());
  at::Tensor Zk = f.product().contiguous();
  f = {};
  mark("D&C products");
  // In double: each entry of Z passes through ~3n/b blocks, and their float32 rounding was most
  // of the float32 solver's loss of orthogonality (emulated sequence, n = 4096: 4.1e-6 with
  // float32 blocks, 1.7e-6 in double; MKL 2.7e-6). On an H100/H200, DGEMM runs at about SGEMM's
  // rate; the gathers move twice the bytes.
  sb2st_blocks_apply(q, Zk, /*in_double=*/true);
  mark("apply Q2");
  sy2sb_apply(r1, Zk);
  mark("apply Q1");
  return {at::tensor(w, at::kDouble).to(A_in.device(), dt), Zk};
}

}  // namespace eigh2
}  // namespace curvfast
