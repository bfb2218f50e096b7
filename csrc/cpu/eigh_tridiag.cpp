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
//
// stedc_factored leaves the GEMMs of the top levels of merges undone and returns their operands
// as a tree: the subproblems' eigenvectors and each merge's coefficients (U with the deflation
// rotations folded in), so that those products (3/4 of the stage's flops for the top level,
// 1 - 4^-L for the top L) run where the eigenvectors are wanted, on the GPU for the CUDA solver.
// The tear vectors a merge needs are rows of its halves' eigenvectors, taken from the factors.
#include "eigh_twostage.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <memory>
#include <numeric>

namespace curvfast {
namespace eigh2 {
namespace {

constexpr int64_t kLeaf = 48;
// From this size on the two top-level halves are solved on two threads.
constexpr int64_t kSplitAbove = 1024;
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
// sum_j z2_j / (dd_j - s) and sum_j z2_j / (dd_j - s)^2 over j in [lo, hi), with independent
// partial sums (vectorizable) and one division per term. s is given as dd[o] + t.
__attribute__((always_inline)) inline void secular_sums(const double* __restrict dd, const double* __restrict z2,
                                                        double ddo, double t, int64_t lo, int64_t hi, double& f,
                                                        double& df) {
  constexpr int U = 8;
  double a[U] = {}, da[U] = {};
  int64_t j = lo;
  for (; j + U <= hi; j += U)
    for (int u = 0; u < U; ++u) {
      const double r = 1.0 / ((dd[j + u] - ddo) - t), q = z2[j + u] * r;
      a[u] += q;
      da[u] += q * r;
    }
  double s = 0, ds = 0;
  for (; j < hi; ++j) {
    const double r = 1.0 / ((dd[j] - ddo) - t), q = z2[j] * r;
    s += q;
    ds += q * r;
  }
  for (int u = 0; u < U; ++u) s += a[u], ds += da[u];
  f = s;
  df = ds;
}

__attribute__((always_inline)) inline void secular_root_body(int64_t i, int64_t k, const double* dd,
                                                             const double* z2, double rho, double zsum,
                                                             int64_t& org, double& tau) {
  const double invr = 1.0 / rho;
  const bool last = i == k - 1;
  int64_t o;
  double lo, hi;
  if (!last) {
    const double gap = dd[i + 1] - dd[i], mid = 0.5 * gap;
    double f0, d0;
    secular_sums(dd, z2, dd[i], mid, 0, k, f0, d0);
    const double f = invr + f0;
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
    double psi, dpsi, phi, dphi;
    secular_sums(dd, z2, dd[o], t, 0, i + 1, psi, dpsi);
    secular_sums(dd, z2, dd[o], t, i + 1, k, phi, dphi);
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

__attribute__((target("avx2,fma"))) void secular_root_avx2(int64_t i, int64_t k, const double* dd, const double* z2,
                                                           double rho, double zsum, int64_t& org, double& tau) {
  secular_root_body(i, k, dd, z2, rho, zsum, org, tau);
}
void secular_root_generic(int64_t i, int64_t k, const double* dd, const double* z2, double rho, double zsum,
                          int64_t& org, double& tau) {
  secular_root_body(i, k, dd, z2, rho, zsum, org, tau);
}
void secular_root(int64_t i, int64_t k, const double* dd, const double* z2, double rho, double zsum,
                  int64_t& org, double& tau) {
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2)
    secular_root_avx2(i, k, dd, z2, rho, zsum, org, tau);
  else
    secular_root_generic(i, k, dd, z2, rho, zsum, org, tau);
}

// Output columns: all in ascending order (kd == 0), or the kd largest, largest first; entries of
// the ascending order `perm` of all n eigenvalues.
std::vector<int64_t> selected(const std::vector<int64_t>& perm, int64_t kd) {
  if (kd <= 0) return perm;
  return std::vector<int64_t>(perm.rbegin(), perm.rbegin() + std::min<int64_t>(kd, (int64_t)perm.size()));
}

// One gather pass from the two sources of the output columns (new eigenvectors QN (n, k),
// deflated columns of Q), in the order of `selected`.
at::Tensor gather_columns(const at::Tensor& QN, const at::Tensor& Q, const std::vector<int64_t>& defl,
                          const std::vector<int64_t>& perm, int64_t kd) {
  const int64_t n = Q.size(0), k = QN.size(1);
  const std::vector<int64_t> sel = selected(perm, kd);
  const int64_t nc = (int64_t)sel.size();
  // Source of output column p: column src[p] of QN (src >= 0) or column -src[p]-1 of Q.
  std::vector<int64_t> src(nc);
  for (int64_t p = 0; p < nc; ++p) src[p] = sel[p] < k ? sel[p] : -defl[sel[p] - k] - 1;
  at::Tensor out = at::empty({n, nc}, Q.options());
  AT_DISPATCH_FLOATING_TYPES(Q.scalar_type(), "eigh_merge_gather", [&] {
    const scalar_t* qn = QN.data_ptr<scalar_t>();
    const scalar_t* q = Q.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t ldn = QN.stride(0), ldq = Q.stride(0);
    at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* a = qn + r * ldn;
        const scalar_t* b = q + r * ldq;
        scalar_t* orow = o + r * nc;
        for (int64_t p = 0; p < nc; ++p) orow[p] = src[p] >= 0 ? a[src[p]] : b[-src[p] - 1];
      }
    });
  });
  return out;
}

// A deflation rotation of columns p and j of the merge's basis Q:
// Q[:, p] <- c Q_p + s Q_j ; Q[:, j] <- -s Q_p + c Q_j.
struct Rotation {
  int64_t p, j;
  double c, s;
};

// The merge step up to, not including, the product with the halves' eigenvectors. D (n)
// eigenvalues of the two halves, z (n) the tear vector in their eigenbasis, m = size of the top
// half; `rotate` is called with each deflation rotation, in order, as it is decided.
struct MergeParts {
  int64_t k = 0;                     // poles kept (not deflated)
  int64_t n1 = 0, n2 = 0;            // of them: columns of the top half only, of both halves
  std::vector<int64_t> cols;         // column of Q that row r of U multiplies (top-only, both, bottom-only)
  at::Tensor UT;                     // (k, k) in the output dtype: row i = eigenvector i, over rows r
  std::vector<int64_t> defl, perm;   // deflated columns of Q; ascending order of lam
  std::vector<double> lam;           // the k new eigenvalues, then the deflated ones
};

// perm <- the ascending order of lam (stable).
void sort_values(MergeParts& mp) {
  mp.perm.resize(mp.lam.size());
  std::iota(mp.perm.begin(), mp.perm.end(), 0);
  std::stable_sort(mp.perm.begin(), mp.perm.end(), [&](int64_t a, int64_t b) { return mp.lam[a] < mp.lam[b]; });
}

MergeParts merge_parts(std::vector<double>& D, std::vector<double>& z, double rho, int64_t m, double eps_s,
                       at::ScalarType dt, const std::function<void(const Rotation&)>& rotate) {
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

  MergeParts out;
  std::vector<int64_t> nd;
  int64_t p = -1;
  for (int64_t j : order) {
    if (rho * std::fabs(z[j]) <= tol) {
      out.defl.push_back(j);
      continue;
    }
    if (p >= 0) {
      const double r = std::hypot(z[p], z[j]);
      const double c = z[j] / r, s = -z[p] / r;
      if (std::fabs((D[j] - D[p]) * c * s) <= tol) {
        rotate({p, j, c, s});
        const double dp = D[p], dj = D[j];
        D[p] = c * c * dp + s * s * dj;
        D[j] = s * s * dp + c * c * dj;
        z[p] = 0, z[j] = r;
        if (type[p] != type[j]) type[j] = 2;
        out.defl.push_back(p);
        p = j;
        continue;
      }
      nd.push_back(p);
    }
    p = j;
  }
  if (p >= 0) nd.push_back(p);

  const int64_t k = (int64_t)nd.size();
  out.k = k;
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
  for (int64_t j = 0; j < k; ++j) out.n1 += type[nd[j]] == 1, out.n2 += type[nd[j]] == 2;
  // U (k x k, row r = secular pole rows[r], column i = root i) is built column by column into
  // contiguous storage (U^T row-major, so each thread writes whole rows) directly in the output
  // dtype.
  out.UT = at::empty({k, k}, at::TensorOptions().dtype(dt));
  AT_DISPATCH_FLOATING_TYPES(dt, "eigh_merge_u", [&] {
    scalar_t* u = out.UT.data_ptr<scalar_t>();
    at::parallel_for(0, k, 64, [&](int64_t b, int64_t e) {
      std::vector<double> col(k);
      for (int64_t i = b; i < e; ++i) {
        double nrm = 0;
        for (int64_t r = 0; r < k; ++r) {
          const double v = zh[rows[r]] / delta(rows[r], i);
          col[r] = v;
          nrm += v * v;
        }
        nrm = 1.0 / std::sqrt(nrm);
        scalar_t* ui = u + i * k;
        for (int64_t r = 0; r < k; ++r) ui[r] = scalar_t(col[r] * nrm);
      }
    });
  });
  out.cols.resize(k);
  for (int64_t r = 0; r < k; ++r) out.cols[r] = nd[rows[r]];
  // All eigenpairs, new ones and deflated ones, sorted ascending.
  out.lam.resize(n);
  for (int64_t i = 0; i < k; ++i) out.lam[i] = dd[org[i]] + tau[i];
  for (size_t i = 0; i < out.defl.size(); ++i) out.lam[k + i] = D[out.defl[i]];
  sort_values(out);
  return out;
}

// A tear with rho = 0 (decoupled halves): nothing to solve, every column of the halves kept
// ("deflated") and sorted.
MergeParts decoupled_parts(const std::vector<double>& D) {
  MergeParts mp;
  const int64_t n = (int64_t)D.size();
  mp.defl.resize(n);
  std::iota(mp.defl.begin(), mp.defl.end(), 0);
  mp.lam = D;
  sort_values(mp);
  return mp;
}

// The eigenvalues of the output columns (see selected), from the ascending order perm of lam.
void output_values(const std::vector<double>& lam, const std::vector<int64_t>& perm, int64_t kd,
                   std::vector<double>& w) {
  const int64_t n = (int64_t)perm.size();
  w.resize(kd > 0 ? std::min(kd, n) : n);
  for (int64_t i = 0; i < (int64_t)w.size(); ++i) w[i] = lam[kd > 0 ? perm[n - 1 - i] : perm[i]];
}

// Merge step. Q (n,n) = diag(Q1, Q2) (modified: deflation rotations); kd as in dc: the output
// holds all columns ascending, or the kd largest, largest first.
at::Tensor merge(std::vector<double>& D, std::vector<double>& z, double rho, at::Tensor& Q, int64_t m,
                 double eps_s, std::vector<double>& w, int64_t kd) {
  const int64_t n = (int64_t)D.size();
  const auto dt = Q.scalar_type();
  MergeParts mp = merge_parts(D, z, rho, m, eps_s, dt, [&](const Rotation& g) {
    AT_DISPATCH_FLOATING_TYPES(dt, "eigh_rotate", [&] {
      scalar_t* q = Q.data_ptr<scalar_t>();
      const scalar_t cc = scalar_t(g.c), ss = scalar_t(g.s);
      for (int64_t r = 0; r < n; ++r) {
        const scalar_t a = q[r * n + g.p], b = q[r * n + g.j];
        q[r * n + g.p] = cc * a + ss * b;
        q[r * n + g.j] = -ss * a + cc * b;
      }
    });
  });
  const int64_t k = mp.k, n1 = mp.n1, n2 = mp.n2;
  at::Tensor Ut = mp.UT.t();
  at::Tensor colsT = at::tensor(mp.cols, at::kLong);
  at::Tensor QN = at::empty({n, k}, Q.options());
  if (n1 + n2 > 0) {
    at::Tensor top = Q.narrow(0, 0, m).index_select(1, colsT.narrow(0, 0, n1 + n2));
    at::Tensor out = QN.narrow(0, 0, m);
    at::mm_out(out, top, Ut.narrow(0, 0, n1 + n2));
  } else {
    QN.narrow(0, 0, m).zero_();
  }
  if (k - n1 > 0) {
    at::Tensor bot = Q.narrow(0, m, n - m).index_select(1, colsT.narrow(0, n1, k - n1));
    at::Tensor out = QN.narrow(0, m, n - m);
    at::mm_out(out, bot, Ut.narrow(0, n1, k - n1));
  } else {
    QN.narrow(0, m, n - m).zero_();
  }
  at::Tensor out = gather_columns(QN, Q, mp.defl, mp.perm, kd);
  output_values(mp.lam, mp.perm, kd, w);
  return out;
}

// The merge's output columns as ST (nc, n), Z = diag(Q1, Q2) ST^T, without forming Z: row p is
// output column p in the halves' eigenbasis before the deflation rotations (U's column scattered
// to the rows cols, or a unit vector for a deflated column), then the rotations applied to its
// entries, last first (Q G_1 .. G_r ST^T with each G acting on two entries). O(n nc) work.
at::Tensor merge_coefficients(int64_t n, const MergeParts& mp, const std::vector<Rotation>& rots, int64_t kd,
                              at::ScalarType dt) {
  const std::vector<int64_t> sel = selected(mp.perm, kd);
  const int64_t nc = (int64_t)sel.size(), k = mp.k;
  at::Tensor ST = at::zeros({nc, n}, at::TensorOptions().dtype(dt));
  AT_DISPATCH_FLOATING_TYPES(dt, "eigh_merge_coefficients", [&] {
    scalar_t* st = ST.data_ptr<scalar_t>();
    const scalar_t* ut = k > 0 ? mp.UT.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, nc, 16, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        scalar_t* row = st + p * n;
        if (sel[p] < k) {
          const scalar_t* u = ut + sel[p] * k;
          for (int64_t r = 0; r < k; ++r) row[mp.cols[r]] = u[r];
        } else {
          row[mp.defl[sel[p] - k]] = scalar_t(1);
        }
        for (auto it = rots.rbegin(); it != rots.rend(); ++it) {
          const scalar_t a = row[it->p], b = row[it->j], c = scalar_t(it->c), s = scalar_t(it->s);
          row[it->p] = c * a - s * b;
          row[it->j] = s * a + c * b;
        }
      }
    });
  });
  return ST;
}

