// CPU implementation of the fake-quantization ops (docs/spec.md §5a and §5b).
//
// The input is viewed as its dense storage [outer, C, inner] (fake_quant.h)
// and cut into tasks whose boundaries depend only on the shape, never on the
// thread count, so every result, gradient sums included, is bitwise
// reproducible whatever at::parallel_for does (cpu/parallel.h):
//
// * row mode (per tensor, or inner >= kPeriodInner): each (outer, channel) row
//   of `inner` elements is split into chunks of kChunk; a task runs one chunk
//   with the channel's parameters broadcast, and its backward writes one
//   partial sum per chunk (16 lanes folded in a fixed tree).
// * period mode (per channel with a small inner stride, e.g. channels_last
//   on axis 1 or the last axis): the storage is rows of P' = m * C * inner
//   elements (a whole number of channel periods, at least 256 wide) whose
//   parameters are laid out once per position; a task runs a group of rows
//   over a column block, accumulates per position, then folds the positions
//   into one partial per channel.
//
// A second stage sums each channel's partials pairwise in index order. The
// partial buffers hold about numel / 64 floats at most; there is no other
// temporary besides the outputs (and the documented copy of an x with gaps,
// fake_quant.h). The gradient is read in place whatever its strides (GradReader).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "../fake_quant.h"
#include "huge_page_allocator.h"
#include "parallel.h"
#include "span_kernels.h"

