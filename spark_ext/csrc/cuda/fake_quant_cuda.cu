// CUDA implementation of the fake-quantization ops (docs/spec.md §5a and §5b).
//
// Same decomposition as the CPU code (csrc/cpu/fake_quant_cpu.cpp), sized for
// a GPU, over the dense [outer, C, inner] view of x (fake_quant.h):
//
// * row mode (per tensor, or inner >= kPeriodInner): one block per chunk of
//   kChunk elements of one (outer, channel) row; the channel's parameters are
//   read once per thread from device memory (no host sync).
// * period mode (small inner stride: channels_last on axis 1, last axis):
//   rows of P' = m * C * inner elements (a whole number of channel periods, at
//   least one block wide); each thread owns one position of a column block and
//   walks kRowsPerGroup rows, so reads are coalesced and the channel of a
//   position is computed once.
//
// Backward reduces deterministically without float atomics: every block
// writes its per-chunk (row mode) or per-position (period mode) partial sums
// to a small fp32 buffer (about numel / 64 floats at most), then one block
// per channel sums that channel's partials in a fixed order (thread-strided,
// then a shared-memory tree) and applies the final scale. Results are a
// function of the shape alone.
//
// Every float operation uses the explicit round-to-nearest intrinsics
// (__fmul_rn, ...) so nvcc cannot fuse them into FMAs, except the one place
// where ATen's own kernel is fused (the §5a backward's zp + x * inv_scale):
// the forward is bitwise equal to the reference and to ATen in float32. All
// indices are 64-bit.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../fake_quant.h"
#include "../kernel_dtypes.h"