// The two halves of a tear at m = n/2: T = diag(T1', T2') + rho v v^T, each half solved by
// `solve` (all eigenpairs, ascending; Child: their eigenvectors, explicit or factored) and
// `row(child, r)` giving row r of a child's eigenvectors in double. D: the halves' eigenvalues,
// z the tear vector in their eigenbasis.
template <typename Child>
struct Halves {
  int64_t m = 0;
  Child left, right;
  std::vector<double> D, z;
  double rho = 0;
};

template <typename Child, typename Solve, typename Row>
Halves<Child> solve_halves(const double* d, const double* e, int64_t n, bool split, Solve solve, Row row) {
  Halves<Child> h;
  const int64_t m = n / 2;
  h.m = m;
  const double beta = e[m - 1];
  h.rho = std::fabs(beta);
  std::vector<double> d1(d, d + m), d2(d + m, d + n);
  d1[m - 1] -= h.rho;
  d2[0] -= h.rho;
  std::vector<double> w1, w2;
  auto half = [&](int64_t t) {
    if (t == 0)
      h.right = solve(d2.data(), e + m, n - m, w2);
    else
      h.left = solve(d1.data(), e, m, w1);
  };
  if (split) {
    // The two halves on two threads, each with half of the BLAS threads: below the top merge
    // the GEMMs are small and the recursion is serial, so on two cores each working alone beats
    // both sharing every GEMM (no barriers).
    const int per = std::max(1, at::get_num_threads() / 2);
    run_concurrently(2, [&](int64_t t) {
      SingleThreadedBlas guard(per);
      half(t);
    });
  } else {
    half(1);
    half(0);
  }
  h.D = w1;
  h.D.insert(h.D.end(), w2.begin(), w2.end());
  h.z.resize(n);
  at::Tensor r1 = row(h.left, m - 1).contiguous();
  at::Tensor r2 = row(h.right, 0).contiguous();
  const double sg = beta < 0 ? -1.0 : 1.0;
  for (int64_t i = 0; i < m; ++i) h.z[i] = r1.data_ptr<double>()[i];
  for (int64_t i = 0; i < n - m; ++i) h.z[m + i] = sg * r2.data_ptr<double>()[i];
  return h;
}

