// Stage 3 of the two-stage eigensolver: symmetric tridiagonal eigenproblem by divide and
// conquer (Cuppen), with deflation and Gu-Eisenstat eigenvectors.
//
// T = diag(T1', T2') + rho v v^T (rank-one tear at the middle). With T1' = Q1 D1 Q1^T and
// T2' = Q2 D2 Q2^T, the merge solves D + rho z z^T: deflation (tiny z_i, or near-equal poles
// rotated together), the secular equation 1/rho + sum z_j^2/(d_j - lambda) = 0 per root
// (rational two-pole model with a bracket, roots stored relative to their nearest pole so that
// d_j - lambda_i is accurate), z recomputed from the roots (Gu-Eisenstat) so that the
// eigenvectors are orthogonal to working precision, and the update of the eigenvectors as two
// GEMMs that skip the zero blocks of diag(Q1, Q2). Scalars are double; the eigenvector
// matrices and GEMMs are in the requested dtype.
#include "eigh_twostage.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace curvfast {
namespace eigh2 {
namespace {

constexpr int64_t kLeaf = 48;
constexpr double kEps = std::numeric_limits<double>::epsilon();

at::Tensor leaf(const double* d, const double* e, int64_t n, at::ScalarType dt, std::vector<double>& w) {
  at::Tensor T = at::zeros({n, n}, at::TensorOptions().dtype(at::kDouble));
  double* t = T.data_ptr<double>();
  for (int64_t i = 0; i < n; ++i) t[i * n + i] = d[i];
  for (int64_t i = 0; i + 1 < n; ++i) t[i * n + i + 1] = t[(i + 1) * n + i] = e[i];
  auto [ev, Q] = at::linalg_eigh(T);
  w.assign(ev.data_ptr<double>(), ev.data_ptr<double>() + n);
  return Q.to(dt).contiguous();
}

// Root i of 1/rho + sum_j z2_j/(dd_j - lambda) = 0 (dd ascending, z2 > 0), returned as
// lambda = dd[org] + tau.
void secular_root(int64_t i, int64_t k, const double* dd, const double* z2, double rho, double zsum,
                  int64_t& org, double& tau) {
  const double invr = 1.0 / rho;
  const bool last = i == k - 1;
  int64_t o;
  double lo, hi;
  if (!last) {
    const double gap = dd[i + 1] - dd[i], mid = 0.5 * gap;
    double f = invr;
    for (int64_t j = 0; j < k; ++j) f += z2[j] / ((dd[j] - dd[i]) - mid);
    if (f >= 0) {
      o = i, lo = 0, hi = mid;
    } else {
      o = i + 1, lo = -(gap - mid), hi = 0;
    }
  } else {
    o = i, lo = 0, hi = rho * zsum;
  }
  const double di = dd[i] - dd[o], di1 = last ? 0.0 : dd[i + 1] - dd[o];
  double t = 0.5 * (lo + hi);
  for (int it = 0; it < 200; ++it) {
    double psi = 0, dpsi = 0, phi = 0, dphi = 0;
    for (int64_t j = 0; j <= i; ++j) {
      const double del = (dd[j] - dd[o]) - t, q = z2[j] / del;
      psi += q, dpsi += q / del;
    }
    for (int64_t j = i + 1; j < k; ++j) {
      const double del = (dd[j] - dd[o]) - t, q = z2[j] / del;
      phi += q, dphi += q / del;
    }
    const double f = invr + psi + phi;
    if (f == 0) break;
    if (f > 0) hi = t; else lo = t;
    if (std::fabs(f) <= 4 * kEps * (invr + std::fabs(psi) + std::fabs(phi))) break;
    const double Di = di - t, Di1 = di1 - t;
    double u;
    if (!last) {
      const double c = invr + psi - dpsi * Di + phi - dphi * Di1;
      const double a1 = dpsi * Di * Di, a2 = dphi * Di1 * Di1;
      const double A = c, B = -(c * (Di + Di1) + a1 + a2), C = c * Di * Di1 + a1 * Di1 + a2 * Di;
      if (A == 0) {
        u = -C / B;
      } else {
        const double disc = std::max(0.0, B * B - 4 * A * C);
        const double q = -0.5 * (B + std::copysign(std::sqrt(disc), B));
        const double r1 = q / A, r2 = q != 0 ? C / q : r1;
        u = (r1 > Di && r1 < Di1) ? r1 : r2;
      }
    } else {
      const double c = invr + psi - dpsi * Di, a1 = dpsi * Di * Di;
      u = c > 0 ? Di + a1 / c : std::numeric_limits<double>::quiet_NaN();
    }
    double tn = t + u;
    if (!(tn > lo && tn < hi)) tn = 0.5 * (lo + hi);
    if (tn == t || hi - lo <= 2 * kEps * std::max(std::fabs(lo), std::fabs(hi))) {
      t = tn;
      break;
    }
    t = tn;
  }
  org = o;
  tau = t;
}

// Merge step. D (n) eigenvalues of the two halves, z (n) the tear vector in their eigenbasis,
// Q (n,n) = diag(Q1, Q2) (modified: deflation rotations), m = size of the top half.
at::Tensor merge(std::vector<double>& D, std::vector<double>& z, double rho, at::Tensor& Q, int64_t m,
                 double eps_s, std::vector<double>& w) {
  const int64_t n = (int64_t)D.size();
  double zn = 0;
  for (double v : z) zn += v * v;
  zn = std::sqrt(zn);
  for (double& v : z) v /= zn;
  rho *= zn * zn;
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return D[a] < D[b]; });
  double dmax = 0;
  for (double v : D) dmax = std::max(dmax, std::fabs(v));
  const double tol = 8 * eps_s * std::max(dmax, rho);
  std::vector<int> type(n);
  for (int64_t i = 0; i < n; ++i) type[i] = i < m ? 1 : 3;