namespace spark_ext {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = kThreads * 16;  // elements per row-mode block
constexpr int64_t kPeriodInner = 512;      // inner stride below this: period mode
constexpr int64_t kRowsPerGroup = 64;      // period-mode rows per block

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <class T>
struct Tag {
  using type = T;
};

// float32 / float16 / bfloat16 only (check_inputs rejects the rest), so no
// float64 kernels are instantiated.
template <class F>
void dispatch_dtype(at::ScalarType dt, F&& f) {
  SPARK_DISPATCH_KERNEL_DTYPES(dt, "spark_ext", [&] { f(Tag<scalar_t>{}); });
}

// How a dense [outer, channels, inner] view is cut into thread blocks (the
// fields of the CPU file's LaunchPlan, one block per task): row mode cuts each
// (outer, channel) row into `row_chunks` chunks; period mode reads the flat
// tensor as `period_rows` rows of `period_row_len` elements (whole channel
// periods of `period_len` = channels * inner), kRowsPerGroup rows per block.
struct LaunchPlan {
  int64_t numel, outer, channels, inner;
  bool period_mode;
  int64_t row_chunks;                                                        // row mode
  int64_t period_len, period_row_len, period_rows, col_blocks, row_groups;  // period mode
  int64_t tasks;                                                             // thread blocks
  int64_t partials;  // backward: partial sums per gradient
};

LaunchPlan make_plan(const DenseView& v) {
  LaunchPlan g{};
  g.numel = v.x.numel();
  g.outer = v.outer;
  g.channels = v.channels;
  g.inner = v.inner;
  g.period_mode = g.channels > 1 && g.inner < kPeriodInner;
  if (!g.period_mode) {
    g.row_chunks = ceil_div(g.inner, kChunk);
    g.tasks = g.outer * g.channels * g.row_chunks;
    g.partials = g.tasks;
  } else {
    g.period_len = g.channels * g.inner;
    g.period_row_len = g.period_len * std::max<int64_t>(1, ceil_div(kThreads, g.period_len));
    g.period_rows = ceil_div(g.numel, g.period_row_len);
    g.col_blocks = ceil_div(g.period_row_len, kThreads);
    g.row_groups = ceil_div(g.period_rows, kRowsPerGroup);
    g.tasks = g.row_groups * g.col_blocks;
    g.partials = g.row_groups * g.period_row_len;
  }
  TORCH_CHECK(g.tasks < (int64_t(1) << 31), "spark_ext: tensor too large for one launch (", g.tasks, " blocks)");
  return g;
}

// Per-channel parameters as the kernels see them, derived on the device from
// the raw fp32 scale/step and zero-point/offset arrays.
struct ParamsDev {
  const float* p0;  // scale (§5a) or step (§5b)
  const float* p1;  // zero point (§5a) or offset (§5b; nullptr: 0)
  float lo, hi;     // quant_min/quant_max or -Qn/Qp
  float gf;         // §5a grad_factor (per element)
  float post;       // multiplies the reduced sums (§5b's g)
  bool per_tensor_backward_zp;  // §5a per tensor: ATen's backward uses trunc(clamp(zp + 0.5))
};

__device__ __forceinline__ float clampf_(float v, float lo, float hi) {
  v = v < lo ? lo : v;  // torch.clamp order; NaN passes through
  return v > hi ? hi : v;
}

// Each op's math: coeffs() derives a channel's coefficients once per thread,
// fwd / bwd apply them to one element. bwd writes dx and the element's scale
// (§5a) / step (§5b) term `dscale` and zero-point / offset term `dzero`.
struct FqDev {  // docs/spec.md §5a
  struct Coeffs {
    float inv_scale, scale, zero_point;  // zero point rounded and clamped into [lo, hi]
  };
  __device__ static Coeffs coeffs(const ParamsDev& p, int64_t ch, bool backward) {
    Coeffs k;
    k.scale = p.p0[ch];
    k.inv_scale = __fdiv_rn(1.0f, k.scale);
    const float z = p.p1[ch];
    // The CPU kernels raise ValueError for these; a device assert here (no host sync).
    CUDA_KERNEL_ASSERT_MSG(k.scale > 0.f && isfinite(k.scale) && isfinite(k.inv_scale),
                           "spark_ext: scale must be finite and > 0 everywhere, with a finite reciprocal");
    CUDA_KERNEL_ASSERT_MSG(!isnan(z), "spark_ext: zero_point must not be NaN");
    k.zero_point = (backward && p.per_tensor_backward_zp) ? truncf(clampf_(__fadd_rn(z, 0.5f), p.lo, p.hi))
                                                          : clampf_(rintf(z), p.lo, p.hi);
    return k;
  }
  __device__ static float fwd(const ParamsDev& p, float x, const Coeffs& k) {
    const float q = clampf_(__fadd_rn(rintf(__fmul_rn(x, k.inv_scale)), k.zero_point), p.lo, p.hi);
    return __fmul_rn(__fsub_rn(q, k.zero_point), k.scale);
  }
  __device__ static void bwd(const ParamsDev& p, float x, float dy, const Coeffs& k, float& dx, float& dscale,
                             float& dzero) {
    // ATen's nearbyint(zp + x * inv_scale), which nvcc contracts into an FMA.
    const float xq = rintf(__fmaf_rn(x, k.inv_scale, k.zero_point));
    const bool inside = (xq >= p.lo) && (xq <= p.hi);
    dx = __fmul_rn(dy, inside ? 1.f : 0.f);
    if (inside) {
      // ATen's xfq = (xq - zp) * scale; ... (xfq - x): nvcc contracts it into
      // one FMA, so (xq - zp) * scale - x is rounded once.
      const float xfq_minus_x = __fmaf_rn(__fsub_rn(clampf_(xq, p.lo, p.hi), k.zero_point), k.scale, -x);
      dscale = __fmul_rn(__fmul_rn(__fmul_rn(dy, xfq_minus_x), k.inv_scale), p.gf);
      dzero = 0.f;
    } else {
      dscale = __fmul_rn(__fmul_rn(dy, xq < p.lo ? __fsub_rn(p.lo, k.zero_point) : __fsub_rn(p.hi, k.zero_point)),
                         p.gf);
      dzero = __fmul_rn(__fmul_rn(__fmul_rn(dy, -1.f), k.scale), p.gf);
    }
  }
};

struct LsqDev {  // docs/spec.md §5b
  struct Coeffs {
    float step, offset;  // step clamped to >= kMinStep; offset 0 without one
  };
  __device__ static Coeffs coeffs(const ParamsDev& p, int64_t ch, bool) {
    const float step = p.p0[ch], offset = p.p1 ? p.p1[ch] : 0.f;
    CUDA_KERNEL_ASSERT_MSG(step > 0.f && isfinite(step), "spark_ext: step must be finite and > 0 everywhere");
    CUDA_KERNEL_ASSERT_MSG(isfinite(offset), "spark_ext: offset must be finite everywhere");
    return {fmaxf(step, kMinStep), offset};
  }
  __device__ static float fwd(const ParamsDev& p, float x, const Coeffs& k) {
    const float v = __fdiv_rn(__fsub_rn(x, k.offset), k.step);
    const float q = rintf(clampf_(v, p.lo, p.hi));
    return __fadd_rn(__fmul_rn(q, k.step), k.offset);
  }
  __device__ static void bwd(const ParamsDev& p, float x, float dy, const Coeffs& k, float& dx, float& dstep,
                             float& doffset) {
    const float v = __fdiv_rn(__fsub_rn(x, k.offset), k.step);
    const float q = rintf(clampf_(v, p.lo, p.hi));
    const bool inside = (v >= p.lo) && (v <= p.hi);
    dx = __fmul_rn(dy, inside ? 1.f : 0.f);
    dstep = __fmul_rn(dy, inside ? __fsub_rn(q, v) : (v < p.lo ? p.lo : p.hi));
    doffset = __fmul_rn(dy, inside ? 0.f : 1.f);
  }
};

__device__ __forceinline__ void block_sum2(float& s, float& z, float* sh_s, float* sh_z) {
  // Fixed-shape shared-memory tree: the same order on every run.
  const int t = threadIdx.x;
  sh_s[t] = s;
  sh_z[t] = z;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w >>= 1) {
    if (t < w) {
      sh_s[t] = __fadd_rn(sh_s[t], sh_s[t + w]);
      sh_z[t] = __fadd_rn(sh_z[t], sh_z[t + w]);
    }
    __syncthreads();
  }
  s = sh_s[0];
  z = sh_z[0];
}

