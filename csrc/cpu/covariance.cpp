// acc += x^T diag(w) x on the CPU, computing lower-triangle tiles only, then mirroring.
#include <ATen/ATen.h>
#include "../checks.h"

namespace curvfast {

void covariance_update_cpu(at::Tensor& acc, const at::Tensor& x,
                           const std::optional<at::Tensor>& weight) {
  CURVFAST_CHECK_FP32_SQUARE(acc);
  CURVFAST_CHECK_ROWS(x, acc);
  CURVFAST_CHECK_WEIGHT(weight, x);
  const int64_t d = acc.size(0);
  if (x.size(0) == 0 || d == 0) return;
  at::Tensor xf = x.to(at::kFloat);
  at::Tensor xw = weight.has_value() ? xf * weight->to(at::kFloat).unsqueeze(1) : xf;
  constexpr int64_t kTile = 512;
  for (int64_t i = 0; i < d; i += kTile) {
    const int64_t ni = std::min(kTile, d - i);
    at::Tensor xi = xw.narrow(1, i, ni);
    for (int64_t j = 0; j <= i; j += kTile) {
      const int64_t nj = std::min(kTile, d - j);
      at::Tensor block = acc.narrow(0, i, ni).narrow(1, j, nj);
      block.addmm_(xi.t(), xf.narrow(1, j, nj));
    }
  }
  // Mirror the freshly updated lower tiles into the upper triangle.
  for (int64_t i = 0; i < d; i += kTile) {
    const int64_t ni = std::min(kTile, d - i);
    for (int64_t j = 0; j < i; j += kTile) {
      const int64_t nj = std::min(kTile, d - j);
      acc.narrow(0, j, nj).narrow(1, i, ni).copy_(acc.narrow(0, i, ni).narrow(1, j, nj).t());
    }
    at::Tensor diag = acc.narrow(0, i, ni).narrow(1, i, ni);
    diag.copy_(diag.tril() + diag.tril(-1).t());
  }
}

}  // namespace curvfast
