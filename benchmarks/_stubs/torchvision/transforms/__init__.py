from torchvision import missing as _missing

from . import functional  # noqa: F401


def __getattr__(name: str):
    return _missing(__name__, name)
