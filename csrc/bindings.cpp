// The one place where every op of curvfast._C is declared.
#include <ATen/core/Tensor.h>
#include <torch/library.h>
#include <torch/csrc/utils/pybind.h>

namespace curvfast {
void covariance_update_cpu(at::Tensor& acc, const at::Tensor& x, const std::optional<at::Tensor>& weight);
}

TORCH_LIBRARY(curvfast, m) {
  // acc += x^T diag(weight) x, acc (d, d) fp32 holds the full symmetric sum afterwards.
  m.def("covariance_update_(Tensor(a!) acc, Tensor x, Tensor? weight=None) -> ()");
}

TORCH_LIBRARY_IMPL(curvfast, CPU, m) {
  m.impl("covariance_update_", &curvfast::covariance_update_cpu);
}

static bool with_cuda() {
#ifdef CURVFAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "curvfast compiled ops (registered as torch.ops.curvfast.*)";
  m.def("with_cuda", &with_cuda, "Whether CUDA kernels were compiled into this build");
}
