// The one place where every op of curvfast._C is declared.
#include <ATen/core/Tensor.h>
#include <torch/library.h>
#include <torch/csrc/utils/pybind.h>

namespace curvfast {
void covariance_update_cpu(at::Tensor& acc, const at::Tensor& x, const std::optional<at::Tensor>& weight);
void covariance_update_grouped_cpu(at::TensorList accs, at::TensorList xs,
                                   const c10::List<std::optional<at::Tensor>>& weights);
const char* cpu_isa();
}

TORCH_LIBRARY(curvfast, m) {
  // acc += x^T diag(weight) x, acc (d, d) fp32 holds the full symmetric sum afterwards.
  m.def("covariance_update_(Tensor(a!) acc, Tensor x, Tensor? weight=None) -> ()");
  // Grouped form: accs[i] += xs[i]^T diag(weights[i]) xs[i] for every i, any sizes, one call.
  // weights is one entry per input (None where unweighted) or an empty list.
  m.def("covariance_update_grouped_(Tensor(a!)[] accs, Tensor[] xs, Tensor?[] weights) -> ()");
}

TORCH_LIBRARY_IMPL(curvfast, CPU, m) {
  m.impl("covariance_update_", &curvfast::covariance_update_cpu);
  m.impl("covariance_update_grouped_", &curvfast::covariance_update_grouped_cpu);
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
  m.def("cpu_isa", []() { return std::string(curvfast::cpu_isa()); },
        "Micro-kernel the CPU covariance update uses on this machine (avx512, avx2, generic); "
        "CURVFAST_CPU_ISA=avx2|generic forces a lower one");
}
