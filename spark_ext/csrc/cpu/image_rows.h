// Helpers shared by the CPU kernels over [B, C, H, W] images (difficulty_cpu.cpp,
// weighted_kd_cpu.cpp): the KD losses ell and ell', the dtype/loss dispatch,
// strided 4-D views, input checks, and float32 row gather/scatter.
#pragma once

#include <ATen/ATen.h>
#include "../kernel_dtypes.h"
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <string>
#include <type_traits>
#include <utility>

namespace spark_ext {
namespace image {

enum Kind : int { kL1 = 0, kL2 = 1, kCharbonnier = 2 };

// docs/spec.md §2: Charbonnier eps = 1e-3 (the reference adds eps^2 to a float32 d^2).
constexpr float kEps = static_cast<float>(1e-3);
constexpr float kEps2 = static_cast<float>(1e-3 * 1e-3);

inline int parse_kind(const std::string& kd_loss) {
  if (kd_loss == "l1") return kL1;
  if (kd_loss == "l2") return kL2;
  if (kd_loss == "charbonnier") return kCharbonnier;
  TORCH_CHECK_VALUE(false, "kd_loss must be one of ('l1', 'l2', 'charbonnier'), got '", kd_loss, "'");
}

inline bool parse_mean(const std::string& reduction) {
  TORCH_CHECK_VALUE(reduction == "mean" || reduction == "sum", "reduction must be 'mean' or 'sum', got '", reduction,
                    "'");
  return reduction == "mean";
}

template <int K>
inline float ell(float d) {
  if (K == kL1) return std::fabs(d);
  if (K == kL2) return d * d;
  return std::sqrt(d * d + kEps2) - kEps;
}

// ell'(d): sign(d) with 0 at 0, 2d, d / sqrt(d^2 + eps^2).
template <int K>
inline float ell_grad(float d) {
  if (K == kL1) return static_cast<float>((d > 0.f) - (d < 0.f));
  if (K == kL2) return 2.f * d;
  return d / std::sqrt(d * d + kEps2);
}

// Calls f(scalar_t{}, std::integral_constant<int, K>{}) for the input dtype and kind.
template <typename F>
inline void dispatch(at::ScalarType st, int kind, F&& f) {
  auto with_kind = [&](auto zero) {
    switch (kind) {
      case kL1: f(zero, std::integral_constant<int, kL1>{}); break;
      case kL2: f(zero, std::integral_constant<int, kL2>{}); break;
      default: f(zero, std::integral_constant<int, kCharbonnier>{}); break;
    }
  };
  SPARK_DISPATCH_KERNEL_DTYPES(st, "spark_ext", [&] { with_kind(scalar_t{}); });
}

// A 4-D tensor's data pointer and strides (elements).
template <typename T>
struct View4 {
  T* p = nullptr;
  int64_t sb = 0, sc = 0, sh = 0, sw = 0;
  View4() = default;
  explicit View4(const at::Tensor& x)
      : p(static_cast<T*>(x.data_ptr())), sb(x.stride(0)), sc(x.stride(1)), sh(x.stride(2)), sw(x.stride(3)) {}
  T* at(int64_t b, int64_t c, int64_t h, int64_t w) const { return p + b * sb + c * sc + h * sh + w * sw; }
};

inline void check_images(const char* op, const at::Tensor& s, const at::Tensor& t, const at::Tensor* y) {
  TORCH_CHECK_VALUE(s.dim() == 4, op, ": student must be [B, C, H, W], got shape ", s.sizes());
  for (const at::Tensor* x : {&t, y}) {
    if (x == nullptr) continue;
    TORCH_CHECK_VALUE(x->sizes() == s.sizes(), op, ": inputs must share the student's shape ", s.sizes(), ", got ",
                      x->sizes());
    TORCH_CHECK_TYPE(x->scalar_type() == s.scalar_type(), op, ": inputs must share the student's dtype ",
                     s.scalar_type(), ", got ", x->scalar_type());
    TORCH_CHECK_VALUE(x->device().is_cpu(), op, ": CPU tensors expected, got ", x->device());
  }
  TORCH_CHECK_VALUE(s.device().is_cpu(), op, ": CPU tensors expected, got ", s.device());
  const auto st = s.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op,
                   ": inputs must be float32, float16 or bfloat16, got ", st);
}

// One image row (n values `stride` apart) converted to float32 into `out`, and
// back. The element loops then run over contiguous float rows, which the
// compiler vectorises whatever the input's dtype and layout.
template <typename T>
inline void gather_row(const T* p, int64_t stride, int64_t n, float* out) {
  if (stride == 1) {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(p[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(p[i * stride]);
  }
}

// The row as contiguous float32: the input itself when it already is one, else
// gathered into `buf`.
template <typename T>
inline const float* row_f32(const T* p, int64_t stride, int64_t n, float* buf) {
  if constexpr (std::is_same<T, float>::value) {
    if (stride == 1) return p;
  }
  gather_row(p, stride, n, buf);
  return buf;
}

template <typename T>
inline void scatter_row(const float* in, T* p, int64_t stride, int64_t n, float sign) {
  if (stride == 1) {
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(sign * in[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) p[i * stride] = static_cast<T>(sign * in[i]);
  }
}

}  // namespace image
}  // namespace spark_ext