at::Tensor dc(const double* d, const double* e, int64_t n, at::ScalarType dt, double eps_s, std::vector<double>& w,
              bool split, int64_t kd);

Halves<at::Tensor> dense_halves(const double* d, const double* e, int64_t n, at::ScalarType dt, double eps_s,
                                bool split) {
  return solve_halves<at::Tensor>(
      d, e, n, split,
      [&](const double* dh, const double* eh, int64_t nh, std::vector<double>& wh) {
        return dc(dh, eh, nh, dt, eps_s, wh, false, 0);
      },
      [](const at::Tensor& Q, int64_t r) { return Q.select(0, r).to(at::kDouble); });
}

// Leaf of the recursion (n <= kLeaf), output as dc's.
at::Tensor dc_leaf(const double* d, const double* e, int64_t n, at::ScalarType dt, std::vector<double>& w,
                   int64_t kd) {
  at::Tensor Z = leaf(d, e, n, dt, w);
  if (kd <= 0) return Z;
  kd = std::min(kd, n);
  std::vector<double> wd(w.rbegin(), w.rbegin() + kd);
  w = wd;
  return Z.narrow(1, n - kd, kd).flip({1}).contiguous();
}

// kd > 0: only the kd largest eigenpairs, largest first (the top-level call); else all, ascending.
at::Tensor dc(const double* d, const double* e, int64_t n, at::ScalarType dt, double eps_s, std::vector<double>& w,
              bool split, int64_t kd) {
  if (n <= kLeaf) return dc_leaf(d, e, n, dt, w, kd);
  Halves<at::Tensor> h = dense_halves(d, e, n, dt, eps_s, split);
  const int64_t m = h.m;
  at::Tensor Q = at::zeros({n, n}, h.left.options());
  Q.narrow(0, 0, m).narrow(1, 0, m).copy_(h.left);
  Q.narrow(0, m, n - m).narrow(1, m, n - m).copy_(h.right);
  h.left.reset(), h.right.reset();
  if (h.rho == 0) {
    const MergeParts mp = decoupled_parts(h.D);
    at::Tensor out = gather_columns(Q.narrow(1, 0, 0), Q, mp.defl, mp.perm, kd);
    output_values(mp.lam, mp.perm, kd, w);
    return out;
  }
  return merge(h.D, h.z, h.rho, Q, m, eps_s, w, kd);
}

