"""The weight changes of LoRA / LyCORIS networks (adapters/lora.py) against the lycoris-lora package itself.

Each test builds the LyCORIS module the way LyCORIS does when it trains (over a real nn.Linear / nn.Conv2d),
gives every factor random values, and takes its state dict as LyCORIS saves it. From those same keys we build
our network module and compare its delta with LyCORIS's in float64 (the weight change, and the layer's output
through LyCORIS's own forward), then again after a round trip through a .safetensors file and `read_lora`
(float32). The reference for LoHa and LoKr is the weight their forward (training) uses, `get_weight`: their
`get_diff_weight` / `get_merged_weight` apply alpha / rank a second time (see test_lycoris_merge_double_scales).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("lycoris")  # the lycoris-lora test extra

from lycoris.functional import locon as locon_functional
from lycoris.functional import loha as loha_functional
from lycoris.functional import lokr as lokr_functional
from lycoris.functional.general import rebuild_tucker, weight_decompose
from lycoris.modules.full import FullModule
from lycoris.modules.ia3 import IA3Module
from lycoris.modules.locon import LoConModule
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule

from latentforge.adapters.lora import SUFFIXES, NetworkModule, dora, read_lora
from latentforge.weightfiles import write_safetensors

PREFIX = "lora_unet_x"
EXACT = 1e-12  # float64 against float64, relative to the largest value
FILE = 2e-5  # float32 file against the float64 reference


def make_layer(kind: str, seed: int = 0) -> nn.Module:
    """A float64 layer with random weights: 'linear' (in 64, out 96), 'conv' (3x3, 16 -> 24), 'conv1' (1x1)."""
    torch.manual_seed(seed)
    layer = {
        "linear": lambda: nn.Linear(64, 96),
        "conv": lambda: nn.Conv2d(16, 24, 3, padding=1),
        "conv1": lambda: nn.Conv2d(16, 24, 1),
    }[kind]()
    return layer.double()


def randomise(module: nn.Module, seed: int = 1) -> nn.Module:
    """Every trainable factor random (LyCORIS starts one side at zero); a DoRA magnitude kept positive."""
    generator = torch.Generator().manual_seed(seed)
    module.double()
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float64)
            if name == "dora_scale":
                param.mul_(0.5 + noise.abs())
            else:
                param.copy_(noise * 0.3)
    return module


def saved(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's tensors as LyCORIS writes them into a network file (its custom state dict)."""
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def ours(kind: str, tensors: dict[str, torch.Tensor]) -> NetworkModule:
    """Our module from LyCORIS's keys, float64: every key must be one our reader knows."""
    unknown = set(tensors) - set(SUFFIXES)
    assert not unknown, f"LyCORIS writes keys our reader does not know: {unknown}"
    return NetworkModule(
        kind, {SUFFIXES[key]: value for key, value in tensors.items()}, PREFIX
    )


