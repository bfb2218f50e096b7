// Host-side argument checks shared by every op (one place, not copied per op).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define CURVFAST_CHECK_FP32_SQUARE(acc)                                                  \
  TORCH_CHECK((acc).scalar_type() == at::kFloat, #acc " must be float32, got ",          \
              (acc).scalar_type());                                                      \
  TORCH_CHECK((acc).dim() == 2 && (acc).size(0) == (acc).size(1),                        \
              #acc " must be a square matrix, got shape ", (acc).sizes());              \
  TORCH_CHECK((acc).is_contiguous(), #acc " must be contiguous")

#define CURVFAST_CHECK_ROWS(x, acc)                                                      \
  TORCH_CHECK((x).dim() == 2, #x " must be 2-D (T, d), got shape ", (x).sizes());        \
  TORCH_CHECK((x).size(1) == (acc).size(0), #x " has ", (x).size(1),                     \
              " columns but the accumulator is ", (acc).size(0), " x ", (acc).size(1));  \
  TORCH_CHECK((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kBFloat16 ||   \
                  (x).scalar_type() == at::kHalf,                                        \
              #x " must be float32, bfloat16 or float16, got ", (x).scalar_type());      \
  TORCH_CHECK((x).device() == (acc).device(), #x " is on ", (x).device(),               \
              " but the accumulator is on ", (acc).device())

#define CURVFAST_CHECK_WEIGHT(w, x)                                                      \
  if ((w).has_value()) {                                                                 \
    TORCH_CHECK((w)->dim() == 1 && (w)->size(0) == (x).size(0), "weight must have shape (", \
                (x).size(0), ",), got ", (w)->sizes());                                  \
    TORCH_CHECK((w)->device() == (x).device(), "weight is on ", (w)->device(),           \
                " but x is on ", (x).device());                                          \
  }

#define CURVFAST_CHECK_CPU(t)                                                            \
  TORCH_CHECK((t).device().is_cpu(), #t " must be a CPU tensor for the CPU kernel, got ", \
              (t).device())
