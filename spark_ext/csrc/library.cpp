// The spark_ext library's namespace (one TORCH_LIBRARY, with this library's
// own ops build_info and cpu_threads_used; cpu/huge_page_allocator.cpp adds its
// ops with a fragment) and the host-side helpers shared by the CPU and CUDA
// fake-quant implementations.
//
// The kernel ops' schemas are written once, in Python (SCHEMAS in
// spark_ext/ops/<family>.py, defined at `import spark_ext`, because the
// Triton ops share them and must exist without this library); each kernel
// file registers its kernels for them with TORCH_LIBRARY_IMPL. Ops (all
// differentiable through the C++ Autograd kernels of autograd.cpp):
//   fake_quantize_learnable / _backward       docs/spec.md §5a, torch-compatible   cpu/fake_quant_cpu.cpp, cuda/
//   lsq_fake_quant / _backward                docs/spec.md §5b, LSQ / LSQ+          cpu/fake_quant_cpu.cpp, cuda/
//   difficulty_signals / cell_kd / cell_kd_backward  docs/spec.md §2 (CPU only)    cpu/difficulty_cpu.cpp
//   fused_weighted_kd / _backward             docs/spec.md §3, no or per-pixel weight (CPU only)  cpu/weighted_kd_cpu.cpp
//   build_info                                "torch=<ver>;cuda=<0|1>;cpu_isa=<isa>;openmp=<0|1>" (here)
//   cpu_threads_used                          test-only: threads that ran CPU kernel tasks (here, cpu/parallel.h)
//   huge_page_threshold                       outputs this large get huge pages (doctor)  cpu/huge_page_allocator.cpp
//   set_huge_page_threshold / huge_page_allocations  test-only: change it / count huge-page outputs (same file)
//   huge_page_cache_bytes / _limit, set_huge_page_cache_limit, empty_huge_page_cache  the freed-block cache (same file)
// `axis = None` means per tensor. The backward ops return (dx, d_scale_or_step,
// d_zero_point_or_offset), each in its parameter's dtype and shape; the LSQ
// backward returns an offset gradient shaped like step even without an offset
// (callers drop it).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <sstream>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "cpu/parallel.h"
#include "cpu/span_kernels.h"
#include "fake_quant.h"

// The build passes -DSPARK_EXT_TORCH_VERSION=2.13.0+cpu (no quotes: they do
// not survive both setuptools' and ninja's command lines alike).
#define SPARK_STR2(x) #x
#define SPARK_STR(x) SPARK_STR2(x)
#ifdef SPARK_EXT_TORCH_VERSION
#define SPARK_TORCH_VERSION_STR SPARK_STR(SPARK_EXT_TORCH_VERSION)
#else
#define SPARK_TORCH_VERSION_STR "unknown"
#endif
#ifndef SPARK_EXT_WITH_CUDA
#define SPARK_EXT_WITH_CUDA 0
#endif

