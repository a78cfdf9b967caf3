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

// Parameters of one span, per op. Each pointer points at one value (the
// span's channel, broadcast over the span) or, for the per-element variant,
// at n values aligned with the span.
//
// torch-compatible learnable fake quant (docs/spec.md §5a):
struct FqParams {
  const float* inv_scale = nullptr;   // 1/scale, computed in float32 like ATen
  const float* scale = nullptr;
  const float* zero_point = nullptr;  // rounded and clamped into [quant_min, quant_max]
  float quant_min = 0.f, quant_max = 0.f;
  float grad_factor = 1.f;  // multiplies each element's scale/zero-point term
};

// LSQ / LSQ+ (docs/spec.md §5b); its grad_factor multiplies the reduced sums instead.
struct LsqParams {
  const float* step = nullptr;    // clamped to >= kMinStep (fake_quant.h)
  const float* offset = nullptr;  // 0 without an offset
  float neg_qn = 0.f, qp = 0.f;   // the clamp range [-Qn, Qp]
};

// One contiguous span of n elements and the parameters P (FqParams or
// LsqParams) that apply to it. Backward accumulates each element's scale (§5a)
// / step (§5b) gradient term into acc_scale and its zero-point / offset term
// into acc_zero: 16 lanes (lane = index within the span mod 16) for the
// broadcast variant, n positions for the per-element one. Lanes make the sum
// order a fixed function of the span alone, whatever the vector width.
template <class P>
struct SpanArgs {
  const void* x = nullptr;
  const void* dy = nullptr;
  int64_t dy_stride = 1;  // backward: 1 = n contiguous values, 0 = one value for the whole span
  void* out = nullptr;    // y (forward) or dx (backward)
  int64_t n = 0;
  P params;
  float* acc_scale = nullptr;
  float* acc_zero = nullptr;
};

using FqSpanFn = void (*)(const SpanArgs<FqParams>&);
using LsqSpanFn = void (*)(const SpanArgs<LsqParams>&);

constexpr int kLanes = 16;

// One contiguous float32 row of the weighted KD loss (docs/spec.md §3,
// kd_row_impl.h, used by weighted_kd_cpu.cpp). w may be nullptr (weight 1).
struct KdRowArgs {
  const float* s = nullptr;
  const float* t = nullptr;
  const float* w = nullptr;
  int64_t n = 0;
  double* acc = nullptr;    // forward: kLanes lane sums; backward: n per-element sums of ell, or nullptr
  float scale = 1.f;        // backward: the upstream gradient, divided by numel for 'mean'
  float* out_s = nullptr;   // backward: dS row, or nullptr
  float* out_t = nullptr;   // backward: dT row, or nullptr
};
using KdRowFn = void (*)(const KdRowArgs&);

// [dtype][per_element]
struct KernelTable {
  FqSpanFn fq_fwd[3][2];
  FqSpanFn fq_bwd[3][2];
  LsqSpanFn lsq_fwd[3][2];
  LsqSpanFn lsq_bwd[3][2];
  KdRowFn kd_fwd[3];  // [kd_loss]: 0 l1, 1 l2, 2 charbonnier (image_rows.h Kind)
  KdRowFn kd_bwd[3];
  const char* isa;
};

// The table for the best instruction set this CPU supports (chosen once).
const KernelTable& kernels();

}  // namespace cpu
}  // namespace spark_ext
