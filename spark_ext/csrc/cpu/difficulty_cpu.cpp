// CPU kernels for docs/spec.md §2: difficulty signals, cell_kd and its backward
// (cell_kd also serves fused_weighted_kd's grid weights). Ops (registered at
// the end of this file; fakes and autograd in spark_ext/ops/difficulty.py):
//
//   difficulty_signals(S, T, Y, gh, gw, kd_loss) -> (signals [B,4,gh,gw], cell_kd [B,1,gh,gw])
//   cell_kd(S, T, gh, gw, kd_loss)       -> cell_kd (reads S and T only)
//   cell_kd_backward(G, S, T, kd_loss, need_s, need_t) -> (dS, dT)
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
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include "huge_page_allocator.h"
#include "image_rows.h"
#include "parallel.h"

namespace spark_ext {
namespace {

using namespace image;

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

// --------------------------------------------------------------------------
// docs/spec.md §2 forward
// --------------------------------------------------------------------------

template <typename scalar_t, int K, bool SIGNALS>
void difficulty_signals_impl(const at::Tensor& S, const at::Tensor& T, const at::Tensor* Y, int64_t gh, int64_t gw,
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
        difficulty_signals_impl<scalar_t, K, true>(S, T, Y, gh, gw, sig.data_ptr<float>(), cell_kd.data_ptr<float>());
      } else {
        difficulty_signals_impl<scalar_t, K, false>(S, T, Y, gh, gw, nullptr, cell_kd.data_ptr<float>());
      }
    });
  }
  return {sig, cell_kd};
}

std::tuple<at::Tensor, at::Tensor> difficulty_signals_cpu(const at::Tensor& S, const at::Tensor& T,
                                                          const at::Tensor& Y, int64_t gh, int64_t gw,
                                                          c10::string_view kd_loss) {
  return run_difficulty_forward("difficulty_signals", S, T, &Y, gh, gw, std::string(kd_loss.data(), kd_loss.size()));
}

at::Tensor cell_kd_cpu(const at::Tensor& S, const at::Tensor& T, int64_t gh, int64_t gw,
                               c10::string_view kd_loss) {
  const std::string kind(kd_loss.data(), kd_loss.size());
  return std::get<1>(run_difficulty_forward("cell_kd", S, T, nullptr, gh, gw, kind));
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
  at::Tensor ds = need_s ? cpu::empty_output_like(S) : at::empty({0}, S.options());
  at::Tensor dt = need_t ? cpu::empty_output_like(T) : at::empty({0}, T.options());
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

}  // namespace
}  // namespace spark_ext

// Schemas: SCHEMAS in spark_ext/ops/difficulty.py (shared with the Triton ops).
TORCH_LIBRARY_IMPL(spark_ext, CPU, m) {
  m.impl("difficulty_signals", &spark_ext::difficulty_signals_cpu);
  m.impl("cell_kd", &spark_ext::cell_kd_cpu);
  m.impl("cell_kd_backward", &spark_ext::cell_kd_backward_cpu);
}
