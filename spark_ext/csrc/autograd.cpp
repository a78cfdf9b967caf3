// Autograd kernels of the compiled ops, registered for the Autograd key: a
// differentiable call goes from torch.ops straight to the CPU/CUDA kernel and
// back through C++ (as torch's own ops and torchvision's csrc/ops/autograd do),
// with no Python autograd wrapper on the way.
//
// Each forward op records what its backward op needs and redispatches below
// autograd; the backward calls the fused backward op through the dispatcher.
// The backward ops compute first derivatives only: differentiated again (double
// backward, e.g. a gradient penalty or a Hessian-vector product), they raise a
// RuntimeError naming the op, as torch's learnable fake quant does, instead of
// returning a silently wrong gradient. The reference backend
// (spark_ext/reference.py) differentiates twice.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <initializer_list>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

namespace spark_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensor = at::Tensor;
using OptTensor = std::optional<Tensor>;

template <class Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// An autograd node owned the way this torch owns them (a std::shared_ptr in
// older torch, a c10::intrusive_ptr in newer).
template <class T, class... Args>
auto make_node(Args&&... args) {
  using NodePtr = decltype(torch::autograd::Edge::function);
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>) {
    return std::make_shared<T>(std::forward<Args>(args)...);
  } else {
    return c10::make_intrusive<T>(std::forward<Args>(args)...);
  }
}

// Whether autograd has anything to record: as torch's generated kernels do, a call
// that needs no graph skips the autograd Function (its node, saved tensors, wrapping).
bool any_requires_grad(std::initializer_list<const Tensor*> inputs) {
  if (!at::GradMode::is_enabled()) return false;
  for (const Tensor* t : inputs) {
    if (t->defined() && t->requires_grad()) return true;
  }
  return false;
}

// The backward ops compute first derivatives only. Where autograd records a graph
// through one (create_graph=True with inputs that require grad), its outputs get a
// node that raises when reached, as torch's own not-implemented derivatives do:
// the first gradient still works, a second one is refused instead of silently wrong.
void record_no_second_derivative(const char* op, const Tensor& a, const Tensor& b, const Tensor& c, const Tensor& d,
                                 std::initializer_list<Tensor*> outputs) {
  if (!any_requires_grad({&a, &b, &c, &d})) return;
  auto node = make_node<torch::autograd::Error>(
      std::string("spark_ext: ") + op +
          " has no second derivative on the compiled backends (a gradient of its gradient was asked for: "
          "backward(create_graph=True) then backward again, a gradient penalty, a Hessian-vector product); "
          "use backend='reference' for higher-order gradients",
      torch::autograd::collect_next_edges(a, b, c, d));
  for (Tensor* t : outputs) {
    if (t->defined() && torch::autograd::isDifferentiableType(t->scalar_type())) torch::autograd::set_history(*t, node);
  }
}

const Tensor& or_undefined(const OptTensor& t) {
  static const Tensor undefined;
  return t.has_value() ? *t : undefined;
}

OptTensor to_optional(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// ---------------------------------------------------------------------------
// Fake quantization, docs/spec.md §5a and §5b. Both families share the shape of
// their schemas: op(x, p0, p1, axis, lo, hi, grad_factor) -> y and
// op_backward(grad, x, p0, p1, axis, lo, hi, grad_factor) -> (dx, dp0, dp1),
// with p1 a Tensor (zero point) or an optional Tensor (LSQ+ offset).
// ---------------------------------------------------------------------------

template <class P1>
using FqForwardSig = Tensor(const Tensor&, const Tensor&, const P1&, std::optional<int64_t>, int64_t, int64_t, double);
template <class P1>
using FqBackwardSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const P1&,
                                                         std::optional<int64_t>, int64_t, int64_t, double);

struct TorchCompatOp {  // fake_quantize_learnable: p1 is the zero point (float, or integer without gradient)
  using P1 = Tensor;
  static constexpr const char* kName = "spark_ext::fake_quantize_learnable";
  static constexpr const char* kBackward = "spark_ext::fake_quantize_learnable_backward";
  static const Tensor& tensor(const P1& p1) { return p1; }
  static P1 from_saved(const Tensor& t) { return t; }
};