// dc with the products of the top `depth` levels of merges left undone (StedcFactored); below,
// plain dc. Output columns and w as dc's.
StedcFactored factored(const double* d, const double* e, int64_t n, at::ScalarType dt, double eps_s,
                       std::vector<double>& w, bool split, int64_t kd, int depth) {
  StedcFactored f;
  if (depth <= 0 || n <= kLeaf) {
    f.Z = dc(d, e, n, dt, eps_s, w, split, kd);
    return f;
  }
  Halves<StedcFactored> h = solve_halves<StedcFactored>(
      d, e, n, split,
      [&](const double* dh, const double* eh, int64_t nh, std::vector<double>& wh) {
        return factored(dh, eh, nh, dt, eps_s, wh, false, 0, depth - 1);
      },
      [](const StedcFactored& c, int64_t r) { return c.row(r); });
  f.left = std::make_shared<StedcFactored>(std::move(h.left));
  f.right = std::make_shared<StedcFactored>(std::move(h.right));
  std::vector<Rotation> rots;
  const MergeParts mp = h.rho == 0 ? decoupled_parts(h.D)
                                   : merge_parts(h.D, h.z, h.rho, h.m, eps_s, dt,
                                                 [&](const Rotation& g) { rots.push_back(g); });
  f.ST = merge_coefficients(n, mp, rots, kd, dt);
  output_values(mp.lam, mp.perm, kd, w);
  return f;
}

