from torchvision import missing as _missing


def __getattr__(name: str):
    return _missing(__name__, name)