struct LsqOp {  // lsq_fake_quant: p1 is the optional LSQ+ offset
  using P1 = OptTensor;
  static constexpr const char* kName = "spark_ext::lsq_fake_quant";
  static constexpr const char* kBackward = "spark_ext::lsq_fake_quant_backward";
  static const Tensor& tensor(const P1& p1) { return or_undefined(p1); }
  static P1 from_saved(const Tensor& t) { return to_optional(t); }
};

template <class Op>
struct FakeQuantFunction : public torch::autograd::Function<FakeQuantFunction<Op>> {
  using P1 = typename Op::P1;

  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& p0, const P1& p1,
                        std::optional<int64_t> axis, int64_t lo, int64_t hi, double grad_factor) {
    static const auto op = find_op<FqForwardSig<P1>>(Op::kName);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Tensor y = op.call(x, p0, p1, axis, lo, hi, grad_factor);
    ctx->save_for_backward({x, p0, Op::tensor(p1)});
    ctx->saved_data["axis"] = axis;
    ctx->saved_data["lo"] = lo;
    ctx->saved_data["hi"] = hi;
    ctx->saved_data["grad_factor"] = grad_factor;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<FqBackwardSig<P1>>(Op::kBackward);
    const variable_list saved = ctx->get_saved_variables();
    auto [dx, dp0, dp1] =
        op.call(grads[0], saved[0], saved[1], Op::from_saved(saved[2]), ctx->saved_data["axis"].toOptional<int64_t>(),
                ctx->saved_data["lo"].toInt(), ctx->saved_data["hi"].toInt(), ctx->saved_data["grad_factor"].toDouble());
    // An input that does not need a gradient (an integer zero point) gets none; an absent
    // offset has no autograd edge (needs_input_grad counts the tensors given).
    return {ctx->needs_input_grad(0) ? dx : Tensor(),
            ctx->needs_input_grad(1) ? dp0 : Tensor(),
            saved[2].defined() && ctx->needs_input_grad(2) ? dp1 : Tensor(),
            Tensor(),
            Tensor(),
            Tensor(),
            Tensor()};
  }
};

template <class Op>
Tensor fake_quant_autograd(const Tensor& x, const Tensor& p0, const typename Op::P1& p1, std::optional<int64_t> axis,
                           int64_t lo, int64_t hi, double grad_factor) {
  if (any_requires_grad({&x, &p0, &Op::tensor(p1)})) {
    return FakeQuantFunction<Op>::apply(x, p0, p1, axis, lo, hi, grad_factor);
  }
  static const auto op = find_op<FqForwardSig<typename Op::P1>>(Op::kName);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(x, p0, p1, axis, lo, hi, grad_factor);
}

template <class Op>
std::tuple<Tensor, Tensor, Tensor> fake_quant_backward_autograd(const Tensor& grad, const Tensor& x, const Tensor& p0,
                                                                const typename Op::P1& p1,
                                                                std::optional<int64_t> axis, int64_t lo, int64_t hi,
                                                                double grad_factor) {
  static const auto op = find_op<FqBackwardSig<typename Op::P1>>(Op::kBackward);
  Tensor dx, dp0, dp1;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::tie(dx, dp0, dp1) = op.call(grad, x, p0, p1, axis, lo, hi, grad_factor);
  }
  record_no_second_derivative(Op::kName, grad, x, p0, Op::tensor(p1), {&dx, &dp0, &dp1});
  return {dx, dp0, dp1};
}

// ---------------------------------------------------------------------------
// Weighted KD, docs/spec.md §3 (CPU kernels): fused_weighted_kd(S, T, weight?,
// kd_loss, reduction) -> loss, through fused_weighted_kd_backward(g, S, T,
// weight?, kd_loss, reduction, need_s, need_t, need_w) -> (dS, dT, dweight),
// where a gradient not needed is an empty [0] tensor.
// ---------------------------------------------------------------------------

using WeightedKdSig = Tensor(const Tensor&, const Tensor&, const OptTensor&, c10::string_view, c10::string_view);
using WeightedKdBackwardSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                 const OptTensor&, c10::string_view, c10::string_view,
                                                                 bool, bool, bool);

