// Host-side pieces shared by the CPU and CUDA implementations of the
// fake-quantization ops (docs/spec.md §5): the dense [outer, C, inner] view of the
// input, the per-channel parameters and the op entry points.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <string>
#include <tuple>

namespace spark_ext {

// Which formula family an op computes.
enum class Semantics : int {
  kTorchCompat = 0,  // docs/spec.md §5a: torch._fake_quantize_learnable_*
  kLsq = 1,          // docs/spec.md §5b: LSQ / LSQ+
};

// A dense view of x: its storage read linearly is [outer, C, inner] with the
// quantization channel in the middle (C == 1, inner == numel for per tensor).
// Any non-overlapping dense layout (contiguous, channels_last, permuted) maps
// onto this without a copy: in such a layout every dimension whose stride is
// larger than the channel's is a multiple of stride * C, and every smaller one
// lies inside one stride. Other layouts (slices with gaps, expanded, overlapping)
// are first copied into the layout `empty_like` gives them (one extra read and
// write of x, documented in the Python docstrings).
struct DenseView {
  at::Tensor x;  // dense; outputs are allocated with empty_like(x) and share its strides
  int64_t outer = 1, channels = 1, inner = 0;
};

DenseView dense_view(const at::Tensor& x, c10::optional<int64_t> axis);

// dy in exactly x's (dense) strides and dtype: returned as-is when it already
// is, else copied (one extra read and write; e.g. the expanded ones of
// `y.sum().backward()`). CUDA backward only: the CPU one reads dy in place.
at::Tensor match_layout(const at::Tensor& dy, const at::Tensor& like);

// Argument checks of the ops (shapes, dtypes, devices, ranges: metadata only).
// The public Python functions call the ops directly and rely on these; when one
// fails they re-check the arguments in Python for the documented message.
// The parameters' values are checked where the kernels read them.
void check_inputs(const char* op, Semantics semantics, const at::Tensor& x, const at::Tensor& p0,
                  const at::Tensor* p1, c10::optional<int64_t> axis, int64_t lo, int64_t hi, double grad_factor);

// "[v0, v1, ...]": the first values of a parameter, for error messages.
std::string first_values(const float* v, int64_t n);

int64_t normalize_axis(c10::optional<int64_t> axis, int64_t dim);

// Smallest step allowed inside the kernels (docs/spec.md §5b: tiny steps are clamped).
constexpr float kMinStep = 1e-8f;

// CPU entry points (fake_quant_cpu.cpp).
at::Tensor fq_forward_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                          c10::optional<int64_t> axis, int64_t quant_min, int64_t quant_max, double grad_factor);
std::tuple<at::Tensor, at::Tensor, at::Tensor> fq_backward_cpu(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
    c10::optional<int64_t> axis, int64_t quant_min, int64_t quant_max, double grad_factor);
at::Tensor lsq_forward_cpu(const at::Tensor& x, const at::Tensor& step, const c10::optional<at::Tensor>& offset,
                           c10::optional<int64_t> axis, int64_t qn, int64_t qp, double grad_factor);
std::tuple<at::Tensor, at::Tensor, at::Tensor> lsq_backward_cpu(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& step, const c10::optional<at::Tensor>& offset,
    c10::optional<int64_t> axis, int64_t qn, int64_t qp, double grad_factor);

}  // namespace spark_ext
