"""Restoration networks: shapes, hook points, gradients."""

import pytest
import torch

from spark_ext.models import EncoderDecoderNet, ResidualSRNet, build_model, feature_layer


@pytest.mark.parametrize("size", [(8, 8), (7, 9), (1, 1)])
def test_encoder_decoder_keeps_size(size):
    net = EncoderDecoderNet(width=4, depth=1)
    x = torch.rand(2, 3, *size, requires_grad=True)
    y = net(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in net.parameters())


def test_sr_net_upsamples_and_starts_near_bicubic():
    net = ResidualSRNet(width=4, blocks=1, scale=2)
    x = torch.rand(1, 3, 5, 6)
    assert net(x).shape == (1, 3, 10, 12)


def test_feature_layers_exist_and_widths_scale():
    for task, name in (("denoise", "bottleneck"), ("sr", "body")):
        small, big = build_model(task, width=4, depth=1), build_model(task, width=8, depth=1)
        assert feature_layer(small) == name and isinstance(dict(small.named_modules())[name], torch.nn.Module)
        assert sum(p.numel() for p in big.parameters()) > sum(p.numel() for p in small.parameters())
    with pytest.raises(ValueError, match="task"):
        build_model("deblur")
    with pytest.raises(ValueError, match="width"):
        EncoderDecoderNet(width=0)