struct WeightedKdFunction : public torch::autograd::Function<WeightedKdFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& student, const Tensor& teacher, const OptTensor& weight,
                        c10::string_view kd_loss, c10::string_view reduction) {
    static const auto op = find_op<WeightedKdSig>("spark_ext::fused_weighted_kd");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Tensor loss = op.call(student, teacher, weight, kd_loss, reduction);
    ctx->save_for_backward({student, teacher, or_undefined(weight)});
    ctx->saved_data["kd_loss"] = std::string(kd_loss);
    ctx->saved_data["reduction"] = std::string(reduction);
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<WeightedKdBackwardSig>("spark_ext::fused_weighted_kd_backward");
    const variable_list saved = ctx->get_saved_variables();
    const bool need_s = ctx->needs_input_grad(0), need_t = ctx->needs_input_grad(1);
    const bool need_w = saved[2].defined() && ctx->needs_input_grad(2);
    variable_list out(5);
    if (!(need_s || need_t || need_w)) return out;
    auto [ds, dt, dw] = op.call(grads[0], saved[0], saved[1], to_optional(saved[2]),
                                ctx->saved_data["kd_loss"].toStringView(), ctx->saved_data["reduction"].toStringView(),
                                need_s, need_t, need_w);
    if (need_s) out[0] = ds;
    if (need_t) out[1] = dt;
    if (need_w) out[2] = dw;
    return out;
  }
};

Tensor weighted_kd_autograd(const Tensor& student, const Tensor& teacher, const OptTensor& weight,
                            c10::string_view kd_loss, c10::string_view reduction) {
  if (any_requires_grad({&student, &teacher, &or_undefined(weight)})) {
    return WeightedKdFunction::apply(student, teacher, weight, kd_loss, reduction);
  }
  static const auto op = find_op<WeightedKdSig>("spark_ext::fused_weighted_kd");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(student, teacher, weight, kd_loss, reduction);
}

std::tuple<Tensor, Tensor, Tensor> weighted_kd_backward_autograd(const Tensor& grad, const Tensor& student,
                                                                 const Tensor& teacher, const OptTensor& weight,
                                                                 c10::string_view kd_loss, c10::string_view reduction,
                                                                 bool need_student, bool need_teacher,
                                                                 bool need_weight) {
  static const auto op = find_op<WeightedKdBackwardSig>("spark_ext::fused_weighted_kd_backward");
  Tensor ds, dt, dw;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::tie(ds, dt, dw) =
        op.call(grad, student, teacher, weight, kd_loss, reduction, need_student, need_teacher, need_weight);
  }
  record_no_second_derivative("spark_ext::fused_weighted_kd", grad, student, teacher, or_undefined(weight),
                              {&ds, &dt, &dw});
  return {ds, dt, dw};
}

// ---------------------------------------------------------------------------
// Difficulty signals, docs/spec.md §2 (CPU kernels): difficulty_signals(S, T, Y,
// gh, gw, kd_loss) -> (signals, cell_kd) and cell_kd(S, T, gh, gw, kd_loss) ->
// cell_kd; only cell_kd is differentiable (w.r.t. S and T), through
// cell_kd_backward(G, S, T, kd_loss, need_s, need_t) -> (dS, dT).
// ---------------------------------------------------------------------------

using SignalsSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t,
                                              c10::string_view);
using CellKdSig = Tensor(const Tensor&, const Tensor&, int64_t, int64_t, c10::string_view);
using CellKdBackwardSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, c10::string_view,
                                                     bool, bool);

// The backward shared by both forward ops: S and T are the first two inputs.
variable_list cell_kd_grads(AutogradContext* ctx, const Tensor& grad_cell_kd, size_t num_inputs) {
  static const auto op = find_op<CellKdBackwardSig>("spark_ext::cell_kd_backward");
  variable_list out(num_inputs);
  const bool need_s = ctx->needs_input_grad(0), need_t = ctx->needs_input_grad(1);
  if (!grad_cell_kd.defined() || !(need_s || need_t)) return out;
  const variable_list saved = ctx->get_saved_variables();
  auto [ds, dt] =
      op.call(grad_cell_kd, saved[0], saved[1], ctx->saved_data["kd_loss"].toStringView(), need_s, need_t);
  if (need_s) out[0] = ds;
  if (need_t) out[1] = dt;
  return out;
}

