"""Blocked bfloat16 attention (latentforge.attention): the same function as SDPA, used only where it wins.

Its speed is measured in benchmarks (docs/design.md "The fast path"); these tests hold its correctness.
"""

import pytest
import torch
import torch.nn.functional as F

from latentforge import attention as attn
from latentforge.unet import UNet, UNetConfig


def heads(batch: int, n: int, count: int, width: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    """(B, heads, N, width) as the models make them: a strided view of (B, N, heads * width)."""
    x = torch.randn(batch, n, count * width, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return x.view(batch, n, count, width).transpose(1, 2)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


@pytest.mark.parametrize("n, m, width, value_width", [(1300, 700, 40, 40), (512, 2048, 64, 32), (5, 3, 8, 8)])
def test_blocked_attention_is_sdpa(n, m, width, value_width):
    """In float64 the two agree to rounding: any query count (blocks not filled), strided inputs, dv != d."""
    q, k, v = heads(2, n, 3, width, 0), heads(2, m, 3, width, 1), heads(2, m, 3, value_width, 2)
    torch.testing.assert_close(attn.blocked_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_blocked_bfloat16_error_is_two_roundings():
    """In bfloat16 SDPA's error against float64 is about one rounding of its inputs (unit roundoff 2^-8);
    the blocked path also rounds the scores and probabilities to bfloat16, so it may reach two (measured
    on these inputs: SDPA 1.0, blocked 1.4 roundings). The UNet test below shows what that costs a model."""
    q, k, v = (heads(1, 4096, 2, 40, seed) for seed in range(3))
    want = F.scaled_dot_product_attention(q, k, v)
    q, k, v = (t.bfloat16() for t in (q, k, v))
    assert relative_error(attn.blocked_attention(q, k, v), want) <= 2 * 2**-8


def test_attention_takes_the_blocked_path_only_where_it_wins(monkeypatch):
    long, short = heads(1, attn.MIN_TOKENS, 1, 8, 0), heads(1, 77, 1, 8, 1)
    assert attn.blocked_wins(long.bfloat16(), long.bfloat16())
    assert not attn.blocked_wins(long.float(), long.float())  # float32: SDPA is faster
    assert not attn.blocked_wins(long.bfloat16(), short.bfloat16())  # cross-attention on 77 text tokens
    assert not attn.blocked_wins(short.bfloat16(), long.bfloat16())
    calls = []
    monkeypatch.setattr(attn, "blocked_attention", lambda q, k, v: calls.append(q.shape) or q)
    attn.attention(long.bfloat16(), long.bfloat16(), long.bfloat16())
    attn.attention(long.float(), long.float(), long.float())
    assert calls == [long.shape]


def test_unet_in_bfloat16_is_as_close_to_float32_with_blocked_attention(monkeypatch):
    """A UNet whose first level attends over 64 x 64 = 4096 latents (the blocked path) stays as close to
    its float32 output as with SDPA everywhere: the rest of the bfloat16 UNet's error dominates (on the
    SD 1.5-sized random UNet, relative error to float32 1.140e-2 blocked, 1.148e-2 SDPA)."""
    config = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0,),
                        num_heads=2, context_dim=32, norm_groups=8)  # fmt: skip
    torch.manual_seed(0)
    model = UNet(config).eval()
    g = torch.Generator().manual_seed(1)
    x, context, t = torch.randn(1, 4, 64, 64, generator=g), torch.randn(1, 77, 32, generator=g), torch.tensor([500.0])
    with torch.no_grad():
        want = model(x, t, context).double()
        model.bfloat16()
        inputs = (x.bfloat16(), t, context.bfloat16())
        calls = []
        blocked = attn.blocked_attention
        monkeypatch.setattr(attn, "blocked_attention", lambda *a: calls.append(1) or blocked(*a))
        with_blocked = relative_error(model(*inputs), want)
        assert calls, "the 4096-token self-attention did not take the blocked path"
        monkeypatch.setattr(attn, "blocked_wins", lambda q, k: False)
        with_sdpa = relative_error(model(*inputs), want)
    assert with_blocked <= 1.25 * with_sdpa + 1e-3, (with_blocked, with_sdpa)
