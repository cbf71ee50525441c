"""A stub ``torchvision`` for the coverage benchmark only (never installed).

timm imports torchvision at import time (data transforms, datasets, FrozenBatchNorm2d), but
the torchvision wheel does not import beside the CPU torch used here. The benchmark only
builds timm models at random weights and exports them, so placeholders suffice: any name a
stub module is asked for is a class that raises if it is ever *used*.
"""

from __future__ import annotations

__version__ = "0.0.0+spa-stub"


class _Missing:
    """Stands in for any torchvision object; instantiating or calling it fails loudly."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError("torchvision is stubbed in the spa coverage benchmark")

    def __init_subclass__(cls, **kwargs):  # timm subclasses e.g. transforms.ToTensor
        super().__init_subclass__(**kwargs)


def missing(module: str, name: str) -> type:
    if name.startswith("__"):
        raise AttributeError(name)
    return type(name, (_Missing,), {"__module__": module})
