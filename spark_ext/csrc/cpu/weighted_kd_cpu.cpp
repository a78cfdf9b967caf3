// CPU kernels of docs/spec.md §3: the weighted KD loss with no weight or a per-pixel
// weight, and its one-pass backward (grid weights go through cell_kd, see
// difficulty_cpu.cpp). Ops (fakes and autograd in spark_ext/ops/weighted_kd.py):
//
//   fused_weighted_kd(S, T, w?, kd_loss, reduction)  -> 0-dim float32 loss
//   fused_weighted_kd_backward(g, S, T, w?, kd_loss, reduction, need_s, need_t, need_w) -> (dS, dT, dw)
//
// S and T are [B, C, H, W] float32/float16/bfloat16 read in place through
// their strides, one (b, c, h) row at a time (image_rows.h), through the
// element loops of kd_row_impl.h (picked per instruction set like the fake
// quant spans, same bits on each); float32 math with float64 accumulation in
// an order fixed by the shape alone, so the bits do not depend on the thread
// count or the layout. Unrequested gradients are
// empty [0] tensors and are not computed.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "huge_page_allocator.h"
#include "image_rows.h"
#include "parallel.h"
#include "span_kernels.h"

namespace spark_ext {
namespace {

using namespace image;

// --------------------------------------------------------------------------
// docs/spec.md §3: weighted KD with no weight or a per-pixel weight
// --------------------------------------------------------------------------

// The weight as float32 [Bw, Cw, H, W] (leading size-1 dims added; Bw in {1, B},
// Cw in {1, C}). A weight of another dtype is converted once (a weight-sized
// float32 copy; the reference converts it the same way).
at::Tensor weight4(const char* op, const at::Tensor& weight, const at::Tensor& S) {
  const int64_t B = S.size(0), C = S.size(1), H = S.size(2), W = S.size(3);
  TORCH_CHECK_TYPE(weight.is_floating_point(), op, ": weight must be floating, got ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.device().is_cpu(), op, ": weight must be a CPU tensor, got ", weight.device());
  TORCH_CHECK_VALUE(weight.dim() >= 2 && weight.dim() <= 4 && weight.size(-2) == H && weight.size(-1) == W, op,
                    ": weight must be per pixel, 2-4 dims ending in (H, W) = (", H, ", ", W, "), got ",
                    weight.sizes());
  at::Tensor w = weight.scalar_type() == at::kFloat ? weight : weight.to(at::kFloat);
  while (w.dim() < 4) w = w.unsqueeze(0);
  TORCH_CHECK_VALUE((w.size(0) == 1 || w.size(0) == B) && (w.size(1) == 1 || w.size(1) == C), op, ": weight of shape ",
                    weight.sizes(), " must broadcast to ", S.sizes());
  return w;
}

template <typename scalar_t, int K>
double weighted_kd_sum(const at::Tensor& S, const at::Tensor& T, const at::Tensor& w4) {
  const int64_t B = S.size(0), C = S.size(1), H = S.size(2), W = S.size(3);
  const View4<const scalar_t> s(S), t(T);
  const bool has_w = w4.defined();
  View4<const float> wv = has_w ? View4<const float>(w4) : View4<const float>();
  if (has_w) {  // broadcast dims read with stride 0
    if (w4.size(0) == 1) wv.sb = 0;
    if (w4.size(1) == 1) wv.sc = 0;
  }
  // One partial per image row (b, h): the kd_fwd_row lane sums over c in
  // order (kd_row_impl.h: float32 within blocks of 256 elements, float64 across
  // them), then the 16 lanes in order.
  const cpu::KdRowFn row_fn = cpu::kernels().kd_fwd[K];
  std::vector<double> partial(B * H, 0.0);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, C * W));
  // Rows are walked in blocks of consecutive h of one b, channel by channel,
  // so each channel's read is one long run for contiguous inputs; each row
  // still sees its channels in order.
  const int64_t rows_per_block = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, W));
  cpu::parallel_tasks(0, B * H, grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> s_row(W), t_row(W), w_row(W);
    std::vector<double> lanes(rows_per_block * cpu::kLanes);
    for (int64_t r0 = t0; r0 < t1;) {
      const int64_t b = r0 / H, h0 = r0 % H;
      const int64_t r1 = std::min({t1, (b + 1) * H, r0 + rows_per_block});
      std::fill(lanes.begin(), lanes.end(), 0.0);
      cpu::KdRowArgs a;
      a.n = W;
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t h = h0 + (r - r0);
          a.s = row_f32(s.at(b, c, h, 0), s.sw, W, s_row.data());
          a.t = row_f32(t.at(b, c, h, 0), t.sw, W, t_row.data());
          a.w = has_w ? row_f32(wv.at(b, c, h, 0), wv.sw, W, w_row.data()) : nullptr;
          a.acc = lanes.data() + (r - r0) * cpu::kLanes;
          row_fn(a);
        }
      }
      for (int64_t r = r0; r < r1; ++r) {
        double sum = 0.0;
        for (int64_t l = 0; l < cpu::kLanes; ++l) sum += lanes[(r - r0) * cpu::kLanes + l];
        partial[r] = sum;
      }
      r0 = r1;
    }
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