  const auto dt = Q.scalar_type();
  std::vector<int64_t> nd, defl;
  auto rotate = [&](int64_t p, int64_t j, double c, double s) {
    // Q[:, p] <- c Q_p + s Q_j ; Q[:, j] <- -s Q_p + c Q_j
    AT_DISPATCH_FLOATING_TYPES(dt, "eigh_rotate", [&] {
      scalar_t* q = Q.data_ptr<scalar_t>();
      const scalar_t cc = scalar_t(c), ss = scalar_t(s);
      for (int64_t r = 0; r < n; ++r) {
        const scalar_t a = q[r * n + p], b = q[r * n + j];
        q[r * n + p] = cc * a + ss * b;
        q[r * n + j] = -ss * a + cc * b;
      }
    });
  };
  int64_t p = -1;
  for (int64_t j : order) {
    if (rho * std::fabs(z[j]) <= tol) {
      defl.push_back(j);
      continue;
    }
    if (p >= 0) {
      const double r = std::hypot(z[p], z[j]);
      const double c = z[j] / r, s = -z[p] / r;
      if (std::fabs((D[j] - D[p]) * c * s) <= tol) {
        rotate(p, j, c, s);
        const double dp = D[p], dj = D[j];
        D[p] = c * c * dp + s * s * dj;
        D[j] = s * s * dp + c * c * dj;
        z[p] = 0, z[j] = r;
        if (type[p] != type[j]) type[j] = 2;
        defl.push_back(p);
        p = j;
        continue;
      }
      nd.push_back(p);
    }
    p = j;
  }
  if (p >= 0) nd.push_back(p);

  const int64_t k = (int64_t)nd.size();
  std::vector<double> dd(k), z2(k), zs(k);
  double zsum = 0;
  for (int64_t i = 0; i < k; ++i) {
    dd[i] = D[nd[i]], zs[i] = z[nd[i]], z2[i] = zs[i] * zs[i];
    zsum += z2[i];
  }
  std::vector<int64_t> org(k);
  std::vector<double> tau(k);
  at::parallel_for(0, k, 128, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) secular_root(i, k, dd.data(), z2.data(), rho, zsum, org[i], tau[i]);
  });
  auto delta = [&](int64_t j, int64_t i) { return (dd[j] - dd[org[i]]) - tau[i]; };  // d_j - lambda_i
  std::vector<double> zh(k);
  at::parallel_for(0, k, 128, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      double prod = -delta(j, j);
      for (int64_t i = 0; i < k; ++i)
        if (i != j) prod *= delta(j, i) / (dd[j] - dd[i]);
      zh[j] = std::copysign(std::sqrt(std::fabs(prod)), zs[j]);
    }
  });
  // Rows of U ordered by column type (top-only, both, bottom-only) so that the GEMMs skip zeros.
  std::vector<int64_t> rows;
  for (int want : {1, 2, 3})
    for (int64_t j = 0; j < k; ++j)
      if (type[nd[j]] == want) rows.push_back(j);
  int64_t n1 = 0, n2 = 0;
  for (int64_t j = 0; j < k; ++j) n1 += type[nd[j]] == 1, n2 += type[nd[j]] == 2;
  at::Tensor U = at::empty({k, k}, at::TensorOptions().dtype(at::kDouble));
  double* u = U.data_ptr<double>();
  at::parallel_for(0, k, 128, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      double nrm = 0;
      for (int64_t r = 0; r < k; ++r) {
        const double v = zh[rows[r]] / delta(rows[r], i);
        u[r * k + i] = v;
        nrm += v * v;
      }
      nrm = 1.0 / std::sqrt(nrm);
      for (int64_t r = 0; r < k; ++r) u[r * k + i] *= nrm;
    }
  });
  at::Tensor Ut = U.to(dt);
  std::vector<int64_t> cols(k);
  for (int64_t r = 0; r < k; ++r) cols[r] = nd[rows[r]];
  at::Tensor colsT = at::tensor(cols, at::kLong);
  at::Tensor QN = at::zeros({n, k}, Q.options());
  if (n1 + n2 > 0) {
    at::Tensor top = Q.narrow(0, 0, m).index_select(1, colsT.narrow(0, 0, n1 + n2));
    QN.narrow(0, 0, m).copy_(at::mm(top, Ut.narrow(0, 0, n1 + n2)));
  }
  if (k - n1 > 0) {
    at::Tensor bot = Q.narrow(0, m, n - m).index_select(1, colsT.narrow(0, n1, k - n1));
    QN.narrow(0, m, n - m).copy_(at::mm(bot, Ut.narrow(0, n1, k - n1)));
  }
  // Collect eigenpairs: new ones and deflated ones, sorted ascending.
  std::vector<double> lam(n);
  for (int64_t i = 0; i < k; ++i) lam[i] = dd[org[i]] + tau[i];
  for (size_t i = 0; i < defl.size(); ++i) lam[k + i] = D[defl[i]];
  std::vector<int64_t> perm(n);
  std::iota(perm.begin(), perm.end(), 0);
  std::stable_sort(perm.begin(), perm.end(), [&](int64_t a, int64_t b) { return lam[a] < lam[b]; });
  at::Tensor all = defl.empty() ? QN : at::cat({QN, Q.index_select(1, at::tensor(defl, at::kLong))}, 1);
  w.resize(n);
  for (int64_t i = 0; i < n; ++i) w[i] = lam[perm[i]];
  return all.index_select(1, at::tensor(perm, at::kLong)).contiguous();
}

