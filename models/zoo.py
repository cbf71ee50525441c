"""A small zoo of PyTorch models for spa's tests and benchmarks.

This is a plain module, not part of the installed ``spa`` package: tests and benchmarks put
the repository's ``models/`` folder on ``sys.path`` and ``import zoo``.

Every builder in :data:`BUILDERS` returns ``(module, input_shape)`` with the module in eval
mode and deterministic weights (``torch.manual_seed(0)`` inside each builder). Every
BatchNorm gets random running statistics and affine parameters so it is never the identity:
a pruner that forgets a BN's shift or scale is caught by the oracle.

:func:`export` writes one of them to ONNX with the TorchScript exporter (``dynamo=False``),
which folds Conv+BN in eval mode and yields plain, static-shape graphs.
"""

from __future__ import annotations

import math
import os
import pathlib
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BUILDERS", "Builder", "NAMES", "SLOW", "build", "export", "randomize_batchnorm"]

#: A builder returns (module in eval mode, input shape).
Builder = Callable[[], tuple[nn.Module, tuple[int, ...]]]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm in ``model`` non-trivial statistics and affine parameters.

    ``running_mean`` ~ N(0, 0.1²), ``running_var`` ~ U(0.5, 1.5) (positive), ``weight`` ~
    U(0.5, 1.5), ``bias`` ~ N(0, 0.1²), all drawn from a generator seeded with ``seed``, so
    no BatchNorm is the identity and the magnitudes stay stable through deep nets.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                n = mod.num_features
                assert mod.running_mean is not None and mod.running_var is not None
                mod.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                mod.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                if mod.affine:
                    mod.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                    mod.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    return model


def _finish(model: nn.Module, shape: tuple[int, ...]) -> tuple[nn.Module, tuple[int, ...]]:
    """Randomize BatchNorms, switch to eval mode and pair the model with its input shape."""
    randomize_batchnorm(model)
    model.eval()
    return model, shape


def _conv_bn(
    cin: int,
    cout: int,
    k: int = 3,
    stride: int = 1,
    groups: int = 1,
    act: type[nn.Module] | None = nn.ReLU,
) -> nn.Sequential:
    """Conv2d (no bias, "same" padding) + BatchNorm2d + optional activation."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------------------------
# resnet (small) and resnet50
# ---------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs, residual Add, optional 1x1/stride-2 downsample."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class SmallResNet(nn.Module):
    """Stem, three stages of BasicBlocks (two with downsample shortcuts), GAP, Linear."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 16)
        self.layer1 = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 16))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, 2), BasicBlock(32, 32))
        self.layer3 = nn.Sequential(BasicBlock(32, 64, 2))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(torch.flatten(x, 1))


