"""ResNet-18 and MobileNetV2 as ``torchvision.models.quantization`` builds them, without torchvision.

The QAT-step benchmarks (bench_qat_step.py, the GPU check) need real models on
machines where torchvision is missing or does not match torch. These are the
quantizable variants (``QuantizableResNet`` with ``QuantizableBasicBlock``,
``QuantizableMobileNetV2``): same layers, shapes, parameter counts (11,689,512
and 3,504,872 at 1000 classes), initialisation scheme and ``fuse_model``
groups; ``QuantStub`` / ``DeQuantStub`` around the network and
``FloatFunctional`` residual adds, so ``prepare_qat`` puts fake quants exactly
where it puts them in torchvision's. MobileNetV2 uses ReLU, not ReLU6, as the
quantizable torchvision model does (ReLU fuses with conv + BN).

Input ``[B, 3, H, W]`` float32 (H, W >= 32), output ``[B, num_classes]`` logits.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub, fuse_modules, fuse_modules_qat


def _fuse(is_qat: bool):
    return fuse_modules_qat if is_qat else fuse_modules


class BasicBlock(nn.Module):
    """ResNet's two 3x3 convs with a residual add (and a 1x1 projection when the shape changes)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: Optional[nn.Sequential] = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        self.add_relu = FloatFunctional()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.add_relu.add_relu(out, identity)

    def fuse_model(self, is_qat: bool = False) -> None:
        _fuse(is_qat)(self, [["conv1", "bn1", "relu"], ["conv2", "bn2"]], inplace=True)
        if self.downsample is not None:
            _fuse(is_qat)(self.downsample, ["0", "1"], inplace=True)


class ResNet18(nn.Module):
    """torchvision's quantizable ``resnet18``: 7x7 stem, four stages of two basic blocks, global pool, fc."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers, inplanes = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(BasicBlock(inplanes, planes, stride), BasicBlock(planes, planes)))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.quant(x)))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.dequant(self.fc(torch.flatten(self.avgpool(x), 1)))

    def fuse_model(self, is_qat: bool = False) -> None:
        _fuse(is_qat)(self, ["conv1", "bn1", "relu"], inplace=True)
        for m in self.modules():
            if isinstance(m, BasicBlock):
                m.fuse_model(is_qat)


def _conv_bn_relu(inp: int, out: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """MobileNetV2's expand (1x1) -> depthwise (3x3) -> project (1x1, no activation), residual when shapes match."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers = [_conv_bn_relu(inp, hidden, 1)] if expand_ratio != 1 else []
        layers += [
            _conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.skip_add = FloatFunctional()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip_add.add(x, self.conv(x)) if self.use_res_connect else self.conv(x)

    def fuse_model(self, is_qat: bool = False) -> None:
        for idx, m in enumerate(self.conv):
            if type(m) is nn.Conv2d:
                _fuse(is_qat)(self.conv, [str(idx), str(idx + 1)], inplace=True)


# (expansion t, output channels c, repeats n, first stride s): torchvision's width 1.0 table
MOBILENET_V2_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2))
MOBILENET_V2_SETTING += ((6, 320, 1, 1),)


class MobileNetV2(nn.Module):
    """torchvision's quantizable ``mobilenet_v2`` (width 1.0): 17 inverted residuals, 1280-wide head."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        features: list[nn.Module] = [_conv_bn_relu(3, 32, 3, 2)]
        inp = 32
        for t, c, n, s in MOBILENET_V2_SETTING:
            for i in range(n):
                features.append(InvertedResidual(inp, c, s if i == 0 else 1, t))
                inp = c
        features.append(_conv_bn_relu(inp, 1280, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.quant(x))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.dequant(self.classifier(x))

    def fuse_model(self, is_qat: bool = False) -> None:
        for m in self.modules():
            if type(m) is nn.Sequential and len(m) == 3 and isinstance(m[2], nn.ReLU):
                _fuse(is_qat)(m, ["0", "1", "2"], inplace=True)
            elif isinstance(m, InvertedResidual):
                m.fuse_model(is_qat)


MODELS = {"resnet18": ResNet18, "mobilenet_v2": MobileNetV2}


def build(name: str, source: str = "auto", num_classes: int = 1000) -> tuple[nn.Module, str]:
    """``(model, where it came from)``: torchvision's quantizable model when ``source`` allows and it imports,
    else the one above. ``source``: ``"auto"``, ``"torchvision"`` (raises ImportError without it), ``"bench"``."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    if source not in ("auto", "torchvision", "bench"):
        raise ValueError(f"source must be 'auto', 'torchvision' or 'bench', got {source!r}")
    if source != "bench":
        try:
            from torchvision.models import quantization as tvq
        except Exception:  # not installed, or a build that does not match torch (its ops fail to register)
            if source == "torchvision":
                raise ImportError("torchvision's quantizable models cannot be imported here") from None
        else:
            return getattr(tvq, name)(weights=None, quantize=False, num_classes=num_classes), "torchvision"
    return MODELS[name](num_classes), "spark_ext.benchmarks.qat_models"
