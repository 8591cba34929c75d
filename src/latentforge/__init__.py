"""latentforge: Stable Diffusion in plain PyTorch."""

__version__ = "0.1.0"

from .pipeline import Pipeline, load  # noqa: E402

__all__ = ["Pipeline", "load", "__version__"]