at::Tensor fused_weighted_kd_cpu(const at::Tensor& S, const at::Tensor& T, const c10::optional<at::Tensor>& weight,
                                   c10::string_view kd_loss, c10::string_view reduction) {
  const char* op = "fused_weighted_kd";
  check_images(op, S, T, nullptr);
  const int kind = parse_kind(std::string(kd_loss.data(), kd_loss.size()));
  const bool mean = parse_mean(std::string(reduction.data(), reduction.size()));
  const at::Tensor w4 = weight.has_value() ? weight4(op, *weight, S) : at::Tensor();
  double total = 0.0;
  dispatch(S.scalar_type(), kind, [&](auto zero, auto k) {
    total = weighted_kd_sum<decltype(zero), decltype(k)::value>(S, T, w4);
  });
  if (mean) total /= static_cast<double>(S.numel());  // 0/0 = NaN for an empty input, as in the reference
  return at::full({}, static_cast<float>(total), S.options().dtype(at::kFloat));
}

// The row as a float32 pointer to write in place, or nullptr when it is not unit-stride float32.
template <typename T>
float* direct_f32(T* p, int64_t stride) {
  if constexpr (std::is_same<T, float>::value) {
    if (stride == 1) return p;
  }
  return nullptr;
}

// Tasks are (weight image bw, row h): each walks the image rows that share the
// weight row(s) (all b when the weight broadcasts over B, else b = bw; all c),
// writing dS/dT per element and summing ell(d) per weight element in (b, c)
// order. Without a weight gradient every (b, h) is its own task.
template <typename scalar_t, int K>
void fused_weighted_kd_backward_impl(float scale, const at::Tensor& S, const at::Tensor& T, const at::Tensor& w4,
                               at::Tensor* ds, at::Tensor* dt, float* dw) {
  const int64_t B = S.size(0), C = S.size(1), H = S.size(2), W = S.size(3);
  const View4<const scalar_t> s(S), t(T);
  const bool has_w = w4.defined();
  const int64_t wB = has_w ? w4.size(0) : B, wC = has_w ? w4.size(1) : C;
  View4<const float> wv = has_w ? View4<const float>(w4) : View4<const float>();
  if (has_w) {
    if (wB == 1) wv.sb = 0;
    if (wC == 1) wv.sc = 0;
  }
  const View4<scalar_t> o_s = ds ? View4<scalar_t>(*ds) : View4<scalar_t>();
  const View4<scalar_t> o_t = dt ? View4<scalar_t>(*dt) : View4<scalar_t>();
  const bool need_w = dw != nullptr;
  const int64_t task_b = need_w ? wB : B;  // images per task: B / task_b
  const bool need_grad = ds || dt;
  const int64_t per_task = (B / std::max<int64_t>(task_b, 1)) * C * W;  // elements per task
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, per_task));
  const cpu::KdRowFn row_fn = cpu::kernels().kd_bwd[K];
  // Tasks are walked in blocks of consecutive h of one tb, (b, c) by (b, c), as
  // in the forward: long runs for contiguous inputs, each weight row's sums
  // still in (b, c) order.
  const int64_t rows_per_block = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, W));
  cpu::parallel_tasks(0, task_b * H, grain, [&](int64_t t0, int64_t t1) {
    std::vector<double> acc(need_w ? rows_per_block * wC * W : 0);
    std::vector<float> s_row(W), t_row(W), w_row(W), v_row(W);
    for (int64_t r0 = t0; r0 < t1;) {
      const int64_t tb = r0 / H, h0 = r0 % H;
      const int64_t r1 = std::min({t1, (tb + 1) * H, r0 + rows_per_block});
      const int64_t b0 = task_b == B ? tb : 0, b1 = task_b == B ? tb + 1 : B;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t c = 0; c < C; ++c) {
          for (int64_t r = r0; r < r1; ++r) {
            const int64_t h = h0 + (r - r0);
            cpu::KdRowArgs a;
            a.n = W;
            a.scale = scale;
            a.s = row_f32(s.at(b, c, h, 0), s.sw, W, s_row.data());
            a.t = row_f32(t.at(b, c, h, 0), t.sw, W, t_row.data());
            a.w = has_w ? row_f32(wv.at(b, c, h, 0), wv.sw, W, w_row.data()) : nullptr;
            // float32 unit-stride outputs are written in place, others through v_row.
            float* ds_row = ds ? direct_f32(o_s.at(b, c, h, 0), o_s.sw) : nullptr;
            float* dt_row = dt ? direct_f32(o_t.at(b, c, h, 0), o_t.sw) : nullptr;
            if (need_grad) {
              a.out_s = ds_row ? ds_row : v_row.data();
              a.out_t = dt_row;
            }
            a.acc = need_w ? acc.data() + ((r - r0) * wC + (wC == 1 ? 0 : c)) * W : nullptr;
            row_fn(a);
            if (ds && !ds_row) scatter_row(a.out_s, o_s.at(b, c, h, 0), o_s.sw, W, 1.f);
            if (dt && !dt_row) scatter_row(a.out_s, o_t.at(b, c, h, 0), o_t.sw, W, -1.f);
          }
        }
      }
      if (need_w) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t h = h0 + (r - r0);
          for (int64_t c = 0; c < wC; ++c)
            for (int64_t w = 0; w < W; ++w)
              dw[((tb * wC + c) * H + h) * W + w] =
                  static_cast<float>(static_cast<double>(scale) * acc[((r - r0) * wC + c) * W + w]);
        }
      }
      r0 = r1;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_weighted_kd_backward_cpu(
    const at::Tensor& grad, const at::Tensor& S, const at::Tensor& T, const c10::optional<at::Tensor>& weight,
    c10::string_view kd_loss, c10::string_view reduction, bool need_s, bool need_t, bool need_w) {
  const char* op = "fused_weighted_kd_backward";
  check_images(op, S, T, nullptr);
  const int kind = parse_kind(std::string(kd_loss.data(), kd_loss.size()));
  const bool mean = parse_mean(std::string(reduction.data(), reduction.size()));
  TORCH_CHECK_VALUE(grad.numel() == 1, op, ": grad must hold one value, got shape ", grad.sizes());
  const at::Tensor w4 = weight.has_value() ? weight4(op, *weight, S) : at::Tensor();
  need_w = need_w && weight.has_value();
  at::Tensor ds = need_s ? cpu::empty_output_like(S) : at::empty({0}, S.options());
  at::Tensor dt = need_t ? cpu::empty_output_like(T) : at::empty({0}, T.options());
  // dweight is computed in float32 as [Bw, Cw, H, W], then given the weight's shape and dtype.
  at::Tensor dw32 = need_w ? cpu::empty_output(w4.sizes(), at::kFloat)
                           : at::empty({0}, (weight.has_value() ? *weight : S).options());
  if (need_s || need_t || need_w) {
    // Host read of a CPU scalar: no device synchronisation involved.
    const double g = grad.to(at::kDouble).item<double>();
    const float scale = static_cast<float>(mean ? g / static_cast<double>(S.numel()) : g);
    if (S.numel() == 0) {
      if (need_w) dw32.zero_();
    } else {
      dispatch(S.scalar_type(), kind, [&](auto zero, auto k) {
        fused_weighted_kd_backward_impl<decltype(zero), decltype(k)::value>(
            scale, S, T, w4, need_s ? &ds : nullptr, need_t ? &dt : nullptr,
            need_w ? dw32.data_ptr<float>() : nullptr);
      });
    }
  }
  at::Tensor dw = need_w ? dw32.reshape(weight->sizes()).to(weight->scalar_type()) : dw32;
  return {ds, dt, dw};
}

}  // namespace
}  // namespace spark_ext

// Schemas: SCHEMAS in spark_ext/ops/weighted_kd.py (shared with the Triton ops).
TORCH_LIBRARY_IMPL(spark_ext, CPU, m) {
  m.impl("fused_weighted_kd", &spark_ext::fused_weighted_kd_cpu);
  m.impl("fused_weighted_kd_backward", &spark_ext::fused_weighted_kd_backward_cpu);
}
