"""The inference fast paths' switch.

A few layers compute their function a faster way that suits a model that is only run, never trained:
in-place activations and residual sums (autograd would need the overwritten values), the feed-forward in
chunks of tokens, Winograd and unfolded convolutions (measured for inference). Each such layer has an
`inference` attribute, False unless its model was switched with `set_inference`, as `pipeline.build` does
for every model it loads. Nothing reads global state such as `torch.is_grad_enabled()`: a model that was not
switched (a model in training, a reference model in a test) runs the plain path, under `torch.no_grad()` too.
"""

from __future__ import annotations

from torch import nn


def set_inference(module: nn.Module, on: bool = True) -> nn.Module:
    """Switch the inference fast paths of every layer of `module` that has one on (or off); returns `module`.
    Switching on a module with trainable parameters is a ValueError: the fast paths have no place in training."""
    if on and any(p.requires_grad for p in module.parameters()):
        raise ValueError(
            f"{type(module).__name__}: the inference fast paths are for frozen models; "
            "call .requires_grad_(False) first (training keeps them off)"
        )
    for layer in module.modules():
        if isinstance(getattr(type(layer), "inference", None), bool):
            layer.inference = on
    return module
