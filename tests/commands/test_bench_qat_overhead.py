"""The QAT-step and call-overhead benchmarks' parts: hand-built models, like-for-like set-up, timing rows."""

import argparse

import pytest
import torch

from spark_ext.benchmarks import bench_call_overhead, bench_distill_variants, bench_qat_step, qat_models

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.mark.parametrize(
    "name, params, fake_quants",
    [("resnet18", 11_689_512, 51), ("mobilenet_v2", 3_504_872, 124)],
)
def test_hand_built_models_match_torchvision_and_prepare_for_qat(name, params, fake_quants):
    model, where = qat_models.build(name, "bench")
    assert where == "spark_ext.benchmarks.qat_models"
    assert sum(p.numel() for p in model.parameters()) == params  # torchvision's published counts
    step, _, n_fq = bench_qat_step.build(name, "ours", "bench", 2, 64, torch.device("cpu"))
    assert n_fq == fake_quants
    assert torch.isfinite(step())


def test_both_fake_quants_train_the_same_model_from_the_same_start():
    """The comparison is like for like: same weights, same sized qparams, and (the forward being bitwise
    torch's) the same first loss."""
    steps = {
        impl: bench_qat_step.build("resnet18", impl, "bench", 2, 64, torch.device("cpu")) for impl in ("ours", "torch")
    }
    losses = {impl: step() for impl, (step, _, _) in steps.items()}
    assert steps["ours"][2] == steps["torch"][2] == 51
    torch.testing.assert_close(losses["ours"], losses["torch"], rtol=0, atol=0)


def test_build_rejects_an_unknown_model_or_source():
    with pytest.raises(ValueError, match="model must be one of"):
        qat_models.build("vgg")
    with pytest.raises(ValueError, match="source must be"):
        qat_models.build("resnet18", "hub")


def _args(**kw):
    return argparse.Namespace(**{"sample_ms": 0.2, "group_s": 1e-6, "rounds": 4, "min_rounds": 3, **kw})


def test_call_overhead_rows_interleave_every_implementation_and_give_ratios():
    x = torch.randn(4, 16, requires_grad=True)
    step = torch.full((1,), 0.3, requires_grad=True)
    group = bench_call_overhead.Group("lsq_fake_quant", "tiny 4x16")
    zero = torch.zeros(1)
    group.add(
        "torch",
        "builtin",
        lambda x, s: torch._fake_quantize_learnable_per_tensor_affine(x, s, zero, -8, 7, 1.0),
        [x, step],
    )
    group.add_floor(x)
    rows = bench_call_overhead.time_group(group, "fwd+bwd", torch.device("cpu"), _args(), 1)
    assert [r["impl"] for r in rows] == ["torch", "floor"]
    for r in rows:
        assert r["samples"] == 3 and r["calls_per_sample"] >= 1  # no time for more than min_rounds
        assert 0 < r["ms"] == r["ms_p50"] <= r["ms_p90"] <= r["ms_max"]
    torch_row, floor_row = rows
    assert torch_row["over_torch"] is None and floor_row["over_floor"] is None
    assert floor_row["over_torch"] == pytest.approx(floor_row["ms"] / torch_row["ms"])
    assert torch_row["over_floor"] == pytest.approx(torch_row["ms"] / floor_row["ms"])
    table = bench_call_overhead.markdown_table(rows)
    assert table.splitlines()[0].startswith("| op | case | pass | impl | backend | p50 µs | p90 µs | max µs |")


def test_the_floor_is_a_clone_with_a_pass_through_gradient_and_upstream_is_not_ones():
    x = torch.randn(3, 5, requires_grad=True)
    y = bench_call_overhead.floor_clone(x)
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()
    group = bench_call_overhead.Group("floor", "c")
    group.add_floor(x)
    (grad,) = group.impls["floor"][1]["fwd+bwd"]()
    assert grad.shape == x.shape and not torch.equal(grad, torch.ones_like(grad))  # a random upstream gradient


def test_distill_variants_takes_the_shared_options_and_rejects_bad_variants(tmp_path, capsys):
    # `spark-ext bench` runs every script with --out and --quick, which this one did not accept.
    for variants in ("qat", "kd,nope"):
        with pytest.raises(SystemExit) as info:
            bench_distill_variants.main(["--quick", "--out", str(tmp_path), "--variants", variants])
        assert info.value.code == 2
        assert "argument --variants: needs kd" in capsys.readouterr().err
