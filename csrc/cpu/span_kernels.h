// Plain-C++ interface to the CPU element loops (span_kernels.cpp). This header
// deliberately includes no ATen header: the loops are compiled once per
// instruction set (see span_kernels.cpp) and must not drag ATen's inline
// functions into those target-specific regions.
#pragma once

#include <cstdint>

namespace spark_ext {
namespace cpu {

// Element dtype of x, dy and the outputs (parameters are always float32).
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// One contiguous span of n elements. Parameters: `pa`, `pb`, `pc` point at one
// value each (broadcast over the span) or, for the per-element variant, at n
// values aligned with the span.
//   torch-compatible (§5a): pa = 1/scale, pb = scale, pc = zero point.
//   LSQ (§5b):             pa = step (clamped), pb = offset (0 without one), pc unused.
// Backward accumulates the step/offset (scale/zero-point) gradient terms into
// acc_s / acc_z: 16 lanes (lane = index within the span mod 16) for the
// broadcast variant, n positions for the per-element one. Lanes make the sum
// order a fixed function of the span alone, whatever the vector width.
struct SpanArgs {
  const void* x = nullptr;
  const void* dy = nullptr;
  int64_t dy_stride = 1;  // backward: 1 = n contiguous values, 0 = one value for the whole span
  void* out = nullptr;  // y (forward) or dx (backward)
  int64_t n = 0;
  const float* pa = nullptr;
  const float* pb = nullptr;
  const float* pc = nullptr;
  float lo = 0.f, hi = 0.f;  // quant_min/quant_max (§5a) or -Qn/Qp (§5b)
  float gf = 1.f;            // grad_factor (§5a only; §5b scales after the sum)
  float* acc_s = nullptr;
  float* acc_z = nullptr;
};

using SpanFn = void (*)(const SpanArgs&);

constexpr int kLanes = 16;

// [dtype][per_element]
struct KernelTable {
  SpanFn fq_fwd[3][2];
  SpanFn fq_bwd[3][2];
  SpanFn lsq_fwd[3][2];
  SpanFn lsq_bwd[3][2];
  const char* isa;
};

// The table for the best instruction set this CPU supports (chosen once).
const KernelTable& kernels();

}  // namespace cpu
}  // namespace spark_ext
