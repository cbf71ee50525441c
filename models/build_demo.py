"""Build ``models/demo.onnx``, the shipped demo for ``spa prune models/demo.onnx --ratio 0.5``.

A small CNN (~160 K parameters, input 1x3x32x32, 10 outputs) with random but deterministic
weights that touches the structures a structural pruner must get right:

- a residual ``Add`` whose shortcut is a 1x1/stride-2 downsample conv (coupled channels),
- a depthwise conv (``group == channels``: its in and out channels are one space),
- a squeeze-excite (GAP -> reduce -> ReLU -> expand -> Sigmoid -> ``Mul``),
- a two-branch ``Concat`` (channel offsets),
- a Flatten + Gemm head.

Every BatchNorm has non-trivial statistics, so none is the identity (they are folded into
the convs at export). Running the script twice writes a byte-identical file::

    python models/build_demo.py            # writes models/demo.onnx beside this script
    python models/build_demo.py -o X.onnx  # elsewhere
"""

from __future__ import annotations

import argparse
import hashlib
import pathlib
import warnings

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "demo.onnx"
INPUT_SHAPE = (1, 3, 32, 32)
OPSET = 17


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv2d (no bias, "same" padding) + BatchNorm2d."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)
    )


class DownBlock(nn.Module):
    """ResNet basic block with a 1x1/stride-2 downsample shortcut and a residual Add."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = conv_bn(cin, cout, 3, 2)
        self.conv2 = conv_bn(cout, cout, 3)
        self.shortcut = conv_bn(cin, cout, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.relu(self.conv1(x)))
        return F.relu(out + self.shortcut(x))


class DepthwiseSE(nn.Module):
    """Depthwise 3x3 + pointwise 1x1, then squeeze-excite, with an identity residual Add."""

    def __init__(self, c: int, reduction: int = 4) -> None:
        super().__init__()
        self.dw = conv_bn(c, c, 3, groups=c)
        self.pw = conv_bn(c, c, 1)
        self.se_reduce = nn.Conv2d(c, c // reduction, 1)
        self.se_expand = nn.Conv2d(c // reduction, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.pw(F.relu(self.dw(x))))
        s = F.adaptive_avg_pool2d(y, 1)
        s = torch.sigmoid(self.se_expand(F.relu(self.se_reduce(s))))
        return x + y * s


class TwoBranch(nn.Module):
    """Inception-style pair of branches (3x3 and 1x1) joined by a channel Concat."""

    def __init__(self, cin: int, cout_each: int) -> None:
        super().__init__()
        self.b3 = conv_bn(cin, cout_each, 3)
        self.b1 = conv_bn(cin, cout_each, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(torch.cat([self.b3(x), self.b1(x)], 1))


class DemoNet(nn.Module):
    """stem -> DownBlock -> DepthwiseSE -> TwoBranch -> stride-2 conv -> GAP -> Linear."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(3, 32)
        self.down = DownBlock(32, 64)
        self.dwse = DepthwiseSE(64)
        self.branches = TwoBranch(64, 32)
        self.head_conv = conv_bn(64, 128, 3, 2)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = self.branches(self.dwse(self.down(x)))
        x = F.relu(self.head_conv(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build() -> DemoNet:
    """The demo network in eval mode, with seeded weights and non-trivial BatchNorms."""
    torch.manual_seed(0)
    model = DemoNet()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                n = mod.num_features
                mod.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                mod.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                mod.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                mod.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    return model.eval()


def write(path: pathlib.Path) -> str:
    """Export the demo to ``path`` (weights embedded) and return the file's sha256."""
    model = build()
    dummy = torch.randn(*INPUT_SHAPE, generator=torch.Generator().manual_seed(0))
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript-exporter deprecation notice
        with torch.no_grad():
            torch.onnx.export(
                model,
                (dummy,),
                str(path),
                dynamo=False,
                do_constant_folding=True,
                opset_version=OPSET,
                input_names=["input"],
                output_names=["output"],
            )
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=pathlib.Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    digest = write(args.output)
    params = sum(p.numel() for p in build().parameters())
    size = args.output.stat().st_size
    print(f"wrote {args.output} ({size:,} bytes, {params:,} params) sha256 {digest}")


if __name__ == "__main__":
    main()
