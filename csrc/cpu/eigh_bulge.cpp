// Stage 2 of the two-stage eigensolver: band -> tridiagonal by bulge chasing, and the blocked
// back-transformation of its reflectors.
//
// Sweep j annihilates column j below the subdiagonal with a reflector on rows j+1..j+b; the
// right-application to the block below creates a bulge, whose first column the next reflector
// (rows j+1+s*b ..) annihilates, and so on down the band. All work is on a b x b window of a
// compact column-major band buffer (2b+1 rows), so it stays in L1/L2; only the lower triangle
// is stored.
#include "eigh_twostage.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>

namespace curvfast {
namespace eigh2 {
namespace {

template <typename scalar_t>
struct Band {
  int64_t n, ld;
  std::vector<scalar_t> a;
  Band(int64_t n_, int64_t b) : n(n_), ld(2 * b + 1), a((size_t)(n_ * (2 * b + 1)), scalar_t(0)) {}
  // Column c from row r (r >= c): contiguous.
  scalar_t* col(int64_t r, int64_t c) { return a.data() + c * ld + (r - c); }
};

// H = I - tau v v^T with H x = beta e1 (LAPACK larfg convention); v[0] = 1.
template <typename scalar_t>
scalar_t make_reflector(scalar_t* x, int64_t L, scalar_t* v, scalar_t& tau) {
  const scalar_t alpha = x[0];
  double xn = 0;
  for (int64_t i = 1; i < L; ++i) xn += double(x[i]) * double(x[i]);
  v[0] = 1;
  if (xn == 0) {
    tau = 0;
    for (int64_t i = 1; i < L; ++i) v[i] = 0;
    return alpha;
  }
  const double beta = -std::copysign(std::sqrt(double(alpha) * double(alpha) + xn), double(alpha));
  tau = scalar_t((beta - double(alpha)) / beta);
  const scalar_t scale = scalar_t(1.0 / (double(alpha) - beta));
  for (int64_t i = 1; i < L; ++i) v[i] = x[i] * scale;
  return scalar_t(beta);
}

template <typename scalar_t>
void sb2st_impl(const at::Tensor& B_in, int64_t b, std::vector<double>& d, std::vector<double>& e,
                Sb2stReflectors& refl) {
  const int64_t n = B_in.size(0);
  at::Tensor B = B_in.contiguous();
  const scalar_t* bp = B.data_ptr<scalar_t>();
  Band<scalar_t> A(n, b);
  for (int64_t c = 0; c < n; ++c)
    for (int64_t r = c; r < std::min(n, c + b + 1); ++r) *A.col(r, c) = bp[r * n + c];

  refl.n = n;
  refl.b = b;
  refl.first.assign(std::max<int64_t>(n - 1, 0), 0);
  refl.steps.assign(std::max<int64_t>(n - 1, 0), 0);
  int64_t total = 0;
  for (int64_t j = 0; j + 1 < n; ++j) {
    refl.first[j] = total;
    refl.steps[j] = (n - 1 - j + b - 1) / b;
    total += refl.steps[j];
  }
  refl.tau.assign(total, 0.0);
  refl.v.assign(total * b, 0.0);

  std::vector<scalar_t> v(b), p(b), w(2 * b), x(b);
  for (int64_t j = 0; j + 1 < n; ++j) {
    for (int64_t s = 0; s < refl.steps[j]; ++s) {
      const int64_t r0 = j + 1 + s * b;
      const int64_t L = std::min(b, n - r0);
      const int64_t c0 = s == 0 ? j : r0 - b;  // column whose entries below r0 are annihilated
      scalar_t tau = 0;
      {
        scalar_t* xc = A.col(r0, c0);
        const scalar_t beta = make_reflector<scalar_t>(xc, L, v.data(), tau);
        xc[0] = beta;
        for (int64_t i = 1; i < L; ++i) xc[i] = 0;
      }
      const int64_t idx = refl.first[j] + s;
      refl.tau[idx] = tau;
      for (int64_t i = 0; i < L; ++i) refl.v[idx * b + i] = v[i];
      // H = I: nothing to apply, but later steps still clean the bulge the previous sweep left.
      if (tau == scalar_t(0)) continue;
      // (a) Left-apply H to the rest of the block rows r0.. x columns c0+1 .. c0+b-1 (s >= 1).
      if (s > 0) {
        for (int64_t c = c0 + 1; c < c0 + b; ++c) {
          scalar_t* col = A.col(r0, c);
          scalar_t dot = 0;
          for (int64_t i = 0; i < L; ++i) dot += v[i] * col[i];
          dot *= tau;
          for (int64_t i = 0; i < L; ++i) col[i] -= dot * v[i];
        }
      }
      // (b) Two-sided update of the diagonal block (lower triangle): p = tau A v,
      //     w = p - tau/2 (p.v) v, A -= v w^T + w v^T.
      for (int64_t i = 0; i < L; ++i) p[i] = 0;
      for (int64_t c = 0; c < L; ++c) {
        const scalar_t* col = A.col(r0 + c, r0 + c);
        scalar_t acc = col[0] * v[c];
        const scalar_t vc = v[c];
        for (int64_t i = 1; i < L - c; ++i) {
          p[c + i] += col[i] * vc;
          acc += col[i] * v[c + i];
        }
        p[c] += acc;
      }
      scalar_t pv = 0;
      for (int64_t i = 0; i < L; ++i) {
        p[i] *= tau;
        pv += p[i] * v[i];
      }
      const scalar_t half = scalar_t(0.5) * tau * pv;
      for (int64_t i = 0; i < L; ++i) p[i] -= half * v[i];
      for (int64_t c = 0; c < L; ++c) {
        scalar_t* col = A.col(r0 + c, r0 + c);
        const scalar_t vc = v[c], pc = p[c];
        for (int64_t i = 0; i < L - c; ++i) col[i] -= v[c + i] * pc + p[c + i] * vc;
      }
      // (c) Right-apply H to the block below: rows r0+b .. r0+2b-1, columns r0 .. r0+L-1.
      const int64_t rb = r0 + b;
      if (rb < n) {
        const int64_t Lb = std::min(b, n - rb);
        for (int64_t i = 0; i < Lb; ++i) w[i] = 0;
        for (int64_t c = 0; c < L; ++c) {
          const scalar_t* col = A.col(rb, r0 + c);
          const scalar_t vc = v[c];
          for (int64_t i = 0; i < Lb; ++i) w[i] += col[i] * vc;
        }
        for (int64_t i = 0; i < Lb; ++i) w[i] *= tau;
        for (int64_t c = 0; c < L; ++c) {
          scalar_t* col = A.col(rb, r0 + c);
          const scalar_t vc = v[c];
          for (int64_t i = 0; i < Lb; ++i) col[i] -= w[i] * vc;
        }
      }
    }
  }
  d.resize(n);
  e.resize(std::max<int64_t>(n - 1, 0));
  for (int64_t i = 0; i < n; ++i) d[i] = *A.col(i, i);
  for (int64_t i = 0; i + 1 < n; ++i) e[i] = *A.col(i + 1, i);
}

}  // namespace

void sb2st(const at::Tensor& B, int64_t b, std::vector<double>& d, std::vector<double>& e,
           Sb2stReflectors& refl) {
  TORCH_CHECK(b >= 1, "sb2st: bandwidth must be >= 1, got ", b);
  if (B.scalar_type() == at::kDouble)
    sb2st_impl<double>(B, b, d, e, refl);
  else
    sb2st_impl<float>(B.to(at::kFloat), b, d, e, refl);
}

// Q2 = H(0,0) H(0,1) .. H(1,0) .. in generation order. Reflectors (j,s) of nb <= b consecutive
// sweeps at the same step s touch rows j0+1+s*b .. j0+nb-1+(s+1)*b and form one compact WY block
// G(J,s). (j,s) overlaps (j',s) and (j',s-1) for j < j' only, so within a sweep block the product
// is G(J,smax) .. G(J,1) G(J,0): Q2 Z applies blocks last to first and, inside, s = 0 first.
void sb2st_apply(const Sb2stReflectors& refl, at::Tensor& Z, int64_t nb) {
  const int64_t n = refl.n, b = refl.b, sweeps = n - 1;
  if (sweeps <= 0) return;
  nb = std::max<int64_t>(1, std::min(nb, b));
  // Blocks in product order: sweep blocks first to last, inside one G(J,smax) .. G(J,0).
  struct Desc {
    int64_t j0, cnt, s, rs, rows;
  };
  auto t0 = std::chrono::steady_clock::now();
  std::vector<Desc> desc;
  for (int64_t j0 = 0; j0 < sweeps; j0 += nb) {
    const int64_t jn = std::min(j0 + nb, sweeps);
    for (int64_t s = refl.steps[j0] - 1; s >= 0; --s) {
      const int64_t rs = j0 + 1 + s * b;
      int64_t cnt = 0;
      bool any = false;
      for (int64_t j = j0; j < jn && s < refl.steps[j]; ++j, ++cnt) any |= refl.tau[refl.first[j] + s] != 0.0;
      if (!any) continue;
      const int64_t rows = std::min(n, j0 + cnt + (s + 1) * b) - rs;
      desc.push_back({j0, cnt, s, rs, rows});
    }
  }
  std::vector<WYBlock> blocks(desc.size());
  const auto dt = Z.scalar_type();
  at::parallel_for(0, (int64_t)desc.size(), 8, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const Desc& q = desc[g];
      at::Tensor V = at::zeros({q.rows, q.cnt}, at::TensorOptions().dtype(at::kDouble));
      at::Tensor tau = at::empty({q.cnt}, at::TensorOptions().dtype(at::kDouble));
      double* vp = V.data_ptr<double>();
      double* tp = tau.data_ptr<double>();
      for (int64_t t = 0; t < q.cnt; ++t) {
        const int64_t idx = refl.first[q.j0 + t] + q.s;
        const int64_t L = std::min(b, n - (q.rs + t));
        tp[t] = refl.tau[idx];
        for (int64_t i = 0; i < L; ++i) vp[(t + i) * q.cnt + t] = refl.v[idx * b + i];
      }
      at::Tensor Vz = V.to(dt);
      blocks[g] = {q.rs, Vz, larft(Vz, tau.to(dt))};
    }
  });
  auto t1 = std::chrono::steady_clock::now();
  apply_wy_blocks(blocks, Z);
  if (std::getenv("CURVFAST_EIGH_PROFILE"))
    std::fprintf(stderr, "  sb2st_apply: %zu blocks, build %.3f s, apply %.3f s\n", blocks.size(),
                 std::chrono::duration<double>(t1 - t0).count(),
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count());
}

}  // namespace eigh2
}  // namespace curvfast
