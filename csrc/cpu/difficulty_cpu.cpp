// CPU kernels for docs/spec.md §2 (difficulty signals, cell_kd and its backward) and
// docs/spec.md §3 (weighted KD loss with per-pixel weights). Ops (schemas in
// library.cpp; fakes and autograd in spark_ext/ops/difficulty.py and
// weighted_kd.py):
//
//   difficulty_forward(S, T, Y, gh, gw, kd_loss) -> (signals [B,4,gh,gw], cell_kd [B,1,gh,gw])
//   cell_kd_forward(S, T, gh, gw, kd_loss)       -> cell_kd (reads S and T only)
//   cell_kd_backward(G, S, T, kd_loss, need_s, need_t) -> (dS, dT)
//   weighted_kd_forward(S, T, w?, kd_loss, reduction)  -> 0-dim float32 loss
//   weighted_kd_backward(g, S, T, w?, kd_loss, reduction, need_s, need_t, need_w) -> (dS, dT, dw)
//
// Common rules:
// * S, T, Y are [B, C, H, W] float32/float16/bfloat16 with any strides; they
//   are read in place through their strides (no contiguous copies), all math
//   in float32 with float64 accumulation.
// * Determinism: every output value is reduced by one task in an order fixed
//   by the shape alone (never by the thread count or by the memory layout):
//   per-channel sums run over c in index order, per-row sums over w, and
//   row partials are added in row order.
// * Rows are walked one (b, c, h) image row at a time: gathered into small
//   float32 row buffers (W floats each, per task), computed on, and scattered
//   back for the gradients, so the arithmetic vectorises for every layout.
// * Gradients that are not requested are returned as empty [0] tensors and
//   not computed; gradients of S/T come out in their dtype and (dense) layout
//   (empty_like).
//
// Difficulty forward: tasks are (image b, cell row r). A task streams the
// rows of its band once, plus one halo row of Y above and below (the
// replicate-border Laplacian needs g of the neighbouring rows), keeping a
// rolling window of three rows of g = mean_c Y in float64 (3 * W doubles per
// task, no image-sized buffer; about 20 rows of W values per task in all).
// Per column it accumulates over the band's rows, in float64, the sums of
// the recon/kd-gap/kd terms and *shifted* sums of L, L^2, g, g^2 (shifted by
// the value at the first pixel of the column's cell), then adds the columns
// of each cell in order. The shift keeps mean(x^2) - mean(x)^2 exact to many
// digits even for values like 1000 + 1e-2 noise over 2^20-pixel cells (docs/spec.md §2).
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "parallel.h"