namespace spark_ext {
namespace {

constexpr int64_t kChunk = 16384;      // elements per row-mode task
constexpr int64_t kPeriodInner = 64;   // per-channel inner stride below this: period mode
constexpr int64_t kPeriodWidth = 256;  // minimum width of a period-mode row

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// How a dense [outer, channels, inner] view is cut into tasks (the CUDA file
// has the same struct: one thread block per task there). Row mode: each
// (outer, channel) row of `inner` elements is cut into `row_chunks` chunks of
// at most kChunk. Period mode (many channels, small inner stride): the flat
// tensor is read as rows of `period_row_len` elements, a whole number of
// channel periods (`period_len` = channels * inner), so every column has one
// channel; a task covers `rows_per_task` rows of one block of `block_cols`
// columns.
struct LaunchPlan {
  int64_t numel = 0, outer = 1, channels = 1, inner = 0;
  bool period_mode = false;
  int64_t tasks = 0;
  // row mode
  int64_t row_chunks = 1;
  // period mode
  int64_t period_len = 0, period_row_len = 0, period_rows = 0;
  int64_t block_cols = 0, col_blocks = 1, rows_per_task = 1, row_groups = 0;
};

LaunchPlan make_plan(const DenseView& v) {
  LaunchPlan p;
  p.numel = v.x.numel();
  p.outer = v.outer;
  p.channels = v.channels;
  p.inner = v.inner;
  p.period_mode = p.channels > 1 && p.inner < kPeriodInner;
  if (!p.period_mode) {
    p.row_chunks = ceil_div(p.inner, kChunk);
    p.tasks = p.outer * p.channels * p.row_chunks;
  } else {
    p.period_len = p.channels * p.inner;
    p.period_row_len = p.period_len * std::max<int64_t>(1, ceil_div(kPeriodWidth, p.period_len));
    p.period_rows = ceil_div(p.numel, p.period_row_len);
    p.block_cols = p.inner * std::max<int64_t>(1, kChunk / p.inner);  // whole channels per column block
    p.col_blocks = ceil_div(p.period_row_len, p.block_cols);
    p.rows_per_task = std::max<int64_t>(1, kChunk / std::min(p.period_row_len, p.block_cols));
    p.row_groups = ceil_div(p.period_rows, p.rows_per_task);
    p.tasks = p.row_groups * p.col_blocks;
  }
  return p;
}

// Per-channel parameters of each op (vectors of length C, expanded to one
// value per period position in period mode). at(pos) points the kernels'
// parameters (span_kernels.h) at channel / position pos; sum_factor multiplies
// the reduced sums.
struct FqChannelParams {
  using Span = cpu::SpanArgs<cpu::FqParams>;
  std::vector<float> inv_scale, scale, zero_point;
  float quant_min = 0.f, quant_max = 0.f, grad_factor = 1.f;
  float sum_factor = 1.f;  // §5a applies grad_factor per element
  cpu::FqParams at(int64_t pos) const {
    return {inv_scale.data() + pos, scale.data() + pos, zero_point.data() + pos, quant_min, quant_max, grad_factor};
  }
};

struct LsqChannelParams {
  using Span = cpu::SpanArgs<cpu::LsqParams>;
  std::vector<float> step, offset;
  float neg_qn = 0.f, qp = 0.f;
  float sum_factor = 1.f;  // §5b's grad_factor
  cpu::LsqParams at(int64_t pos) const { return {step.data() + pos, offset.data() + pos, neg_qn, qp}; }
};

void expand(std::vector<float>& v, const LaunchPlan& p) {
  if (!p.period_mode) return;
  std::vector<float> e(p.period_row_len);
  for (int64_t j = 0; j < p.period_row_len; ++j) e[j] = v[(j % p.period_len) / p.inner];
  v.swap(e);
}

cpu::DType dtype_code(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return cpu::kF32;
    case at::kHalf: return cpu::kF16;
    case at::kBFloat16: return cpu::kBF16;
    default: TORCH_CHECK_TYPE(false, "spark_ext: unsupported dtype ", x.scalar_type());
  }
}

float pairwise_sum(const float* v, int64_t n) {
  if (n <= 8) {
    float s = 0.f;
    for (int64_t i = 0; i < n; ++i) s += v[i];
    return s;
  }
  const int64_t h = n / 2;
  return pairwise_sum(v, h) + pairwise_sum(v + h, n - h);
}

// Row mode: task t is chunk k of row (o, c). Sets the span length and the
// channel's parameters in g; returns the index of the span's first element.
template <class Q>
int64_t row_task(const LaunchPlan& p, const Q& q, int64_t t, typename Q::Span& g) {
  const int64_t row = t / p.row_chunks, k = t % p.row_chunks, c = row % p.channels;
  g.n = std::min(kChunk, p.inner - k * kChunk);
  g.params = q.at(c);
  return row * p.inner + k * kChunk;
}

// Period mode: task t covers the column block [col0, col1) of the rows of
// group grp.
struct PeriodTask {
  int64_t grp, col0, col1;
};

PeriodTask period_task(const LaunchPlan& p, int64_t t) {
  const int64_t col0 = (t % p.col_blocks) * p.block_cols;
  return {t / p.col_blocks, col0, std::min(p.period_row_len, col0 + p.block_cols)};
}

// Points g's parameters at the task's first position and calls
// f(first element, length) for each of its row spans, in row order.
template <class Q, class F>
void for_each_period_span(const LaunchPlan& p, const Q& q, const PeriodTask& k, typename Q::Span& g, F&& f) {
  g.params = q.at(k.col0);
  for (int64_t r = k.grp * p.rows_per_task; r < std::min(p.period_rows, (k.grp + 1) * p.rows_per_task); ++r) {
    const int64_t row0 = r * p.period_row_len, len = std::min(k.col1, p.numel - row0) - k.col0;
    if (len > 0) f(row0 + k.col0, len);
  }
}

// dy read where it lies, without a copy (a gradient may have any strides:
// the broadcast ones of y.sum(), x's own, or another layout). offset(o) maps
// an element's offset o in x's dense storage to dy's element offset; dy is
// linear in o, with step `step`, within each aligned run of `run` storage
// elements (run = numel when dy has x's strides or broadcasts one value). A
// span inside one run with step 0 or 1 goes to the kernels as is; any other
// span is first gathered, run piece by run piece, into its task's buffer of
// kChunk elements (cache-resident). Either way the kernels see the same
// values, so the results do not depend on dy's layout.
struct GradReader {
  at::Tensor dy;  // keeps a dtype-converted gradient alive
  const char* base = nullptr;
  int64_t es = 4;
  bool same_layout = true;  // offset(o) == o
  int64_t run = 1, step = 1;
  std::vector<int64_t> size, xs, ds;  // x's dims of size > 1, outer to inner (x's strides, dy's strides)

  int64_t offset(int64_t o) const {
    if (same_layout) return o;
    int64_t off = 0;
    for (size_t d = 0; d < size.size(); ++d) off += ((o / xs[d]) % size[d]) * ds[d];
    return off;
  }