struct SignalsFunction : public torch::autograd::Function<SignalsFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& student, const Tensor& teacher,
                               const Tensor& target, int64_t gh, int64_t gw, c10::string_view kd_loss) {
    static const auto op = find_op<SignalsSig>("spark_ext::difficulty_signals");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [signals, cell_kd] = op.call(student, teacher, target, gh, gw, kd_loss);
    ctx->save_for_backward({student, teacher});
    ctx->saved_data["kd_loss"] = std::string(kd_loss);
    ctx->mark_non_differentiable({signals});  // docs/spec.md §2: the signals carry no gradient
    // cell_kd's gradient may be absent (only the signals used): keep it undefined, not zeros.
    ctx->set_materialize_grads(false);
    return {signals, cell_kd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) { return cell_kd_grads(ctx, grads[1], 6); }
};

struct CellKdFunction : public torch::autograd::Function<CellKdFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& student, const Tensor& teacher, int64_t gh, int64_t gw,
                        c10::string_view kd_loss) {
    static const auto op = find_op<CellKdSig>("spark_ext::cell_kd");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Tensor cell_kd = op.call(student, teacher, gh, gw, kd_loss);
    ctx->save_for_backward({student, teacher});
    ctx->saved_data["kd_loss"] = std::string(kd_loss);
    return cell_kd;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) { return cell_kd_grads(ctx, grads[0], 5); }
};

std::tuple<Tensor, Tensor> signals_autograd(const Tensor& student, const Tensor& teacher, const Tensor& target,
                                            int64_t gh, int64_t gw, c10::string_view kd_loss) {
  if (!any_requires_grad({&student, &teacher})) {
    static const auto op = find_op<SignalsSig>("spark_ext::difficulty_signals");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return op.call(student, teacher, target, gh, gw, kd_loss);
  }
  variable_list out = SignalsFunction::apply(student, teacher, target, gh, gw, kd_loss);
  return {out[0], out[1]};
}

Tensor cell_kd_autograd(const Tensor& student, const Tensor& teacher, int64_t gh, int64_t gw,
                        c10::string_view kd_loss) {
  if (!any_requires_grad({&student, &teacher})) {
    static const auto op = find_op<CellKdSig>("spark_ext::cell_kd");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return op.call(student, teacher, gh, gw, kd_loss);
  }
  return CellKdFunction::apply(student, teacher, gh, gw, kd_loss);
}

std::tuple<Tensor, Tensor> cell_kd_backward_autograd(const Tensor& grad, const Tensor& student, const Tensor& teacher,
                                                     c10::string_view kd_loss, bool need_student, bool need_teacher) {
  static const auto op = find_op<CellKdBackwardSig>("spark_ext::cell_kd_backward");
  Tensor ds, dt;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::tie(ds, dt) = op.call(grad, student, teacher, kd_loss, need_student, need_teacher);
  }
  record_no_second_derivative("spark_ext::cell_kd", grad, student, teacher, Tensor(), {&ds, &dt});
  return {ds, dt};
}

}  // namespace
}  // namespace spark_ext

// The ops' schemas are defined in Python (SCHEMAS in spark_ext/ops/<family>.py) before this library loads.
TORCH_LIBRARY_IMPL(spark_ext, Autograd, m) {
  using namespace spark_ext;
  m.impl("fake_quantize_learnable", &fake_quant_autograd<TorchCompatOp>);
  m.impl("fake_quantize_learnable_backward", &fake_quant_backward_autograd<TorchCompatOp>);
  m.impl("lsq_fake_quant", &fake_quant_autograd<LsqOp>);
  m.impl("lsq_fake_quant_backward", &fake_quant_backward_autograd<LsqOp>);
  m.impl("fused_weighted_kd", &weighted_kd_autograd);
  m.impl("fused_weighted_kd_backward", &weighted_kd_backward_autograd);
  m.impl("difficulty_signals", &signals_autograd);
  m.impl("cell_kd", &cell_kd_autograd);
  m.impl("cell_kd_backward", &cell_kd_backward_autograd);
}