class Bottleneck(nn.Module):
    """ResNet-50 bottleneck: 1x1 reduce, 3x3 (stride here, as in torchvision v1.5), 1x1 expand."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """The standard ResNet-50 (Bottleneck [3, 4, 6, 3], width 64, 1000 classes)."""

    def __init__(self, layers: tuple[int, ...] = (3, 4, 6, 3), num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        stages: list[nn.Module] = []
        for i, n in enumerate(layers):
            width = 64 * 2**i
            blocks: list[nn.Module] = []
            for j in range(n):
                blocks.append(Bottleneck(cin, width, 2 if (j == 0 and i > 0) else 1))
                cin = width * Bottleneck.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ---------------------------------------------------------------------------------------------
# densenet
# ---------------------------------------------------------------------------------------------


class DenseLayer(nn.Module):
    """Pre-activation dense layer (BN-ReLU-Conv); ``bottleneck`` adds a 1x1 (DenseNet-BC)."""

    def __init__(self, cin: int, growth: int, bottleneck: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.BatchNorm2d(cin), nn.ReLU()]
        if bottleneck:
            mid = 4 * growth
            layers += [nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU()]
            cin = mid
        layers.append(nn.Conv2d(cin, growth, 3, 1, 1, bias=False))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], 1)


class SmallDenseNet(nn.Module):
    """Stem, dense block (plain), transition (BN-ReLU-1x1-AvgPool), dense block (BC), head."""

    def __init__(self, growth: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        c = 16
        self.stem = nn.Conv2d(3, c, 3, 1, 1, bias=False)
        block1: list[nn.Module] = []
        for _ in range(3):
            block1.append(DenseLayer(c, growth))
            c += growth
        self.block1 = nn.Sequential(*block1)
        self.transition = nn.Sequential(
            nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2)
        )
        c //= 2
        block2: list[nn.Module] = []
        for _ in range(2):
            block2.append(DenseLayer(c, growth, bottleneck=True))
            c += growth
        self.block2 = nn.Sequential(*block2)
        self.norm = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.transition(self.block1(self.stem(x))))
        x = F.relu(self.norm(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ---------------------------------------------------------------------------------------------
# mobilenetv2
# ---------------------------------------------------------------------------------------------


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (skipped when t=1), 3x3 depthwise, 1x1 linear project."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn(cin, hidden, 1, act=nn.ReLU6))
        layers.append(_conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6))
        layers.append(_conv_bn(hidden, cout, 1, act=None))
        self.conv = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res else out


class SmallMobileNetV2(nn.Module):
    """Stem (stride 2), five inverted residual blocks (three with residual Add), 1x1, head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 16, 3, 2, act=nn.ReLU6)
        self.blocks = nn.Sequential(
            InvertedResidual(16, 16, 1, 1),
            InvertedResidual(16, 24, 2, 4),
            InvertedResidual(24, 24, 1, 4),
            InvertedResidual(24, 32, 2, 4),
            InvertedResidual(32, 32, 1, 4),
        )
        self.last = _conv_bn(32, 128, 1, act=nn.ReLU6)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.last(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ---------------------------------------------------------------------------------------------
# shufflenet v2
# ---------------------------------------------------------------------------------------------


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet channel shuffle with static Reshape targets.

    Channel and spatial sizes are Python ints, so the exported Reshapes take constant shapes
    ``[-1, g, c/g, h, w]`` and ``[-1, c, h, w]``; the batch is ``-1`` so a dynamic-batch
    export still works.
    """
    _, c, h, w = (int(s) for s in x.shape)
    x = x.view(-1, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(-1, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit: stride 1 splits channels in two (chunk); stride 2 uses both branches."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        mid = cout // 2
        if stride == 1:
            assert cin == cout
            bin_ = cin // 2
            self.branch1: nn.Module | None = None
        else:
            bin_ = cin
            self.branch1 = nn.Sequential(
                _conv_bn(cin, cin, 3, stride, groups=cin, act=None),
                _conv_bn(cin, mid, 1),
            )
        self.branch2 = nn.Sequential(
            _conv_bn(bin_, mid, 1),
            _conv_bn(mid, mid, 3, stride, groups=mid, act=None),
            _conv_bn(mid, mid, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.branch1 is None:
            half = int(x.shape[1]) // 2
            x1, x2 = torch.split(x, [half, half], dim=1)  # static split sizes -> Split
            out = torch.cat([x1, self.branch2(x2)], 1)
        else:
            out = torch.cat([self.branch1(x), self.branch2(x)], 1)
        return channel_shuffle(out, 2)


class SmallShuffleNetV2(nn.Module):
    """Stem + maxpool, two stages (stride-2 unit + stride-1 unit), 1x1 conv, mean, Linear."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 24, 3, 1)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.stage2 = nn.Sequential(ShuffleUnit(24, 48, 2), ShuffleUnit(48, 48, 1))
        self.stage3 = nn.Sequential(ShuffleUnit(48, 96, 2), ShuffleUnit(96, 96, 1))
        self.conv5 = _conv_bn(96, 128, 1)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv5(self.stage3(self.stage2(self.pool(self.stem(x)))))
        return self.fc(x.mean([2, 3]))


# ---------------------------------------------------------------------------------------------
# squeeze-excite
# ---------------------------------------------------------------------------------------------


class SqueezeExcite(nn.Module):
    """GAP -> 1x1 reduce -> ReLU -> 1x1 expand -> gate (Sigmoid or Hardsigmoid) -> multiply."""

    def __init__(self, c: int, reduction: int = 4, gate: type[nn.Module] = nn.Sigmoid) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(c, c // reduction, 1)
        self.expand = nn.Conv2d(c // reduction, c, 1)
        self.gate = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        s = self.gate(self.expand(F.relu(self.reduce(s))))
        return x * s


class SEBlock(nn.Module):
    """conv-bn-relu, conv-bn, squeeze-excite, optional residual Add, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, gate: type[nn.Module]) -> None:
        super().__init__()
        self.conv1 = _conv_bn(cin, cout, 3, stride)
        self.conv2 = _conv_bn(cout, cout, 3, act=None)
        self.se = SqueezeExcite(cout, 4, gate)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.se(self.conv2(self.conv1(x)))
        return F.relu(out + x if self.residual else out)


class SmallSENet(nn.Module):
    """Stem and three SE blocks (Sigmoid, Hardsigmoid, Sigmoid with residual), GAP, Linear."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 16)
        self.block1 = SEBlock(16, 32, 1, nn.Sigmoid)
        self.block2 = SEBlock(32, 48, 2, nn.Hardsigmoid)
        self.block3 = SEBlock(48, 48, 1, nn.Sigmoid)
        self.fc = nn.Linear(48, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ---------------------------------------------------------------------------------------------
# unet
# ---------------------------------------------------------------------------------------------


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(_conv_bn(cin, cout), _conv_bn(cout, cout))


class SmallUNet(nn.Module):
    """Two-level UNet: maxpool encoder, ConvTranspose2d(stride 2) decoder, skip Concats."""

    def __init__(self, num_classes: int = 2) -> None:
        super().__init__()
        self.enc1 = _double_conv(3, 16)
        self.enc2 = _double_conv(16, 32)
        self.mid = _double_conv(32, 64)
        self.up2 = nn.ConvTranspose2d(64, 32, 2, stride=2)
        self.dec2 = _double_conv(64, 32)
        self.up1 = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.dec1 = _double_conv(32, 16)
        self.head = nn.Conv2d(16, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        m = self.mid(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return self.head(d1)


# ---------------------------------------------------------------------------------------------
# nhwc
# ---------------------------------------------------------------------------------------------


class NHWCNet(nn.Module):
    """NHWC input; convs in NCHW, a channel-last Linear in NHWC, NHWC spatial mean + Linear."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = _conv_bn(3, 16)
        self.conv2 = _conv_bn(16, 32, 3, 2)
        self.mix = nn.Linear(32, 32)  # applied over the channel (last) axis in NHWC
        self.conv3 = _conv_bn(32, 32)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)  # NHWC -> NCHW
        x = self.conv2(self.conv1(x))
        x = x.permute(0, 2, 3, 1)  # NCHW -> NHWC
        x = F.relu(self.mix(x))
        x = x.permute(0, 3, 1, 2)  # NHWC -> NCHW
        x = self.conv3(x)
        x = x.permute(0, 2, 3, 1)  # NCHW -> NHWC
        return self.fc(x.mean(dim=(1, 2)))


# ---------------------------------------------------------------------------------------------
# conv1d / conv3d
# ---------------------------------------------------------------------------------------------


class ConvNd(nn.Module):
    """conv-bn-relu x2, grouped conv (groups=2) + bn + relu, maxpool, flatten, linear."""

    def __init__(self, dims: int, spatial: tuple[int, ...], num_classes: int = 10) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 3: nn.Conv3d}[dims]
        bn = {1: nn.BatchNorm1d, 3: nn.BatchNorm3d}[dims]
        pool = {1: nn.MaxPool1d, 3: nn.MaxPool3d}[dims]
        self.features = nn.Sequential(
            conv(3, 8, 3, padding=1, bias=False), bn(8), nn.ReLU(),
            conv(8, 16, 3, padding=1, bias=False), bn(16), nn.ReLU(),
            conv(16, 16, 3, padding=1, groups=2, bias=False), bn(16), nn.ReLU(),
            pool(2),
        )  # fmt: skip
        n = 16
        for s in spatial:
            n *= s // 2
        self.fc = nn.Linear(n, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


# ---------------------------------------------------------------------------------------------
# builders and export
# ---------------------------------------------------------------------------------------------


def _resnet() -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    return _finish(SmallResNet(), (1, 3, 32, 32))


def _densenet() -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    return _finish(SmallDenseNet(), (1, 3, 32, 32))


def _mobilenetv2() -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    return _finish(SmallMobileNetV2(), (1, 3, 32, 32))


def _shufflenet() -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    return _finish(SmallShuffleNetV2(), (1, 3, 32, 32))


def _se() -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    return _finish(SmallSENet(), (1, 3, 32, 32))


def _unet() -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    return _finish(SmallUNet(), (1, 3, 32, 32))


def _nhwc() -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    return _finish(NHWCNet(), (1, 32, 32, 3))


def _resnet50() -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    return _finish(ResNet50(), (1, 3, 224, 224))


def _conv1d() -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    return _finish(ConvNd(1, (32,)), (1, 3, 32))


def _conv3d() -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    return _finish(ConvNd(3, (8, 8, 8)), (1, 3, 8, 8, 8))


class Attention(nn.Module):
    """Multi-head self-attention written out (Q/K/V projections, head split, softmax, merge).

    ``kv_heads < heads`` gives grouped-query attention: each K/V head is shared by
    ``heads // kv_heads`` query heads (``repeat_interleave``), as in Llama-style models.
    """

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None) -> None:
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads or heads
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, self.kv_heads * self.head_dim)
        self.v = nn.Linear(dim, self.kv_heads * self.head_dim)
        self.o = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.kv_heads != self.heads:
            rep = self.heads // self.kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        y = att.softmax(dim=-1) @ v
        return self.o(y.transpose(1, 2).reshape(b, s, -1))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: LN → attention → residual, LN → MLP (GELU) → residual."""

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None, mlp: int = 4) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, kv_heads)
        self.fc1, self.fc2 = nn.Linear(dim, mlp * dim), nn.Linear(mlp * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))


class Encoder(nn.Module):
    """Two encoder blocks over [1, S, D] embeddings, a final LN and a linear head."""

    def __init__(self, dim: int = 32, heads: int = 4, kv_heads: int | None = None) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(EncoderBlock(dim, heads, kv_heads) for _ in range(2)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(x)))


class LSTMNet(nn.Module):
    """Linear → 2-layer bidirectional LSTM → Linear over [1, T, F] sequences."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(12, 16)
        self.rnn = nn.LSTM(16, 24, num_layers=2, batch_first=True, bidirectional=True)
        self.out = nn.Linear(48, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(torch.relu(self.inp(x)))
        return self.out(y)


class Bert(nn.Module):
    """Token ids → embedding + learned positions → two encoder blocks → LN → classifier.

    The hidden size reaches no graph input here (ids are integers), so it is prunable when
    the user accepts the inexact LayerNorm coupling.
    """

    vocab = 50

    def __init__(self, dim: int = 32, seq: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(self.vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, seq, dim) * 0.02)
        self.encoder = Encoder(dim=dim, heads=4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embed(ids) + self.pos)


def sample_input(name: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A deterministic example input: token ids for token models, N(0, 1) otherwise."""
    g = torch.Generator().manual_seed(seed)
    if name in TOKEN_MODELS:
        return torch.randint(0, Bert.vocab, shape, generator=g)
    return torch.randn(*shape, generator=g)


def _bert() -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    return _finish(Bert(), (1, 8))


def _transformer() -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    return _finish(Encoder(), (1, 8, 32))


def _gqa() -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    return _finish(Encoder(dim=32, heads=4, kv_heads=2), (1, 8, 32))


def _lstm() -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    return _finish(LSTMNet(), (1, 7, 12))


BUILDERS: dict[str, Builder] = {
    "resnet": _resnet,
    "densenet": _densenet,
    "mobilenetv2": _mobilenetv2,
    "shufflenet": _shufflenet,
    "se": _se,
    "unet": _unet,
    "nhwc": _nhwc,
    "resnet50": _resnet50,
    "conv1d": _conv1d,
    "conv3d": _conv3d,
    "transformer": _transformer,
    "gqa": _gqa,
    "lstm": _lstm,
    "bert": _bert,
}

#: Models whose input is token ids (int64) rather than a float tensor.
TOKEN_MODELS: frozenset[str] = frozenset({"bert"})

#: All zoo names, in a stable order.
NAMES: tuple[str, ...] = tuple(BUILDERS)

#: Names that take seconds rather than milliseconds to export and run.
SLOW: frozenset[str] = frozenset({"resnet50"})


def build(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    """Build zoo model ``name``; raises ``KeyError`` with the known names if unknown."""
    try:
        builder = BUILDERS[name]
    except KeyError:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(NAMES)}") from None
    return builder()


def export(
    name: str,
    path: str | os.PathLike[str],
    *,
    opset: int = 17,
    dynamic_batch: bool = False,
) -> pathlib.Path:
    """Build zoo model ``name`` and export it to ONNX at ``path``; return the path.

    Uses the TorchScript exporter (``dynamo=False``) with constant folding; the graph input
    is named ``input`` and the output ``output``. With ``dynamic_batch`` axis 0 of both is
    dynamic (``batch``). Weights are embedded in the file.
    """
    model, shape = build(name)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dummy = sample_input(name, shape, seed=0)
    dynamic_axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo; it is what we want here
        # (plain static graphs), so keep its DeprecationWarning and tracer chatter quiet.
        warnings.simplefilter("ignore")
        with torch.no_grad():
            torch.onnx.export(
                model,
                (dummy,),
                str(path),
                dynamo=False,
                do_constant_folding=True,
                opset_version=opset,
                input_names=["input"],
                output_names=["output"],
                dynamic_axes=dynamic_axes,
            )
    return path