// Element i: the forward writes y; the backward writes dx and adds the
// scale/step and zero-point/offset terms to the thread's running sums.
template <class M, class T, bool kBackward>
__device__ __forceinline__ void element(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ out,
                                        int64_t i, const ParamsDev& p, const typename M::Coeffs& coeffs,
                                        float& acc_s, float& acc_z) {
  const float xi = static_cast<float>(x[i]);
  if constexpr (kBackward) {
    float d, s, z;
    M::bwd(p, xi, static_cast<float>(dy[i]), coeffs, d, s, z);
    out[i] = static_cast<T>(d);
    acc_s = __fadd_rn(acc_s, s);
    acc_z = __fadd_rn(acc_z, z);
  } else {
    out[i] = static_cast<T>(M::fwd(p, xi, coeffs));
  }
}

// Row mode: block b = (row, chunk); row = o * C + c.
template <class M, class T, bool kBackward>
__global__ void __launch_bounds__(kThreads) row_kernel(const T* __restrict__ x, const T* __restrict__ dy,
                                                       T* __restrict__ out, float* __restrict__ part_s,
                                                       float* __restrict__ part_z, LaunchPlan g, ParamsDev p) {
  const int64_t b = blockIdx.x;
  const int64_t row = b / g.row_chunks, k = b % g.row_chunks, ch = row % g.channels;
  const int64_t begin = row * g.inner + k * kChunk;
  const int64_t end = row * g.inner + std::min(g.inner, (k + 1) * kChunk);
  const typename M::Coeffs coeffs = M::coeffs(p, ch, kBackward);
  float acc_s = 0.f, acc_z = 0.f;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    element<M, T, kBackward>(x, dy, out, i, p, coeffs, acc_s, acc_z);
  }
  if constexpr (kBackward) {
    __shared__ float sh_s[kThreads], sh_z[kThreads];
    block_sum2(acc_s, acc_z, sh_s, sh_z);
    if (threadIdx.x == 0) {
      part_s[b] = acc_s;
      part_z[b] = acc_z;
    }
  }
}

// Period mode: block b = (row group, column block); thread = one position.
template <class M, class T, bool kBackward>
__global__ void __launch_bounds__(kThreads) period_kernel(const T* __restrict__ x, const T* __restrict__ dy,
                                                          T* __restrict__ out, float* __restrict__ part_s,
                                                          float* __restrict__ part_z, LaunchPlan g, ParamsDev p) {
  const int64_t b = blockIdx.x;
  const int64_t grp = b / g.col_blocks;
  const int64_t col = (b % g.col_blocks) * kThreads + threadIdx.x;
  if (col >= g.period_row_len) return;
  const int64_t ch = (col % g.period_len) / g.inner;
  const typename M::Coeffs coeffs = M::coeffs(p, ch, kBackward);
  float acc_s = 0.f, acc_z = 0.f;
  const int64_t r1 = std::min(g.period_rows, (grp + 1) * kRowsPerGroup);
  for (int64_t r = grp * kRowsPerGroup; r < r1; ++r) {
    const int64_t i = r * g.period_row_len + col;
    if (i >= g.numel) break;  // only the last row can be short
    element<M, T, kBackward>(x, dy, out, i, p, coeffs, acc_s, acc_z);
  }
  if constexpr (kBackward) {
    part_s[grp * g.period_row_len + col] = acc_s;
    part_z[grp * g.period_row_len + col] = acc_z;
  }
}

