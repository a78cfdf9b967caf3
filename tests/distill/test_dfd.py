"""Decoder-free distillation: hooks, loss, stop-gradient, errors, inside the distiller."""

import pytest
import torch

from spark_ext.distill import DecoderFreeDistillation, SparkDistiller, find_module
from spark_ext.models import EncoderDecoderNet


def pair():
    torch.manual_seed(0)
    teacher = EncoderDecoderNet(width=4, depth=1)
    student = EncoderDecoderNet(width=4, depth=1)
    return student, teacher


def test_loss_is_l1_of_bottleneck_features_with_stop_gradient():
    student, teacher = pair()
    feats = {}
    student.bottleneck.register_forward_hook(lambda m, i, o: feats.__setitem__("s", o))
    teacher.bottleneck.register_forward_hook(lambda m, i, o: feats.__setitem__("t", o))
    dfd = DecoderFreeDistillation(student, [teacher], "bottleneck")
    x = torch.rand(2, 3, 8, 8)
    student(x)
    teacher(x)
    loss = dfd.loss(dfd.teacher_features())
    torch.testing.assert_close(loss, (feats["s"] - feats["t"]).abs().mean())
    loss.backward()
    assert student.bottleneck[0].weight.grad is not None
    assert teacher.bottleneck[0].weight.grad is None  # sg(F_t)
    dfd.close()


def test_ensemble_features_are_averaged():
    student, t1 = pair()
    t2 = EncoderDecoderNet(width=4, depth=1)
    dfd = DecoderFreeDistillation(student, [t1, t2], "bottleneck")
    x = torch.rand(1, 3, 6, 6)
    with torch.no_grad():
        t1(x)
        f1 = dfd.teacher_taps[0].output
        t2(x)
        f2 = dfd.teacher_taps[1].output
    torch.testing.assert_close(dfd.teacher_features(), (f1 + f2) / 2)


def test_missing_layer_and_wrapper_prefix():
    student, teacher = pair()
    with pytest.raises(ValueError, match="'neck'.*student"):
        DecoderFreeDistillation(student, [teacher], "neck")

    class Wrapper(torch.nn.Module):  # like DDP: the model is under .module
        def __init__(self, m):
            super().__init__()
            self.module = m

    assert find_module(Wrapper(student), "bottleneck") is student.bottleneck


def test_feature_shape_mismatch_is_an_error():
    student = EncoderDecoderNet(width=4, depth=1)
    teacher = EncoderDecoderNet(width=8, depth=1)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    d = SparkDistiller(student, teacher, opt, mode="kd", dfd_layer="bottleneck")
    with pytest.raises(ValueError, match="bottleneck.*differ"):
        d.step(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))


@pytest.mark.parametrize("mode", ["kd", "spark"])
def test_distiller_uses_feature_kd_only(mode):
    student, teacher = pair()
    opt = torch.optim.SGD(student.parameters(), lr=0.0)  # lr 0: the model stays put, loss is checkable
    d = SparkDistiller(student, teacher, opt, mode=mode, dfd_layer="bottleneck", grid=(2, 2), policy_signal="paper")
    seen = {}
    if mode == "spark":  # record the weight map the step uses
        original = d.policy.weight_map
        d.policy.weight_map = lambda a: seen.setdefault("w", original(a))
    x, y = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    log = d.step(x, y)
    taps = {}
    student.bottleneck.register_forward_hook(lambda m, i, o: taps.__setitem__("s", o))
    teacher.bottleneck.register_forward_hook(lambda m, i, o: taps.__setitem__("t", o))
    with torch.no_grad():
        out = student(x)
        teacher(x)
    diff = (taps["s"] - taps["t"]).abs()  # [2, 8, 4, 4] bottleneck features
    if mode == "kd":
        expected = diff.mean()
    else:  # the [2, 1, 2, 2] map, piecewise constant over 2x2-pixel cells of the 4x4 features
        assert seen["w"].shape == (2, 1, 2, 2)
        w = seen["w"].repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
        expected = (w * diff).mean()
        assert abs(float(expected) - float(diff.mean())) > 1e-6  # the weights do matter here
    assert log["loss_kd"] == pytest.approx(float(expected), rel=1e-5)
    assert log["loss_task"] == pytest.approx(float((out - y).abs().mean()), rel=1e-5)
    d.close()


def test_grid_larger_than_the_feature_map_is_a_clear_error():
    # Issue 10, defect 11: this said "weight of shape ... is neither per-pixel", though no weight was passed.
    student, teacher = pair()
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    d = SparkDistiller(student, teacher, opt, mode="spark", dfd_layer="bottleneck", grid=(8, 8))
    with pytest.raises(ValueError, match=r"SPARK grid \(8, 8\) is larger than the layer's feature map \(4, 4\)"):
        d.step(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8))
    d.close()