  // Points g.dy / g.dy_stride at the dy values of the x storage span [start, start + n).
  template <class Span>
  void point(Span& g, int64_t start, int64_t n, std::vector<char>& buf) const {
    if (start / run == (start + n - 1) / run && (step == 0 || step == 1)) {
      g.dy = base + offset(start) * es;
      g.dy_stride = step;
      return;
    }
    TORCH_CHECK(n <= kChunk, "internal: span of ", n, " elements is longer than a task buffer");
    if (buf.empty()) buf.resize(kChunk * es);
    for (int64_t o = start; o < start + n;) {
      const int64_t end = std::min(start + n, (o / run + 1) * run);
      const char* src = base + offset(o) * es;
      char* dst = buf.data() + (o - start) * es;
      for (int64_t i = 0; i < end - o; ++i) std::memcpy(dst + i * es, src + i * step * es, es);
      o = end;
    }
    g.dy = buf.data();
    g.dy_stride = 1;
  }
};

GradReader grad_reader(const at::Tensor& dy_in, const at::Tensor& x) {
  TORCH_CHECK_VALUE(dy_in.sizes() == x.sizes(), "grad must have x's shape ", x.sizes(), ", got ", dy_in.sizes());
  // Another dtype (only possible through a direct op call) is converted first.
  GradReader r;
  r.dy = dy_in.scalar_type() == x.scalar_type() ? dy_in : dy_in.to(x.scalar_type());
  const at::Tensor& dy = r.dy;
  r.base = static_cast<const char*>(dy.data_ptr());
  r.es = x.element_size();
  r.run = std::max<int64_t>(1, x.numel());
  if (dy.strides() == x.strides()) return r;
  r.same_layout = false;
  std::vector<int64_t> dims;
  for (int64_t d = 0; d < x.dim(); ++d) {
    if (x.size(d) > 1) dims.push_back(d);
  }
  std::sort(dims.begin(), dims.end(), [&](int64_t a, int64_t b) { return x.stride(a) > x.stride(b); });
  for (int64_t d : dims) {
    r.size.push_back(x.size(d));
    r.xs.push_back(x.stride(d));
    r.ds.push_back(dy.stride(d));
  }
  if (dims.empty()) return r;  // one element
  // Grow the innermost run outwards while dy stays linear in the storage offset.
  const size_t last = dims.size() - 1;
  r.step = r.ds[last];
  r.run = r.size[last];
  for (size_t d = last; d-- > 0;) {
    if (r.ds[d] != r.step * r.run) break;
    r.run *= r.size[d];
  }
  return r;
}

template <class Q>
void run_forward(const LaunchPlan& p, const Q& q, void (*const fns[2])(const typename Q::Span&), const at::Tensor& x,
                 at::Tensor& y) {
  const char* xp = static_cast<const char*>(x.data_ptr());
  char* yp = static_cast<char*>(y.data_ptr());
  const int64_t es = x.element_size();
  if (!p.period_mode) {
    const int64_t grain = std::max<int64_t>(1, kChunk / std::min(p.inner, kChunk));
    cpu::parallel_tasks(0, p.tasks, grain, [&](int64_t t0, int64_t t1) {
      typename Q::Span g;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t start = row_task(p, q, t, g);
        g.x = xp + start * es;
        g.out = yp + start * es;
        fns[0](g);
      }
    });
    return;
  }
  cpu::parallel_tasks(0, p.tasks, 1, [&](int64_t t0, int64_t t1) {
    typename Q::Span g;
    for (int64_t t = t0; t < t1; ++t) {
      for_each_period_span(p, q, period_task(p, t), g, [&](int64_t start, int64_t len) {
        g.n = len;
        g.x = xp + start * es;
        g.out = yp + start * es;
        fns[1](g);
      });
    }
  });
}