// Stage 2: block c sums channel c's partials in a fixed order.
__global__ void __launch_bounds__(kThreads) reduce_kernel(const float* __restrict__ part_s,
                                                          const float* __restrict__ part_z, float* __restrict__ sum_s,
                                                          float* __restrict__ sum_z, LaunchPlan g, float post) {
  const int64_t c = blockIdx.x;
  int64_t items;
  if (!g.period_mode) {
    items = g.outer * g.row_chunks;
  } else {
    items = g.row_groups * (g.period_row_len / g.period_len) * g.inner;
  }
  float s = 0.f, z = 0.f;
  for (int64_t t = threadIdx.x; t < items; t += kThreads) {
    int64_t idx;
    if (!g.period_mode) {
      const int64_t o = t / g.row_chunks, k = t % g.row_chunks;
      idx = (o * g.channels + c) * g.row_chunks + k;
    } else {
      const int64_t i = t % g.inner, rest = t / g.inner;
      const int64_t m = g.period_row_len / g.period_len;
      const int64_t r = rest % m, grp = rest / m;
      idx = grp * g.period_row_len + r * g.period_len + c * g.inner + i;
    }
    s = __fadd_rn(s, part_s[idx]);
    z = __fadd_rn(z, part_z[idx]);
  }
  __shared__ float sh_s[kThreads], sh_z[kThreads];
  block_sum2(s, z, sh_s, sh_z);
  if (threadIdx.x == 0) {
    sum_s[c] = __fmul_rn(post, s);
    sum_z[c] = __fmul_rn(post, z);
  }
}