// stedc's scaling of (d, e) to max |entry| = 1 around `solve`, which fills w; w is scaled back.
template <typename Solve>
auto scaled(std::vector<double>& d, std::vector<double>& e, std::vector<double>& w, Solve solve) {
  double scale = 0;
  for (double v : d) scale = std::max(scale, std::fabs(v));
  for (double v : e) scale = std::max(scale, std::fabs(v));
  if (scale == 0) scale = 1;
  for (double& v : d) v /= scale;
  for (double& v : e) v /= scale;
  auto out = solve();
  for (double& v : w) v *= scale;
  return out;
}

// The deflation unit: float64's eps, or float32's / 16. The merges' scalars are double, so only
// the float32 storage of the eigenvectors bounds the accuracy; deflating at float32's eps added
// ~3x the tolerance to the residual (n = 4096, spectrum 1e-8..1: |TZ - ZW|/|T| 2.8e-6, vs 3.1e-7
// at eps/16, in about the same time; eps/256 and float64's eps gave the same accuracy, the latter
// up to 2-3x slower where many poles deflate).
double eps_of(at::ScalarType dtype) {
  return dtype == at::kDouble ? kEps : (double)std::numeric_limits<float>::epsilon() / 16;
}

bool split_top(int64_t n) { return n >= kSplitAbove && at::get_num_threads() >= 2 && !at::in_parallel_region(); }

}  // namespace