// Returns the fp32 sums [C] of the step/scale and offset/zero-point terms.
template <class Q>
std::pair<at::Tensor, at::Tensor> run_backward(const LaunchPlan& p, const Q& q,
                                               void (*const fns[2])(const typename Q::Span&), const at::Tensor& x,
                                               const GradReader& dy, at::Tensor& dx) {
  const char* xp = static_cast<const char*>(x.data_ptr());
  char* dxp = static_cast<char*>(dx.data_ptr());
  const int64_t es = x.element_size();
  auto f32 = x.options().dtype(at::kFloat);
  at::Tensor sum_s = at::empty({p.channels}, f32), sum_z = at::empty({p.channels}, f32);
  float* ss = sum_s.data_ptr<float>();
  float* sz = sum_z.data_ptr<float>();
  if (!p.period_mode) {
    std::vector<float> part_s(p.tasks), part_z(p.tasks);
    const int64_t grain = std::max<int64_t>(1, kChunk / std::min(p.inner, kChunk));
    cpu::parallel_tasks(0, p.tasks, grain, [&](int64_t t0, int64_t t1) {
      typename Q::Span g;
      std::vector<char> dy_buf;
      float acc_s[cpu::kLanes], acc_z[cpu::kLanes];
      g.acc_scale = acc_s;
      g.acc_zero = acc_z;
      for (int64_t t = t0; t < t1; ++t) {
        std::fill(acc_s, acc_s + cpu::kLanes, 0.f);
        std::fill(acc_z, acc_z + cpu::kLanes, 0.f);
        const int64_t start = row_task(p, q, t, g);
        g.x = xp + start * es;
        dy.point(g, start, g.n, dy_buf);
        g.out = dxp + start * es;
        fns[0](g);
        part_s[t] = pairwise_sum(acc_s, cpu::kLanes);
        part_z[t] = pairwise_sum(acc_z, cpu::kLanes);
      }
    });
    // Stage 2: channel c owns partials (o * channels + c) * row_chunks + k, summed in (o, k) order.
    cpu::parallel_tasks(0, p.channels, 1, [&](int64_t c0, int64_t c1) {
      std::vector<float> vs(p.outer * p.row_chunks), vz(p.outer * p.row_chunks);
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t o = 0; o < p.outer; ++o) {
          const int64_t base = (o * p.channels + c) * p.row_chunks;
          std::copy(part_s.begin() + base, part_s.begin() + base + p.row_chunks, vs.begin() + o * p.row_chunks);
          std::copy(part_z.begin() + base, part_z.begin() + base + p.row_chunks, vz.begin() + o * p.row_chunks);
        }
        ss[c] = q.sum_factor * pairwise_sum(vs.data(), int64_t(vs.size()));
        sz[c] = q.sum_factor * pairwise_sum(vz.data(), int64_t(vz.size()));
      }
    });
    return {sum_s, sum_z};
  }
  std::vector<float> part_s(p.row_groups * p.channels, 0.f), part_z(p.row_groups * p.channels, 0.f);
  cpu::parallel_tasks(0, p.tasks, 1, [&](int64_t t0, int64_t t1) {
    typename Q::Span g;
    std::vector<char> dy_buf;
    std::vector<float> acc_s, acc_z;
    for (int64_t t = t0; t < t1; ++t) {
      const PeriodTask k = period_task(p, t);
      acc_s.assign(k.col1 - k.col0, 0.f);
      acc_z.assign(k.col1 - k.col0, 0.f);
      g.acc_scale = acc_s.data();
      g.acc_zero = acc_z.data();
      for_each_period_span(p, q, k, g, [&](int64_t start, int64_t len) {
        g.n = len;
        g.x = xp + start * es;
        dy.point(g, start, len, dy_buf);
        g.out = dxp + start * es;
        fns[1](g);
      });
      // Column blocks hold whole channels (or the whole period row), so this
      // task is the only writer of these channels' partials for its group.
      float* ps = part_s.data() + k.grp * p.channels;
      float* pz = part_z.data() + k.grp * p.channels;
      for (int64_t j = 0; j < k.col1 - k.col0; ++j) {
        const int64_t c = ((k.col0 + j) % p.period_len) / p.inner;
        ps[c] += acc_s[j];
        pz[c] += acc_z[j];
      }
    }
  });
  cpu::parallel_tasks(0, p.channels, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> vs(p.row_groups), vz(p.row_groups);
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t grp = 0; grp < p.row_groups; ++grp) {
        vs[grp] = part_s[grp * p.channels + c];
        vz[grp] = part_z[grp * p.channels + c];
      }
      ss[c] = q.sum_factor * pairwise_sum(vs.data(), p.row_groups);
      sz[c] = q.sum_factor * pairwise_sum(vz.data(), p.row_groups);
    }
  });
  return {sum_s, sum_z};
}