template <class M>
at::Tensor forward_impl(const at::Tensor& x, const at::Tensor& p0, const c10::optional<at::Tensor>& p1,
                        c10::optional<int64_t> axis, ParamsDev pd) {
  const c10::cuda::CUDAGuard guard(x.device());
  DenseView v = dense_view(x, axis);
  at::Tensor y = at::empty_like(v.x);
  if (v.x.numel() == 0) return y;
  const LaunchPlan g = make_plan(v);
  at::Tensor f0 = p0.to(at::kFloat).contiguous();
  at::Tensor f1 = p1.has_value() ? p1->to(at::kFloat).contiguous() : at::Tensor();
  pd.p0 = f0.data_ptr<float>();
  pd.p1 = f1.defined() ? f1.data_ptr<float>() : nullptr;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(v.x.scalar_type(), [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    const scalar_t* xp = v.x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    if (g.period_mode) {
      period_kernel<M, scalar_t, false><<<g.tasks, kThreads, 0, stream>>>(xp, nullptr, yp, nullptr, nullptr, g, pd);
    } else {
      row_kernel<M, scalar_t, false><<<g.tasks, kThreads, 0, stream>>>(xp, nullptr, yp, nullptr, nullptr, g, pd);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

template <class M>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(const at::Tensor& dy, const at::Tensor& x,
                                                             const at::Tensor& p0,
                                                             const c10::optional<at::Tensor>& p1,
                                                             const at::Tensor& out_like1,
                                                             c10::optional<int64_t> axis, ParamsDev pd) {
  const c10::cuda::CUDAGuard guard(x.device());
  DenseView v = dense_view(x, axis);
  at::Tensor gy = match_layout(dy, v.x);
  at::Tensor dx = at::empty_like(v.x);
  if (v.x.numel() == 0) return {dx, at::zeros_like(p0), at::zeros_like(out_like1)};
  const LaunchPlan g = make_plan(v);
  at::Tensor f0 = p0.to(at::kFloat).contiguous();
  at::Tensor f1 = p1.has_value() ? p1->to(at::kFloat).contiguous() : at::Tensor();
  pd.p0 = f0.data_ptr<float>();
  pd.p1 = f1.defined() ? f1.data_ptr<float>() : nullptr;
  auto f32 = x.options().dtype(at::kFloat);
  at::Tensor part = at::empty({2, g.partials}, f32);
  at::Tensor sums = at::empty({2, g.channels}, f32);
  float* ps = part.data_ptr<float>();
  float* pz = ps + g.partials;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(v.x.scalar_type(), [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    const scalar_t* xp = v.x.data_ptr<scalar_t>();
    const scalar_t* dyp = gy.data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    if (g.period_mode) {
      period_kernel<M, scalar_t, true><<<g.tasks, kThreads, 0, stream>>>(xp, dyp, dxp, ps, pz, g, pd);
    } else {
      row_kernel<M, scalar_t, true><<<g.tasks, kThreads, 0, stream>>>(xp, dyp, dxp, ps, pz, g, pd);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  float* ss = sums.data_ptr<float>();
  reduce_kernel<<<g.channels, kThreads, 0, stream>>>(ps, pz, ss, ss + g.channels, g, pd.post);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dx, sums[0].to(p0.scalar_type()).reshape(p0.sizes()),
          sums[1].to(out_like1.scalar_type()).reshape(out_like1.sizes())};
}

ParamsDev fq_params(int64_t lo, int64_t hi, double grad_factor, bool per_tensor) {
  ParamsDev p{};
  p.lo = float(lo);
  p.hi = float(hi);
  p.gf = float(grad_factor);
  p.post = 1.f;
  p.per_tensor_backward_zp = per_tensor;
  return p;
}

ParamsDev lsq_params(int64_t qn, int64_t qp, double grad_factor) {
  ParamsDev p{};
  p.lo = -float(qn);
  p.hi = float(qp);
  p.gf = 1.f;
  p.post = float(grad_factor);
  return p;
}

at::Tensor fq_forward_cuda(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                           c10::optional<int64_t> axis, int64_t quant_min, int64_t quant_max, double grad_factor) {
  check_inputs("fake_quantize_learnable", Semantics::kTorchCompat, x, scale, &zero_point, axis, quant_min,
               quant_max, grad_factor);
  return forward_impl<FqDev>(x, scale, zero_point, axis, fq_params(quant_min, quant_max, grad_factor, false));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fq_backward_cuda(const at::Tensor& dy, const at::Tensor& x,
                                                                const at::Tensor& scale,
                                                                const at::Tensor& zero_point,
                                                                c10::optional<int64_t> axis, int64_t quant_min,
                                                                int64_t quant_max, double grad_factor) {
  check_inputs("fake_quantize_learnable_backward", Semantics::kTorchCompat, x, scale, &zero_point, axis,
               quant_min, quant_max, grad_factor);
  return backward_impl<FqDev>(dy, x, scale, zero_point, zero_point, axis,
                              fq_params(quant_min, quant_max, grad_factor, !axis.has_value()));
}

at::Tensor lsq_forward_cuda(const at::Tensor& x, const at::Tensor& step, const c10::optional<at::Tensor>& offset,
                            c10::optional<int64_t> axis, int64_t qn, int64_t qp, double grad_factor) {
  check_inputs("lsq_fake_quant", Semantics::kLsq, x, step, offset.has_value() ? &*offset : nullptr, axis, -qn, qp,
               grad_factor);
  return forward_impl<LsqDev>(x, step, offset, axis, lsq_params(qn, qp, grad_factor));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lsq_backward_cuda(const at::Tensor& dy, const at::Tensor& x,
                                                                 const at::Tensor& step,
                                                                 const c10::optional<at::Tensor>& offset,
                                                                 c10::optional<int64_t> axis, int64_t qn, int64_t qp,
                                                                 double grad_factor) {
  check_inputs("lsq_fake_quant_backward", Semantics::kLsq, x, step, offset.has_value() ? &*offset : nullptr, axis, -qn, qp,
               grad_factor);
  // The offset gradient takes the offset's dtype and shape (step's without one).
  return backward_impl<LsqDev>(dy, x, step, offset, offset.has_value() ? *offset : step, axis,
                               lsq_params(qn, qp, grad_factor));
}

}  // namespace
}  // namespace spark_ext

TORCH_LIBRARY_IMPL(spark_ext, CUDA, m) {
  m.impl("fake_quantize_learnable", &spark_ext::fq_forward_cuda);
  m.impl("fake_quantize_learnable_backward", &spark_ext::fq_backward_cuda);
  m.impl("lsq_fake_quant", &spark_ext::lsq_forward_cuda);
  m.impl("lsq_fake_quant_backward", &spark_ext::lsq_backward_cuda);
}