at::Tensor dc(const double* d, const double* e, int64_t n, at::ScalarType dt, double eps_s, std::vector<double>& w) {
  if (n <= kLeaf) return leaf(d, e, n, dt, w);
  const int64_t m = n / 2;
  const double beta = e[m - 1], rho = std::fabs(beta);
  std::vector<double> d1(d, d + m), d2(d + m, d + n);
  d1[m - 1] -= rho;
  d2[0] -= rho;
  std::vector<double> w1, w2;
  at::Tensor Q1 = dc(d1.data(), e, m, dt, eps_s, w1);
  at::Tensor Q2 = dc(d2.data(), e + m, n - m, dt, eps_s, w2);
  at::Tensor Q = at::zeros({n, n}, Q1.options());
  Q.narrow(0, 0, m).narrow(1, 0, m).copy_(Q1);
  Q.narrow(0, m, n - m).narrow(1, m, n - m).copy_(Q2);
  std::vector<double> D(w1);
  D.insert(D.end(), w2.begin(), w2.end());
  std::vector<double> z(n);
  at::Tensor r1 = Q1.select(0, m - 1).to(at::kDouble).contiguous();
  at::Tensor r2 = Q2.select(0, 0).to(at::kDouble).contiguous();
  const double sg = beta < 0 ? -1.0 : 1.0;
  for (int64_t i = 0; i < m; ++i) z[i] = r1.data_ptr<double>()[i];
  for (int64_t i = 0; i < n - m; ++i) z[m + i] = sg * r2.data_ptr<double>()[i];
  if (rho == 0) {
    // Decoupled halves: just sort.
    std::vector<int64_t> perm(n);
    std::iota(perm.begin(), perm.end(), 0);
    std::stable_sort(perm.begin(), perm.end(), [&](int64_t a, int64_t b) { return D[a] < D[b]; });
    w.resize(n);
    for (int64_t i = 0; i < n; ++i) w[i] = D[perm[i]];
    return Q.index_select(1, at::tensor(perm, at::kLong)).contiguous();
  }
  return merge(D, z, rho, Q, m, eps_s, w);
}

}  // namespace

at::Tensor stedc(std::vector<double> d, std::vector<double> e, at::ScalarType dtype, std::vector<double>& w) {
  const int64_t n = (int64_t)d.size();
  if (n == 0) {
    w.clear();
    return at::empty({0, 0}, at::TensorOptions().dtype(dtype));
  }
  double scale = 0;
  for (double v : d) scale = std::max(scale, std::fabs(v));
  for (double v : e) scale = std::max(scale, std::fabs(v));
  if (scale == 0) scale = 1;
  for (double& v : d) v /= scale;
  for (double& v : e) v /= scale;
  const double eps_s = dtype == at::kDouble ? kEps : (double)std::numeric_limits<float>::epsilon();
  at::Tensor Z = dc(d.data(), e.data(), n, dtype, eps_s, w);
  for (double& v : w) v *= scale;
  return Z;
}

}  // namespace eigh2
}  // namespace curvfast