at::Tensor stedc(std::vector<double> d, std::vector<double> e, at::ScalarType dtype, std::vector<double>& w,
                 int64_t top_desc) {
  const int64_t n = (int64_t)d.size();
  if (n == 0) {
    w.clear();
    return at::empty({0, 0}, at::TensorOptions().dtype(dtype));
  }
  return scaled(d, e, w, [&] {
    return dc(d.data(), e.data(), n, dtype, eps_of(dtype), w, split_top(n), std::max<int64_t>(0, top_desc));
  });
}

StedcFactored stedc_factored(std::vector<double> d, std::vector<double> e, at::ScalarType dtype,
                             std::vector<double>& w, int64_t top_desc, int depth) {
  const int64_t n = (int64_t)d.size();
  const int64_t kd = top_desc > 0 ? std::min(top_desc, n) : n;
  if (n <= kLeaf || depth <= 0) {
    StedcFactored f;
    f.Z = stedc(std::move(d), std::move(e), dtype, w, kd);
    return f;
  }
  return scaled(d, e, w, [&] {
    return factored(d.data(), e.data(), n, dtype, eps_of(dtype), w, split_top(n), kd, depth);
  });
}

int64_t StedcFactored::rows() const { return ST.defined() ? ST.size(1) : Z.size(0); }

at::Tensor StedcFactored::row(int64_t r) const {
  if (!ST.defined()) return Z.select(0, r).to(at::kDouble);
  const int64_t ml = left->rows();
  const bool top = r < ml;
  at::Tensor x = top ? left->row(r) : right->row(r - ml);
  at::Tensor S = top ? ST.narrow(1, 0, ml) : ST.narrow(1, ml, ST.size(1) - ml);
  return at::mv(S, x.to(S.scalar_type())).to(at::kDouble);
}

void StedcFactored::to(const at::Device& device) {
  if (Z.defined()) Z = Z.to(device);
  if (ST.defined()) ST = ST.to(device);
  if (left) left->to(device);
  if (right) right->to(device);
}

at::Tensor StedcFactored::product() const {
  if (!ST.defined()) return Z;
  const int64_t n = ST.size(1), ml = left->rows();
  at::Tensor out = at::empty({n, ST.size(0)}, ST.options());
  {
    at::Tensor top = out.narrow(0, 0, ml);
    at::mm_out(top, left->product(), ST.narrow(1, 0, ml).t());
  }
  at::Tensor bot = out.narrow(0, ml, n - ml);
  at::mm_out(bot, right->product(), ST.narrow(1, ml, n - ml).t());
  return out;
}

std::vector<int64_t> StedcFactored::leaves() const {
  if (!ST.defined()) return {Z.size(0)};
  std::vector<int64_t> out = left->leaves();
  for (int64_t v : right->leaves()) out.push_back(v);
  return out;
}

}  // namespace eigh2
}  // namespace curvfast