std::vector<float> to_floats(const at::Tensor& t) {
  at::Tensor f = t.detach().to(at::kFloat).contiguous();
  return std::vector<float>(f.data_ptr<float>(), f.data_ptr<float>() + f.numel());
}

// §5a parameters. Forward and per-channel backward round the zero point half
// to even; ATen's per-tensor backward takes trunc(clamp(zp + 0.5)) instead.
FqChannelParams fq_params(const at::Tensor& scale, const at::Tensor& zero_point, bool per_tensor_backward,
                          int64_t quant_min, int64_t quant_max, double grad_factor, const LaunchPlan& p) {
  FqChannelParams q;
  q.quant_min = float(quant_min);
  q.quant_max = float(quant_max);
  q.grad_factor = float(grad_factor);
  q.scale = to_floats(scale);
  std::vector<float> z = to_floats(zero_point);
  const size_t C = q.scale.size();
  q.inv_scale.resize(C);
  q.zero_point.resize(C);
  for (size_t i = 0; i < C; ++i) {
    q.inv_scale[i] = 1.0f / q.scale[i];  // ATen computes 1/scale in float32
    // A scale below 1/FLT_MAX (a subnormal) has no finite reciprocal: ATen then
    // returns quant_min * scale for x = 0; refused here instead (docs/spec.md §5a).
    TORCH_CHECK_VALUE(q.scale[i] > 0.f && std::isfinite(q.inv_scale[i]) && std::isfinite(q.scale[i]),
                      "scale must be finite and > 0 everywhere, with a finite reciprocal (>= 2.9e-39), got ",
                      first_values(q.scale.data(), int64_t(C)));
    TORCH_CHECK_VALUE(!std::isnan(z[i]), "zero_point must not be NaN, got ", first_values(z.data(), int64_t(C)));
    q.zero_point[i] = per_tensor_backward ? std::trunc(std::min(std::max(z[i] + 0.5f, q.quant_min), q.quant_max))
                                          : std::min(std::max(std::nearbyint(z[i]), q.quant_min), q.quant_max);
  }
  expand(q.inv_scale, p);
  expand(q.scale, p);
  expand(q.zero_point, p);
  return q;
}

LsqChannelParams lsq_params(const at::Tensor& step, const c10::optional<at::Tensor>& offset, int64_t qn, int64_t qp,
                            double grad_factor, const LaunchPlan& p) {
  LsqChannelParams q;
  q.neg_qn = -float(qn);
  q.qp = float(qp);
  q.sum_factor = float(grad_factor);
  q.step = to_floats(step);
  const int64_t C = int64_t(q.step.size());
  for (float& s : q.step) {
    TORCH_CHECK_VALUE(s > 0.f && std::isfinite(s), "step must be finite and > 0 everywhere, got ",
                      first_values(q.step.data(), C));
    s = std::max(s, kMinStep);
  }
  q.offset = offset.has_value() ? to_floats(*offset) : std::vector<float>(q.step.size(), 0.f);
  for (float o : q.offset) {
    TORCH_CHECK_VALUE(std::isfinite(o), "offset must be finite everywhere, got ", first_values(q.offset.data(), C));
  }
  expand(q.step, p);
  expand(q.offset, p);
  return q;
}

}  // namespace

