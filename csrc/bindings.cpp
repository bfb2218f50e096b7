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
  // Two-stage symmetric eigensolver (CPU, csrc/cpu/eigh_*.cpp). Eigenvalues descending;
  // top > 0 keeps only the top eigenpairs.
  m.def("eigh_twostage(Tensor A, int band=0, int top=0) -> (Tensor, Tensor)");
  m.def("eigh_twostage_batched(Tensor[] As, int band=0, int top=0, int workers=0) -> (Tensor[], Tensor[])");
  // Its stages, for tests: dense -> band (B, explicit Q1); band -> tridiagonal (d, e, explicit
  // Q2); tridiagonal -> eigenpairs (ascending).
  m.def("eigh_sy2sb(Tensor A, int band, bool lower_only=True) -> (Tensor, Tensor)");
  m.def("eigh_sb2st(Tensor B, int band) -> (Tensor, Tensor, Tensor)");
  m.def("eigh_stedc(Tensor d, Tensor e) -> (Tensor, Tensor)");
  m.def("eigh_stedc_factored(Tensor d, Tensor e, int top=0, int depth=1) -> (Tensor, Tensor, Tensor)");
  // CPU emulation of the CUDA bulge-chasing kernel (csrc/cpu/eigh_emulate.cpp): same window phases,
  // `threads` per block, `workers` blocks in flight. d, e, explicit Q2, raw V (G, 2b, b), tau (G, b).
  m.def("eigh_sb2st_emulate(Tensor B, int band, int workers=1, int threads=32) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The CUDA driver's whole stage sequence on CPU tensors with that emulated chase.
  m.def("eigh_twostage_emulate(Tensor A, int band=0, int top=0, int workers=1, int threads=128) -> (Tensor, Tensor)");
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