namespace spark_ext {

int64_t normalize_axis(c10::optional<int64_t> axis, int64_t dim) {
  TORCH_CHECK(axis.has_value(), "internal: normalize_axis without an axis");
  const int64_t a = *axis;
  TORCH_CHECK_VALUE(dim > 0 && a >= -dim && a < dim, "axis must be in [", -dim, ", ", dim, ") for a ", dim,
                    "-D input, got ", a);
  return a < 0 ? a + dim : a;
}

DenseView dense_view(const at::Tensor& x, c10::optional<int64_t> axis) {
  DenseView v;
  // A copy only for layouts with gaps or overlaps; empty_like keeps the
  // memory format (contiguous / channels_last) such a tensor suggests.
  v.x = x.is_non_overlapping_and_dense() ? x : at::empty_like(x).copy_(x);
  const int64_t n = v.x.numel();
  v.inner = n;
  if (!axis.has_value() || n == 0) return v;
  const int64_t a = normalize_axis(axis, x.dim());
  const int64_t c = v.x.size(a);
  if (c == 1) return v;  // one channel: the whole tensor shares it
  v.channels = c;
  v.inner = v.x.stride(a);
  v.outer = n / (c * v.inner);
  TORCH_CHECK(v.outer * c * v.inner == n, "internal: bad dense layout for strides ", v.x.strides());
  return v;
}

at::Tensor match_layout(const at::Tensor& dy, const at::Tensor& like) {
  TORCH_CHECK_VALUE(dy.sizes() == like.sizes(), "grad must have x's shape ", like.sizes(), ", got ", dy.sizes());
  if (dy.dtype() == like.dtype() && dy.strides() == like.strides()) return dy;
  return at::empty_like(like).copy_(dy);
}

void check_inputs(const char* op, Semantics semantics, const at::Tensor& x, const at::Tensor& p0,
                  const at::Tensor* p1, c10::optional<int64_t> axis, int64_t lo, int64_t hi, double grad_factor) {
  const auto dt = x.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
                   ": x must be float32, float16 or bfloat16, got ", dt);
  const int64_t expected = axis.has_value() ? x.size(normalize_axis(axis, x.dim())) : 1;
  for (const at::Tensor* p : {&p0, p1}) {
    if (p == nullptr) continue;
    // Like torch, the torch-compatible op takes an integer zero point (which has no gradient).
    const bool int_ok = semantics == Semantics::kTorchCompat && p == p1 && at::isIntegralType(p->scalar_type(), false);
    TORCH_CHECK_TYPE(p->is_floating_point() || int_ok, op, ": scale/step and zero_point/offset must be floating, got ",
                     p->scalar_type());
    TORCH_CHECK_VALUE(p->numel() == expected && p->dim() <= 1, op, ": parameters must hold ", expected,
                      " values (1-D), got shape ", p->sizes());
    TORCH_CHECK_VALUE(p->device() == x.device(), op, ": parameters must be on x's device ", x.device(), ", got ",
                      p->device());
  }
  // The kernels round with the 1.5 * 2^23 trick (exact for |v| <= 2^22).
  constexpr int64_t kMaxRange = int64_t(1) << 21;
  TORCH_CHECK_VALUE(lo <= 0 && 0 <= hi && lo >= -kMaxRange && hi <= kMaxRange, op,
                    ": need -2^21 <= quant_min <= 0 <= quant_max <= 2^21, got [", lo, ", ", hi, "]");
  TORCH_CHECK_VALUE(std::isfinite(grad_factor), "grad_factor must be finite, got ", grad_factor);
}

std::string first_values(const float* v, int64_t n) {
  std::ostringstream out;
  out << '[';
  for (int64_t i = 0; i < std::min<int64_t>(n, 8); ++i) out << (i ? ", " : "") << v[i];
  out << (n > 8 ? ", ...]" : "]");
  return out.str();
}

// openmp=1: compiled with OpenMP, so at::parallel_for spreads the CPU kernels
// over torch's intra-op threads (torch's own backend being OpenMP).
#ifdef _OPENMP
#define SPARK_OPENMP "1"
#else
#define SPARK_OPENMP "0"
#endif

static std::string build_info() {
  return std::string("torch=") + SPARK_TORCH_VERSION_STR + ";cuda=" + (SPARK_EXT_WITH_CUDA ? "1" : "0") +
         ";cpu_isa=" + cpu::kernels().isa + ";openmp=" + SPARK_OPENMP;
}

namespace cpu {
namespace {
struct ThreadRecord {
  std::mutex mutex;
  std::vector<std::thread::id> ids;
};
ThreadRecord& thread_record() {
  static ThreadRecord record;
  return record;
}
}  // namespace

void note_thread() {
  const std::thread::id id = std::this_thread::get_id();
  ThreadRecord& r = thread_record();
  std::lock_guard<std::mutex> lock(r.mutex);
  if (std::find(r.ids.begin(), r.ids.end(), id) == r.ids.end()) r.ids.push_back(id);
}

int64_t take_threads_used() {
  ThreadRecord& r = thread_record();
  std::lock_guard<std::mutex> lock(r.mutex);
  const int64_t n = static_cast<int64_t>(r.ids.size());
  r.ids.clear();
  return n;
}
}  // namespace cpu

}  // namespace spark_ext

TORCH_LIBRARY(spark_ext, m) {
  m.def("build_info() -> str", &spark_ext::build_info);
  m.def("cpu_threads_used() -> int", &spark_ext::cpu::take_threads_used);
}