at::Tensor fq_forward_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                          c10::optional<int64_t> axis, int64_t quant_min, int64_t quant_max, double grad_factor) {
  check_inputs("fake_quantize_learnable", Semantics::kTorchCompat, x, scale, &zero_point, axis, quant_min,
               quant_max, grad_factor);
  DenseView v = dense_view(x, axis);
  at::Tensor y = cpu::empty_output_like(v.x);
  if (v.x.numel() == 0) return y;
  const LaunchPlan p = make_plan(v);
  const FqChannelParams q = fq_params(scale, zero_point, false, quant_min, quant_max, grad_factor, p);
  run_forward(p, q, cpu::kernels().fq_fwd[dtype_code(x)], v.x, y);
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fq_backward_cpu(const at::Tensor& dy, const at::Tensor& x,
                                                               const at::Tensor& scale, const at::Tensor& zero_point,
                                                               c10::optional<int64_t> axis, int64_t quant_min,
                                                               int64_t quant_max, double grad_factor) {
  check_inputs("fake_quantize_learnable_backward", Semantics::kTorchCompat, x, scale, &zero_point, axis,
               quant_min, quant_max, grad_factor);
  DenseView v = dense_view(x, axis);
  const GradReader g = grad_reader(dy, v.x);
  at::Tensor dx = cpu::empty_output_like(v.x);
  if (v.x.numel() == 0) return {dx, at::zeros_like(scale), at::zeros_like(zero_point)};
  const LaunchPlan p = make_plan(v);
  const FqChannelParams q = fq_params(scale, zero_point, !axis.has_value(), quant_min, quant_max, grad_factor, p);
  auto sums = run_backward(p, q, cpu::kernels().fq_bwd[dtype_code(x)], v.x, g, dx);
  return {dx, sums.first.to(scale.scalar_type()).reshape(scale.sizes()),
          sums.second.to(zero_point.scalar_type()).reshape(zero_point.sizes())};
}

at::Tensor lsq_forward_cpu(const at::Tensor& x, const at::Tensor& step, const c10::optional<at::Tensor>& offset,
                           c10::optional<int64_t> axis, int64_t qn, int64_t qp, double grad_factor) {
  check_inputs("lsq_fake_quant", Semantics::kLsq, x, step, offset.has_value() ? &*offset : nullptr, axis, -qn, qp,
               grad_factor);
  DenseView v = dense_view(x, axis);
  at::Tensor y = cpu::empty_output_like(v.x);
  if (v.x.numel() == 0) return y;
  const LaunchPlan p = make_plan(v);
  const LsqChannelParams q = lsq_params(step, offset, qn, qp, grad_factor, p);
  run_forward(p, q, cpu::kernels().lsq_fwd[dtype_code(x)], v.x, y);
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lsq_backward_cpu(const at::Tensor& dy, const at::Tensor& x,
                                                                const at::Tensor& step,
                                                                const c10::optional<at::Tensor>& offset,
                                                                c10::optional<int64_t> axis, int64_t qn, int64_t qp,
                                                                double grad_factor) {
  check_inputs("lsq_fake_quant_backward", Semantics::kLsq, x, step, offset.has_value() ? &*offset : nullptr, axis, -qn, qp,
               grad_factor);
  DenseView v = dense_view(x, axis);
  const GradReader g = grad_reader(dy, v.x);
  at::Tensor dx = cpu::empty_output_like(v.x);
  // The offset gradient takes the offset's dtype and shape (step's without one).
  const at::Tensor& off_like = offset.has_value() ? *offset : step;
  if (v.x.numel() == 0) return {dx, at::zeros_like(step), at::zeros_like(off_like)};
  const LaunchPlan p = make_plan(v);
  const LsqChannelParams q = lsq_params(step, offset, qn, qp, grad_factor, p);
  auto sums = run_backward(p, q, cpu::kernels().lsq_bwd[dtype_code(x)], v.x, g, dx);
  return {dx, sums.first.to(step.scalar_type()).reshape(step.sizes()),
          sums.second.to(off_like.scalar_type()).reshape(off_like.sizes())};
}

}  // namespace spark_ext

// Kernels of the fake-quant ops; their schemas are defined in Python (SCHEMAS in spark_ext/ops/fake_quant.py and
// spark_ext/ops/lsq.py), the CUDA kernels in cuda/fake_quant_cuda.cu register for the same ops.
TORCH_LIBRARY_IMPL(spark_ext, CPU, m) {
  m.impl("fake_quantize_learnable", &spark_ext::fq_forward_cpu);
  m.impl("fake_quantize_learnable_backward", &spark_ext::fq_backward_cpu);
  m.impl("lsq_fake_quant", &spark_ext::lsq_forward_cpu);
  m.impl("lsq_fake_quant_backward", &spark_ext::lsq_backward_cpu);
}