namespace spark_ext {
namespace {

enum Kind : int { kL1 = 0, kL2 = 1, kCharbonnier = 2 };

// docs/spec.md §2: Charbonnier eps = 1e-3 (the reference adds eps^2 to a float32 d^2).
const float kEps = static_cast<float>(1e-3);
const float kEps2 = static_cast<float>(1e-3 * 1e-3);

int parse_kind(const std::string& kd_loss) {
  if (kd_loss == "l1") return kL1;
  if (kd_loss == "l2") return kL2;
  if (kd_loss == "charbonnier") return kCharbonnier;
  TORCH_CHECK_VALUE(false, "kd_loss must be one of ('l1', 'l2', 'charbonnier'), got '", kd_loss, "'");
}

bool parse_mean(const std::string& reduction) {
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
void dispatch(at::ScalarType st, int kind, F&& f) {
  auto with_kind = [&](auto zero) {
    switch (kind) {
      case kL1: f(zero, std::integral_constant<int, kL1>{}); break;
      case kL2: f(zero, std::integral_constant<int, kL2>{}); break;
      default: f(zero, std::integral_constant<int, kCharbonnier>{}); break;
    }
  };
  switch (st) {
    case at::kFloat: with_kind(float{}); break;
    case at::kHalf: with_kind(c10::Half{}); break;
    case at::kBFloat16: with_kind(c10::BFloat16{}); break;
    default: TORCH_CHECK_TYPE(false, "spark_ext: inputs must be float32, float16 or bfloat16, got ", st);
  }
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

void check_images(const char* op, const at::Tensor& s, const at::Tensor& t, const at::Tensor* y) {
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

void check_grid(const char* op, int64_t gh, int64_t gw, int64_t H, int64_t W) {
  TORCH_CHECK_VALUE(gh >= 1 && gh <= H && gw >= 1 && gw <= W, op, ": grid must satisfy 1 <= Gh <= H=", H,
                    " and 1 <= Gw <= W=", W, ", got (", gh, ", ", gw, ")");
}

// docs/spec.md §1: cell of index i along an axis of `size` split into `cells`, and the
// first index of every cell (cells + 1 entries, the last one = size).
std::vector<int64_t> cell_of(int64_t size, int64_t cells) {
  std::vector<int64_t> v(size);
  for (int64_t i = 0; i < size; ++i) v[i] = i * cells / size;
  return v;
}

std::vector<int64_t> cell_starts(const std::vector<int64_t>& cell, int64_t cells) {
  std::vector<int64_t> start(cells + 1, static_cast<int64_t>(cell.size()));
  for (int64_t i = static_cast<int64_t>(cell.size()) - 1; i >= 0; --i) start[cell[i]] = i;
  return start;
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

// --------------------------------------------------------------------------
// docs/spec.md §2 forward
// --------------------------------------------------------------------------

template <typename scalar_t, int K, bool SIGNALS>
void difficulty_forward_impl(const at::Tensor& S, const at::Tensor& T, const at::Tensor* Y, int64_t gh, int64_t gw,
                             float* sig, float* kd) {
  const int64_t B = S.size(0), C = S.size(1), H = S.size(2), W = S.size(3);
  const View4<const scalar_t> s(S), t(T);
  const View4<const scalar_t> y = SIGNALS ? View4<const scalar_t>(*Y) : View4<const scalar_t>();
  const std::vector<int64_t> col_cell = cell_of(W, gw);
  const std::vector<int64_t> row_start = cell_starts(cell_of(H, gh), gh);
  const std::vector<int64_t> col_start = cell_starts(col_cell, gw);
  const double inv_c = 1.0 / static_cast<double>(C);  // inf for C = 0: g is NaN then, as in the reference

  cpu::parallel_tasks(0, B * gh, 1, [&](int64_t t0, int64_t t1) {
    // Rolling rows of g (above, current, below); one channel's rows of S, T, Y;
    // this row's per-pixel sums over c (in channel order); the Laplacian row.
    std::vector<double> gbuf(SIGNALS ? 3 * W : 0), lap(SIGNALS ? W : 0);
    std::vector<float> s_buf(W), t_buf(W), y_buf(SIGNALS ? W : 0), e_row(W), k_row(W), l_row(W);
    // Per-column float64 sums over the band's rows (summed per cell at the end,
    // columns in order): l, e, k, and lap, lap^2, g, g^2 shifted by the value
    // at their cell's first pixel (per column: sh_lap, sh_g).
    std::vector<double> a_l(W), a_e(W), a_k(W), a_lap(W), a_lap2(W), a_g(W), a_g2(W), sh_lap(W), sh_g(W);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / gh, r = task % gh;
      const int64_t h0 = row_start[r], h1 = row_start[r + 1];
      for (auto* v : {&a_l, &a_e, &a_k, &a_lap, &a_lap2, &a_g, &a_g2}) std::fill(v->begin(), v->end(), 0.0);

      // Reads row h of every input once: g (SIGNALS) into `g`; with `full`, also
      // adds row h's e, k, l to the column sums (a halo row only needs g).
      auto load_row = [&](int64_t h, double* g, bool full) {
        if (SIGNALS) std::fill(g, g + W, 0.0);
        if (full) {
          std::fill(e_row.begin(), e_row.end(), 0.f);
          std::fill(k_row.begin(), k_row.end(), 0.f);
          std::fill(l_row.begin(), l_row.end(), 0.f);
        }
        for (int64_t c = 0; c < C; ++c) {
          const float* yr = nullptr;
          if (SIGNALS) {
            yr = row_f32(y.at(b, c, h, 0), y.sw, W, y_buf.data());
            for (int64_t w = 0; w < W; ++w) g[w] += static_cast<double>(yr[w]);
          }
          if (!full) continue;
          const float* sr = row_f32(s.at(b, c, h, 0), s.sw, W, s_buf.data());
          const float* tr = row_f32(t.at(b, c, h, 0), t.sw, W, t_buf.data());
          for (int64_t w = 0; w < W; ++w) l_row[w] += ell<K>(sr[w] - tr[w]);
          if (SIGNALS) {
            for (int64_t w = 0; w < W; ++w) {
              e_row[w] += std::fabs(sr[w] - yr[w]);
              k_row[w] += std::fabs(sr[w] - tr[w]);
            }
          }
        }
        if (SIGNALS)
          for (int64_t w = 0; w < W; ++w) g[w] *= inv_c;
        if (!full) return;
        for (int64_t w = 0; w < W; ++w) a_l[w] += static_cast<double>(l_row[w]);
        if (SIGNALS) {
          for (int64_t w = 0; w < W; ++w) {
            a_e[w] += static_cast<double>(e_row[w]);
            a_k[w] += static_cast<double>(k_row[w]);
          }
        }
      };

      if (!SIGNALS) {
        for (int64_t h = h0; h < h1; ++h) load_row(h, nullptr, true);
      } else {
        double* above = gbuf.data();
        double* cur = above + W;
        double* below = cur + W;
        load_row(h0, cur, true);
        if (h0 > 0) {
          load_row(h0 - 1, above, false);  // halo row (belongs to the band above)
        } else {
          std::copy(cur, cur + W, above);  // replicate border
        }
        for (int64_t h = h0; h < h1; ++h) {
          if (h + 1 < H) {
            load_row(h + 1, below, h + 1 < h1);  // the band's next row, or the halo row below it
          } else {
            std::copy(cur, cur + W, below);
          }
          // 5-point Laplacian, replicate borders (the same sum order at every w).
          lap[0] = above[0] + below[0] + cur[0] + cur[W > 1 ? 1 : 0] - 4.0 * cur[0];
          for (int64_t w = 1; w < W - 1; ++w) lap[w] = above[w] + below[w] + cur[w - 1] + cur[w + 1] - 4.0 * cur[w];
          if (W > 1) lap[W - 1] = above[W - 1] + below[W - 1] + cur[W - 2] + cur[W - 1] - 4.0 * cur[W - 1];
          if (h == h0) {
            for (int64_t w = 0; w < W; ++w) {
              const int64_t first = col_start[col_cell[w]];
              sh_lap[w] = lap[first];
              sh_g[w] = cur[first];
            }
          }
          for (int64_t w = 0; w < W; ++w) {
            const double dl = lap[w] - sh_lap[w], dg = cur[w] - sh_g[w];
            a_lap[w] += dl;
            a_lap2[w] += dl * dl;
            a_g[w] += dg;
            a_g2[w] += dg * dg;
          }
          std::swap(above, cur);  // rotate: cur -> above, below -> cur
          std::swap(cur, below);
        }
      }

      const double rows = static_cast<double>(h1 - h0);
      const int64_t plane = gh * gw;
      for (int64_t j = 0; j < gw; ++j) {
        const int64_t w0 = col_start[j], w1 = col_start[j + 1];
        auto cell_sum = [w0, w1](const std::vector<double>& v) {
          double sum = 0.0;
          for (int64_t w = w0; w < w1; ++w) sum += v[w];
          return sum;
        };
        kd[(b * gh + r) * gw + j] = static_cast<float>(cell_sum(a_l));
        if (!SIGNALS) continue;
        const double n = rows * static_cast<double>(w1 - w0);
        auto var = [n](double sum, double sum2) {
          const double m = sum / n;
          return std::max(sum2 / n - m * m, 0.0);
        };
        const int64_t base = b * 4 * plane + r * gw + j;
        sig[base] = static_cast<float>(var(cell_sum(a_lap), cell_sum(a_lap2)));
        sig[base + plane] = static_cast<float>(var(cell_sum(a_g), cell_sum(a_g2)));
        sig[base + 2 * plane] = static_cast<float>(cell_sum(a_e) * inv_c / n);
        sig[base + 3 * plane] = static_cast<float>(cell_sum(a_k) * inv_c / n);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> run_difficulty_forward(const char* op, const at::Tensor& S, const at::Tensor& T,
                                                          const at::Tensor* Y, int64_t gh, int64_t gw,
                                                          const std::string& kd_loss) {
  check_images(op, S, T, Y);
  const int kind = parse_kind(kd_loss);
  check_grid(op, gh, gw, S.size(2), S.size(3));
  auto f32 = S.options().dtype(at::kFloat);
  at::Tensor cell_kd = at::empty({S.size(0), 1, gh, gw}, f32);
  at::Tensor sig = Y ? at::empty({S.size(0), 4, gh, gw}, f32) : at::Tensor();
  if (S.size(0) > 0) {
    dispatch(S.scalar_type(), kind, [&](auto zero, auto k) {
      using scalar_t = decltype(zero);
      constexpr int K = decltype(k)::value;
      if (Y) {
        difficulty_forward_impl<scalar_t, K, true>(S, T, Y, gh, gw, sig.data_ptr<float>(), cell_kd.data_ptr<float>());
      } else {
        difficulty_forward_impl<scalar_t, K, false>(S, T, Y, gh, gw, nullptr, cell_kd.data_ptr<float>());
      }
    });
  }
  return {sig, cell_kd};
}

std::tuple<at::Tensor, at::Tensor> difficulty_forward_cpu(const at::Tensor& S, const at::Tensor& T,
                                                          const at::Tensor& Y, int64_t gh, int64_t gw,
                                                          c10::string_view kd_loss) {
  return run_difficulty_forward("difficulty_forward", S, T, &Y, gh, gw, std::string(kd_loss.data(), kd_loss.size()));
}

at::Tensor cell_kd_forward_cpu(const at::Tensor& S, const at::Tensor& T, int64_t gh, int64_t gw,
                               c10::string_view kd_loss) {
  const std::string kind(kd_loss.data(), kd_loss.size());
  return std::get<1>(run_difficulty_forward("cell_kd_forward", S, T, nullptr, gh, gw, kind));
}

// --------------------------------------------------------------------------
// docs/spec.md §2 backward of cell_kd: dS = G[b, 0, cell(h), cell(w)] * ell'(S - T), dT = -dS
// --------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> cell_kd_backward_cpu(const at::Tensor& grad, const at::Tensor& S,
                                                        const at::Tensor& T, c10::string_view kd_loss,
                                                        bool need_s, bool need_t) {
  const char* op = "cell_kd_backward";
  check_images(op, S, T, nullptr);
  const int kind = parse_kind(std::string(kd_loss.data(), kd_loss.size()));
  const int64_t B = S.size(0), C = S.size(1), H = S.size(2), W = S.size(3);
  TORCH_CHECK_VALUE(grad.dim() == 4 && grad.size(0) == B && grad.size(1) == 1, op, ": grad must be [B=", B,
                    ", 1, Gh, Gw], got ", grad.sizes());
  TORCH_CHECK_VALUE(grad.device().is_cpu(), op, ": grad must be a CPU tensor, got ", grad.device());
  const int64_t gh = grad.size(2), gw = grad.size(3);
  check_grid(op, gh, gw, H, W);
  at::Tensor ds = need_s ? at::empty_like(S) : at::empty({0}, S.options());
  at::Tensor dt = need_t ? at::empty_like(T) : at::empty({0}, T.options());
  if (!(need_s || need_t) || S.numel() == 0) return {ds, dt};
  // A float32 view of G (a copy of Gh*Gw values per image only if G is not float32).
  const at::Tensor g32 = grad.scalar_type() == at::kFloat ? grad : grad.to(at::kFloat);
  const float* gp = g32.data_ptr<float>();
  const int64_t gsb = g32.stride(0), gsh = g32.stride(2), gsw = g32.stride(3);
  const std::vector<int64_t> row_cell = cell_of(H, gh), col_cell = cell_of(W, gw);
  dispatch(S.scalar_type(), kind, [&](auto zero, auto k) {
    using scalar_t = decltype(zero);
    constexpr int K = decltype(k)::value;
    const View4<const scalar_t> s(S), t(T);
    const View4<scalar_t> o_s = need_s ? View4<scalar_t>(ds) : View4<scalar_t>();
    const View4<scalar_t> o_t = need_t ? View4<scalar_t>(dt) : View4<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, C * W));
    cpu::parallel_tasks(0, B * H, grain, [&](int64_t t0, int64_t t1) {
      std::vector<float> g_row(W), s_row(W), t_row(W), v_row(W);
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t b = task / H, h = task % H;
        const float* g_cells = gp + b * gsb + row_cell[h] * gsh;
        for (int64_t w = 0; w < W; ++w) g_row[w] = g_cells[col_cell[w] * gsw];
        for (int64_t c = 0; c < C; ++c) {
          const float* sr = row_f32(s.at(b, c, h, 0), s.sw, W, s_row.data());
          const float* tr = row_f32(t.at(b, c, h, 0), t.sw, W, t_row.data());
          for (int64_t w = 0; w < W; ++w) v_row[w] = g_row[w] * ell_grad<K>(sr[w] - tr[w]);
          if (need_s) scatter_row(v_row.data(), o_s.at(b, c, h, 0), o_s.sw, W, 1.f);
          if (need_t) scatter_row(v_row.data(), o_t.at(b, c, h, 0), o_t.sw, W, -1.f);
        }
      }
    });
  });
  return {ds, dt};
}

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
  // One partial per image row (b, h): sum over w of (sum over c in order).
  std::vector<double> partial(B * H, 0.0);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, C * W));
  cpu::parallel_tasks(0, B * H, grain, [&](int64_t t0, int64_t t1) {
    std::vector<double> acc(W);
    std::vector<float> s_row(W), t_row(W), w_row(W);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / H, h = task % H;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t c = 0; c < C; ++c) {
        const float* sr = row_f32(s.at(b, c, h, 0), s.sw, W, s_row.data());
        const float* tr = row_f32(t.at(b, c, h, 0), t.sw, W, t_row.data());
        if (has_w) {
          const float* wr = row_f32(wv.at(b, c, h, 0), wv.sw, W, w_row.data());
          for (int64_t w = 0; w < W; ++w) acc[w] += static_cast<double>(wr[w] * ell<K>(sr[w] - tr[w]));
        } else {
          for (int64_t w = 0; w < W; ++w) acc[w] += static_cast<double>(ell<K>(sr[w] - tr[w]));
        }
      }
      double sum = 0.0;
      for (int64_t w = 0; w < W; ++w) sum += acc[w];
      partial[task] = sum;
    }
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

at::Tensor weighted_kd_forward_cpu(const at::Tensor& S, const at::Tensor& T, const c10::optional<at::Tensor>& weight,
                                   c10::string_view kd_loss, c10::string_view reduction) {
  const char* op = "weighted_kd_forward";
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

// Tasks are (weight image bw, row h): each walks the image rows that share the
// weight row(s) (all b when the weight broadcasts over B, else b = bw; all c),
// writing dS/dT per element and summing ell(d) per weight element in (b, c)
// order. Without a weight gradient every (b, h) is its own task.
template <typename scalar_t, int K>
void weighted_kd_backward_impl(float scale, const at::Tensor& S, const at::Tensor& T, const at::Tensor& w4,
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
  cpu::parallel_tasks(0, task_b * H, grain, [&](int64_t t0, int64_t t1) {
    std::vector<double> acc(need_w ? wC * W : 0);
    std::vector<float> s_row(W), t_row(W), w_row(W), v_row(W);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t tb = task / H, h = task % H;
      const int64_t b0 = task_b == B ? tb : 0, b1 = task_b == B ? tb + 1 : B;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t c = 0; c < C; ++c) {
          const float* sr = row_f32(s.at(b, c, h, 0), s.sw, W, s_row.data());
          const float* tr = row_f32(t.at(b, c, h, 0), t.sw, W, t_row.data());
          if (need_grad) {
            if (has_w) {
              const float* wr = row_f32(wv.at(b, c, h, 0), wv.sw, W, w_row.data());
              for (int64_t w = 0; w < W; ++w) v_row[w] = (scale * wr[w]) * ell_grad<K>(sr[w] - tr[w]);
            } else {
              for (int64_t w = 0; w < W; ++w) v_row[w] = scale * ell_grad<K>(sr[w] - tr[w]);
            }
            if (ds) scatter_row(v_row.data(), o_s.at(b, c, h, 0), o_s.sw, W, 1.f);
            if (dt) scatter_row(v_row.data(), o_t.at(b, c, h, 0), o_t.sw, W, -1.f);
          }
          if (need_w) {
            double* a_row = acc.data() + (wC == 1 ? 0 : c) * W;
            for (int64_t w = 0; w < W; ++w) a_row[w] += static_cast<double>(ell<K>(sr[w] - tr[w]));
          }
        }
      }
      if (!need_w) continue;
      for (int64_t c = 0; c < wC; ++c)
        for (int64_t w = 0; w < W; ++w)
          dw[((tb * wC + c) * H + h) * W + w] = static_cast<float>(static_cast<double>(scale) * acc[c * W + w]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> weighted_kd_backward_cpu(
    const at::Tensor& grad, const at::Tensor& S, const at::Tensor& T, const c10::optional<at::Tensor>& weight,
    c10::string_view kd_loss, c10::string_view reduction, bool need_s, bool need_t, bool need_w) {
  const char* op = "weighted_kd_backward";
  check_images(op, S, T, nullptr);
  const int kind = parse_kind(std::string(kd_loss.data(), kd_loss.size()));
  const bool mean = parse_mean(std::string(reduction.data(), reduction.size()));
  TORCH_CHECK_VALUE(grad.numel() == 1, op, ": grad must hold one value, got shape ", grad.sizes());
  const at::Tensor w4 = weight.has_value() ? weight4(op, *weight, S) : at::Tensor();
  need_w = need_w && weight.has_value();
  at::Tensor ds = need_s ? at::empty_like(S) : at::empty({0}, S.options());
  at::Tensor dt = need_t ? at::empty_like(T) : at::empty({0}, T.options());
  // dweight is computed in float32 as [Bw, Cw, H, W], then given the weight's shape and dtype.
  at::Tensor dw32 = need_w ? at::empty(w4.sizes(), S.options().dtype(at::kFloat))
                           : at::empty({0}, (weight.has_value() ? *weight : S).options());
  if (need_s || need_t || need_w) {
    // Host read of a CPU scalar: no device synchronisation involved.
    const double g = grad.to(at::kDouble).item<double>();
    const float scale = static_cast<float>(mean ? g / static_cast<double>(S.numel()) : g);
    if (S.numel() == 0) {
      if (need_w) dw32.zero_();
    } else {
      dispatch(S.scalar_type(), kind, [&](auto zero, auto k) {
        weighted_kd_backward_impl<decltype(zero), decltype(k)::value>(
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

TORCH_LIBRARY_IMPL(spark_ext, CPU, m) {
  m.impl("difficulty_forward", &spark_ext::difficulty_forward_cpu);
  m.impl("cell_kd_forward", &spark_ext::cell_kd_forward_cpu);
  m.impl("cell_kd_backward", &spark_ext::cell_kd_backward_cpu);
  m.impl("weighted_kd_forward", &spark_ext::weighted_kd_forward_cpu);
  m.impl("weighted_kd_backward", &spark_ext::weighted_kd_backward_cpu);
}
