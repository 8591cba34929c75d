"""latentforge: Stable Diffusion in plain PyTorch."""

__version__ = "0.1.0"
__all__ = ["Pipeline", "load", "__version__"]


def __getattr__(name: str):
    # imported on first use, so that `import latentforge.tokenizer` (or the CLI's --help) stays light
    if name in ("Pipeline", "load"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'latentforge' has no attribute {name!r}")