def op(
    layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    return F.conv2d(x, weight, bias, stride=layer.stride, padding=layer.padding)


def sample_input(layer: nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    shape = (
        (3, layer.in_features)
        if isinstance(layer, nn.Linear)
        else (2, layer.in_channels, 6, 6)
    )
    return torch.randn(shape, generator=generator, dtype=torch.float64)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """max |actual - expected| <= tol * max |expected|, shapes equal, expected not trivially zero."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = expected.abs().max().item()
    assert scale > 1e-3, (
        "the reference is (nearly) zero: the comparison would prove nothing"
    )
    error = (actual.double() - expected.double()).abs().max().item()
    assert error <= tol * scale, (
        f"max error {error:.3g} vs max value {scale:.3g} (relative {error / scale:.3g})"
    )


def check(
    module: nn.Module,
    layer: nn.Module,
    kind: str,
    reference: torch.Tensor,
    tmp_path,
    tol: float = EXACT,
) -> None:
    """Our delta (float64 from the state dict, and float32 through a file) equals `reference`, LyCORIS's change
    of the weight, and the layer's output through LyCORIS's own forward equals the output with W + our delta."""
    tensors = saved(module)
    weight = layer.weight.detach().clone()
    layer_bias = None if layer.bias is None else layer.bias.detach().clone()
    delta, delta_bias = ours(kind, tensors).delta(weight)
    assert_close(delta, reference, tol)
    assert delta_bias is None

    x = sample_input(layer)
    module.multiplier = 1.0
    module.apply_to()
    with torch.no_grad():
        expected = layer(x)
    assert_close(op(layer, x, weight + delta, layer_bias), expected, tol)

    path = tmp_path / "net.safetensors"
    write_safetensors(
        {
            f"{PREFIX}.{key}": value.float() if value.is_floating_point() else value
            for key, value in tensors.items()
        },
        path,
    )
    read = read_lora(path)
    assert set(read.modules) == {PREFIX}
    module32 = read.modules[PREFIX]
    assert module32.kind == kind
    delta32, bias32 = module32.delta(weight.float())
    assert delta32.dtype == torch.float32
    assert_close(delta32, reference, FILE)
    assert bias32 is None


# -------------------------------------------------------------------------------------------------
# LoRA / LoCon / CP (lora_mid)


@pytest.mark.parametrize(
    "layer_kind, options",
    [
        ("linear", {"lora_dim": 8, "alpha": 4}),
        (
            "linear",
            {"lora_dim": 8, "alpha": 0},
        ),  # LyCORIS: alpha 0 means alpha = rank (scale 1)
        # scale alpha / sqrt(r), written as alpha sqrt(r) (a float32 buffer: its rounding, 5e-8, is the file's)
        ("linear", {"lora_dim": 8, "alpha": 3, "rs_lora": True}),
        ("conv", {"lora_dim": 4, "alpha": 2}),
        ("conv", {"lora_dim": 4, "alpha": 2, "use_tucker": True}),
        (
            "conv1",
            {"lora_dim": 4, "alpha": 1, "use_tucker": True},
        ),  # a 1x1 kernel: LyCORIS drops the Tucker core
    ],
)
def test_locon(layer_kind, options, tmp_path):
    layer = make_layer(layer_kind)
    module = randomise(LoConModule(PREFIX, layer, **options))
    tensors = saved(module)
    expected_keys = {"alpha", "lora_up.weight", "lora_down.weight"} | (
        {"lora_mid.weight"} if module.tucker else set()
    )
    assert set(tensors) == expected_keys
    assert module.tucker == (layer_kind == "conv" and options.get("use_tucker", False))
    tol = FILE if options.get("rs_lora") else EXACT
    reference, _ = module.get_diff_weight()
    delta, _ = ours("lora", tensors).delta(layer.weight.detach())
    assert_close(delta, reference, tol)
    assert_close(layer.weight.detach() + delta, module.get_merged_weight()[0], tol)
    # the written alpha is what scales: up @ down * alpha / r, whatever LyCORIS's r_factor was
    if not module.tucker:
        scale = float(tensors["alpha"]) / options["lora_dim"]
        product = tensors["lora_up.weight"].flatten(1) @ tensors[
            "lora_down.weight"
        ].flatten(1)
        assert_close(delta, product.reshape(reference.shape) * scale, EXACT)
    check(module, layer, "lora", reference, tmp_path, tol)


def test_lora_without_alpha_is_scale_one():
    """A file with no alpha (diffusers, PEFT without metadata) is applied at scale 1: up @ down."""
    layer = make_layer("linear")
    module = randomise(LoConModule(PREFIX, layer, lora_dim=8, alpha=2))
    tensors = saved(module)
    del tensors["alpha"]
    up, down = tensors["lora_up.weight"], tensors["lora_down.weight"]
    assert_close(
        ours("lora", tensors).delta(layer.weight.detach())[0], up @ down, EXACT
    )
    unscaled = locon_functional.diff_weight(down, up, None, gamma=1.0)
    assert_close(ours("lora", tensors).delta(layer.weight.detach())[0], unscaled, EXACT)
    assert_close(
        ours("lora", tensors).delta(layer.weight.detach())[0],
        module.get_diff_weight()[0] * 8 / 2,
        EXACT,
    )


def test_lora_cp_factors_against_the_functional_form():
    """CP conv: lora_mid (r, r, 3, 3) between down (r, in, 1, 1) and up (out, r, 1, 1), with alpha / r."""
    generator = torch.Generator().manual_seed(3)
    rank, alpha = 5, 3.0
    down = torch.randn(rank, 16, 1, 1, generator=generator, dtype=torch.float64)
    up = torch.randn(24, rank, 1, 1, generator=generator, dtype=torch.float64)
    mid = torch.randn(rank, rank, 3, 3, generator=generator, dtype=torch.float64)
    factors = {
        "down": down,
        "up": up,
        "mid": mid,
        "alpha": torch.tensor(alpha, dtype=torch.float64),
    }
    delta, _ = NetworkModule("lora", factors, PREFIX).delta(
        torch.zeros(24, 16, 3, 3, dtype=torch.float64)
    )
    assert_close(
        delta, locon_functional.diff_weight(down, up, mid, gamma=alpha / rank), EXACT
    )


# -------------------------------------------------------------------------------------------------
# LoHa


@pytest.mark.parametrize(
    "layer_kind, options",
    [
        ("linear", {"lora_dim": 6, "alpha": 2}),
        ("conv", {"lora_dim": 4, "alpha": 3}),  # no Tucker: w1b (r, in * 3 * 3)
        (
            "conv",
            {"lora_dim": 4, "alpha": 3, "use_tucker": True},
        ),  # hada_t1 / hada_t2 (r, r, 3, 3)
    ],
)
def test_loha(layer_kind, options, tmp_path):
    layer = make_layer(layer_kind)
    module = randomise(LohaModule(PREFIX, layer, **options))
    tensors = saved(module)
    tucker = {"hada_t1", "hada_t2"} if options.get("use_tucker") else set()
    assert (
        set(tensors)
        == {"alpha", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} | tucker
    )
    assert module.scale == options["alpha"] / options["lora_dim"] != 1
    reference = module.get_weight(
        module.shape
    )  # what its forward adds, alpha / r included
    f = tensors
    functional = loha_functional.diff_weight(
        f["hada_w1_b"],
        f["hada_w1_a"],
        f["hada_w2_b"],
        f["hada_w2_a"],
        f.get("hada_t1"),
        f.get("hada_t2"),
        gamma=module.scale,
    ).reshape(module.shape)
    assert_close(functional, reference, EXACT)
    check(module, layer, "loha", reference, tmp_path)


# -------------------------------------------------------------------------------------------------
# LoKr


LOKR_CASES = {
    # name: (layer, options, which factors the module must write)
    "linear w1 whole, w2 factored": ("linear", {"lora_dim": 2, "alpha": 1}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    "linear w1 factored, w2 factored": (
        "linear", {"lora_dim": 2, "alpha": 3, "decompose_both": True}, {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"},
    ),
    "linear w1 factored, w2 whole": (
        "linear", {"lora_dim": 5, "alpha": 2, "decompose_both": True, "unbalanced_factorization": True},
        {"lokr_w1_a", "lokr_w1_b", "lokr_w2"},
    ),
    "linear both whole": ("linear", {"lora_dim": 4, "alpha": 1, "full_matrix": True}, {"lokr_w1", "lokr_w2"}),
    "conv w2 factored": ("conv", {"lora_dim": 1, "alpha": 2}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    "conv w2 tucker": ("conv", {"lora_dim": 2, "alpha": 3, "use_tucker": True}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}),
    "conv w2 whole": ("conv", {"lora_dim": 8, "alpha": 2}, {"lokr_w1", "lokr_w2"}),
    "conv1 w2 factored": ("conv1", {"lora_dim": 1, "alpha": 2, "use_tucker": True}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
}  # fmt: skip


@pytest.mark.parametrize("case", list(LOKR_CASES))
def test_lokr(case, tmp_path):
    layer_kind, options, factors = LOKR_CASES[case]
    layer = make_layer(layer_kind)
    module = randomise(LokrModule(PREFIX, layer, **options))
    tensors = saved(module)
    assert set(tensors) == factors | {"alpha"}, sorted(tensors)
    both_whole = {"lokr_w1", "lokr_w2"} <= factors
    assert module.scale == (
        1.0 if both_whole else options["alpha"] / options["lora_dim"]
    )
    reference = module.get_weight(
        module.shape
    )  # what its forward adds, alpha / r included
    check(module, layer, "lokr", reference, tmp_path)


def test_lokr_both_whole_ignores_alpha():
    """LoKr with both Kronecker sides whole has no rank: alpha does not scale it (LyCORIS's rule)."""
    generator = torch.Generator().manual_seed(4)
    w1 = torch.randn(4, 8, generator=generator, dtype=torch.float64)
    w2 = torch.randn(6, 2, 3, 3, generator=generator, dtype=torch.float64)
    factors = {"k1": w1, "k2": w2, "alpha": torch.tensor(7.0, dtype=torch.float64)}
    delta, _ = NetworkModule("lokr", factors, PREFIX).delta(
        torch.zeros(24, 16, 3, 3, dtype=torch.float64)
    )
    assert_close(delta, lokr_functional.make_kron(w1, w2, 1.0), EXACT)
    assert_close(
        delta,
        lokr_functional.diff_weight(w1, None, None, w2, None, None, None, gamma=7.0),
        EXACT,
    )


def test_lokr_factored_against_the_functional_form():
    """W1 = w1a w1b, W2 = kt2 x w2a x w2b (Tucker), alpha / r, against make_kron and rebuild_tucker."""
    generator = torch.Generator().manual_seed(5)
    rank, alpha = 3, 5.0

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    w1a, w1b, w2a, w2b, t2 = (
        rand(4, rank),
        rand(rank, 2),
        rand(rank, 6),
        rand(rank, 8),
        rand(rank, rank, 3, 3),
    )
    factors = {
        "k1a": w1a,
        "k1b": w1b,
        "k2a": w2a,
        "k2b": w2b,
        "kt2": t2,
        "alpha": torch.tensor(alpha, dtype=torch.float64),
    }
    delta, _ = NetworkModule("lokr", factors, PREFIX).delta(
        torch.zeros(24, 16, 3, 3, dtype=torch.float64)
    )
    expected = lokr_functional.make_kron(
        w1a @ w1b, rebuild_tucker(t2, w2a, w2b), alpha / rank
    )
    assert_close(delta, expected, EXACT)
    # functional.lokr.diff_weight takes the rank from w1a's columns; with w1 factored that is the rank
    assert_close(
        delta,
        lokr_functional.diff_weight(None, w1a, w1b, None, w2a, w2b, t2, gamma=alpha),
        EXACT,
    )


def test_lycoris_merge_double_scales():
    """Why the LoHa / LoKr references are `get_weight`: LyCORIS's own forward adds get_weight (scaled once by
    alpha / r), while its get_diff_weight (used by its merge_to) multiplies that by alpha / r again. Files are
    applied as trained, so ours follows the forward; this pins the difference should LyCORIS change it."""
    layer = make_layer("linear")
    module = randomise(LohaModule(PREFIX, layer, lora_dim=6, alpha=2))
    delta, _ = ours("loha", saved(module)).delta(layer.weight.detach())
    assert_close(delta * module.scale, module.get_diff_weight()[0], EXACT)


# -------------------------------------------------------------------------------------------------
# IA3 and full


@pytest.mark.parametrize("layer_kind", ["linear", "conv"])
@pytest.mark.parametrize("on_input", [False, True])
def test_ia3(layer_kind, on_input, tmp_path):
    layer = make_layer(layer_kind)
    module = randomise(IA3Module(PREFIX, layer, train_on_input=on_input))
    tensors = saved(module)
    assert set(tensors) == {"weight", "on_input"}
    assert int(tensors["on_input"]) == int(on_input)
    reference, _ = module.get_diff_weight()
    # by hand: each input column (on_input) or output row of W times its entry of the vector
    w = tensors["weight"].reshape(-1)
    axis = 1 if on_input else 0
    view = [1] * layer.weight.dim()
    view[axis] = -1
    assert_close(reference, layer.weight.detach() * w.reshape(view), EXACT)
    check(module, layer, "ia3", reference, tmp_path)


@pytest.mark.parametrize("layer_kind", ["linear", "conv"])
def test_full(layer_kind, tmp_path):
    layer = make_layer(layer_kind)
    original = layer.weight.detach().clone()
    original_bias = layer.bias.detach().clone()
    module = FullModule(PREFIX, layer).double()
    module.apply_to()  # as when training: the module now holds the layer's whole weight
    generator = torch.Generator().manual_seed(6)
    diff = torch.randn(original.shape, generator=generator, dtype=torch.float64) * 0.1
    diff_b = (
        torch.randn(original_bias.shape, generator=generator, dtype=torch.float64) * 0.1
    )
    with torch.no_grad():
        module.weight.copy_(original + diff)
        module.bias.copy_(original_bias + diff_b)
    tensors = saved(module)
    assert set(tensors) == {"diff", "diff_b"}
    reference, reference_b = module.get_diff_weight()
    assert_close(reference, diff, EXACT)
    assert_close(reference_b, diff_b, EXACT)

    delta, delta_b = ours("full", tensors).delta(original)
    assert_close(delta, reference, EXACT)
    assert_close(delta_b, reference_b, EXACT)
    x = sample_input(layer)
    with torch.no_grad():
        expected = layer(x)  # its forward: the layer with the module's weight and bias
    assert_close(
        op(layer, x, original + delta, original_bias + delta_b), expected, EXACT
    )

    path = tmp_path / "net.safetensors"
    write_safetensors(
        {f"{PREFIX}.{key}": value.float() for key, value in tensors.items()}, path
    )
    module32 = read_lora(path).modules[PREFIX]
    assert module32.kind == "full"
    delta32, bias32 = module32.delta(original.float())
    assert_close(delta32, reference, FILE)
    assert_close(bias32, reference_b, FILE)


# -------------------------------------------------------------------------------------------------
# DoRA (weight_decompose)


DORA_MODULES = {
    "locon": (LoConModule, "lora", lambda m: m.get_diff_weight()[0]),
    "loha": (LohaModule, "loha", lambda m: m.get_weight(m.shape)),
    "lokr": (LokrModule, "lokr", lambda m: m.get_weight(m.shape)),
}


@pytest.mark.parametrize("algo", list(DORA_MODULES))
@pytest.mark.parametrize("layer_kind", ["linear", "conv"])
@pytest.mark.parametrize("wd_on_out", [True, False])
def test_dora_at_multiplier_one(algo, layer_kind, wd_on_out, tmp_path):
    """DoRA merged at multiplier 1: W + dora(W, delta, magnitude, 1) is LyCORIS's rescaled W + delta."""
    cls, kind, lycoris_delta = DORA_MODULES[algo]
    layer = make_layer(layer_kind)
    module = randomise(
        cls(
            PREFIX,
            layer,
            lora_dim=2,
            alpha=1,
            weight_decompose=True,
            wd_on_out=wd_on_out,
        )
    )
    tensors = saved(module)
    assert "dora_scale" in tensors
    magnitude = tensors["dora_scale"]
    axis = 0 if wd_on_out else 1
    assert (
        magnitude.numel() == layer.weight.shape[axis]
        and magnitude.shape[axis] == layer.weight.shape[axis]
    )
    weight = layer.weight.detach().clone()
    delta = lycoris_delta(module)
    merged = weight_decompose(weight + delta, magnitude, 1.0, wd_on_out)
    if algo == "locon":  # its merge applies the scale once, so it is a second reference
        assert_close(merged, module.get_merged_weight()[0], EXACT)

    network = ours(kind, tensors)
    ours_delta, _ = network.delta(weight)
    assert_close(ours_delta, delta, EXACT)
    assert_close(
        weight + dora(weight, ours_delta, network.factors["dora_scale"], 1.0),
        merged,
        EXACT,
    )

    x = sample_input(layer)
    module.apply_to()
    with torch.no_grad():
        expected = layer(x)  # LyCORIS's forward, multiplier 1
    assert_close(op(layer, x, merged, layer.bias.detach()), expected, EXACT)

    path = tmp_path / "net.safetensors"
    write_safetensors(
        {f"{PREFIX}.{key}": value.float() for key, value in tensors.items()}, path
    )
    module32 = read_lora(path).modules[PREFIX]
    delta32, _ = module32.delta(weight.float())
    merged32 = weight.float() + dora(
        weight.float(), delta32, module32.factors["dora_scale"], 1.0
    )
    assert_close(merged32, merged, FILE)


@pytest.mark.parametrize("layer_kind", ["linear", "conv"])
@pytest.mark.parametrize("wd_on_out", [True, False])
@pytest.mark.parametrize("multiplier", [0.5, 1.0, 1.5])
def test_dora_multiplier(layer_kind, wd_on_out, multiplier):
    """At multiplier m ours is W + m (rescaled(W + delta) - W), as A1111 and ComfyUI merge DoRA. LyCORIS's own
    weight_decompose interpolates from W + delta instead (W + delta + m (rescaled - W - delta)): the two differ
    by exactly (1 - m) delta, which this pins."""
    layer = make_layer(layer_kind)
    module = randomise(
        LoConModule(
            PREFIX,
            layer,
            lora_dim=3,
            alpha=2,
            weight_decompose=True,
            wd_on_out=wd_on_out,
        )
    )
    tensors = saved(module)
    weight = layer.weight.detach().clone()
    network = ours("lora", tensors)
    delta, _ = network.delta(weight)
    change = dora(weight, delta, network.factors["dora_scale"], multiplier)

    rescaled = weight_decompose(weight + delta, tensors["dora_scale"], 1.0, wd_on_out)
    assert_close(weight + change, weight + multiplier * (rescaled - weight), EXACT)
    lycoris_merged = weight_decompose(
        weight + delta, tensors["dora_scale"], multiplier, wd_on_out
    )
    assert_close(
        lycoris_merged, module.get_merged_weight(multiplier=multiplier)[0], EXACT
    )
    difference = lycoris_merged - (weight + change)
    assert (
        difference - (1 - multiplier) * delta
    ).abs().max().item() <= EXACT * lycoris_merged.abs().max().item()
    if multiplier != 1:
        assert (
            difference.abs().max().item() > 1e-6
        )  # the conventions do differ away from m = 1
