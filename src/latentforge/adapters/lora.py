"""LoRA and LyCORIS networks: read a file, place its modules in a loaded model, and merge their weight changes
into the weights (no per-step cost), keeping the original values so that the next request restores them exactly.

A network module changes one weight W (out, in) or (out, in, kh, kw) by a delta built from its factors; its
file keys are the module key (see names.py) + one of these suffixes:

- LoRA (kohya, LoCon, diffusers, PEFT): `lora_down.weight` D (r, in[, kh, kw]), `lora_up.weight` U (out, r[, 1, 1]),
  delta = U D; with `lora_mid.weight` M (r, r, kh, kw) (CP-decomposed convolution) the three are chained;
  PEFT's `lora_A` / `lora_B` and diffusers' `lora.down` / `lora.up` are D and U.
- LoHa: `hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b` (and Tucker cores `hada_t1`, `hada_t2`):
  delta = (W1a W1b) * (W2a W2b), elementwise.
- LoKr: `lokr_w1` (or `lokr_w1_a` `lokr_w1_b`), `lokr_w2` (or `lokr_w2_a` `lokr_w2_b`, Tucker core `lokr_t2`):
  delta = W1 (x) W2, the Kronecker product.
- IA3: `weight` (a vector) and `on_input`: delta = W * w, per output row (per input column with on_input).
- full: `diff` (the whole delta) and optionally `diff_b` (the bias's).

`alpha` scales LoRA, LoHa and factored LoKr deltas by alpha / r (no alpha: 1). `dora_scale` (DoRA) rescales
the merged weight W + delta to the stored magnitude per output row or input column, whichever its shape says.
A weight multiplier m (the prompt's `<lora:name:m>`) gives W + m * delta (DoRA: W + m * (rescaled - W)).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..weightfiles import CheckpointError, read_state_dict
from .names import patchable_modules, spellings, split_part

PathLike = str | os.PathLike

# suffix as files write it -> our name for the factor (PEFT / diffusers spellings of LoRA's two factors folded in)
SUFFIXES = {
    "lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid",
    "lora_A.weight": "down", "lora_B.weight": "up", "lora.down.weight": "down", "lora.up.weight": "up",
    "lora_linear_layer.down.weight": "down", "lora_linear_layer.up.weight": "up",
    "hada_w1_a": "w1a", "hada_w1_b": "w1b", "hada_w2_a": "w2a", "hada_w2_b": "w2b", "hada_t1": "t1", "hada_t2": "t2",
    "lokr_w1": "k1", "lokr_w1_a": "k1a", "lokr_w1_b": "k1b", "lokr_w2": "k2", "lokr_w2_a": "k2a", "lokr_w2_b": "k2b",
    "lokr_t2": "kt2",
    "diff": "diff", "diff_b": "diff_b", "weight": "ia3", "on_input": "on_input",
    "alpha": "alpha", "dora_scale": "dora_scale",
}  # fmt: skip
# what each kind of module needs; the first kind whose needs a module has is its kind
KINDS = {
    "lora": ({"down", "up"}, {"mid", "alpha", "dora_scale"}),
    "loha": ({"w1a", "w1b", "w2a", "w2b"}, {"t1", "t2", "alpha", "dora_scale"}),
    "lokr": (set(), {"k1", "k1a", "k1b", "k2", "k2a", "k2b", "kt2", "alpha", "dora_scale"}),
    "full": ({"diff"}, {"diff_b", "alpha"}),
    "ia3": ({"ia3", "on_input"}, set()),  # LyCORIS always writes on_input; a bare `.weight` is no network
}
UNSUPPORTED = {"oft_blocks": "LyCORIS OFT", "oft_diag": "LyCORIS OFT", "a1.weight": "LyCORIS GLoRA", "w_norm": "LyCORIS norm"}
CHECKPOINT_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.")
PEFT_METADATA = "lora_adapter_metadata"  # diffusers' safetensors metadata: the PEFT config (lora_alpha, r)
PEFT_PARTS = ("unet", "text_encoder", "text_encoder_2", "transformer")
MAX_LISTED = 5


@dataclass(frozen=True)
class NetworkModule:
    """One module of a network file: its kind and factors (float32, CPU)."""

    kind: str
    factors: dict[str, torch.Tensor]
    key: str  # its module key in the file, for messages

    @property
    def scale(self) -> float:
        """alpha / rank where the kind has a rank and the file an alpha, else 1."""
        alpha = self.factors.get("alpha")
        rank = _rank(self)
        if alpha is None or rank is None:
            return 1.0
        return float(alpha) / rank

    def add_to(self, merged: torch.Tensor, original: torch.Tensor, multiplier: float) -> torch.Tensor | None:
        """merged (float32, contiguous, the weight's shape) += multiplier * this module's change, in place;
        returns the bias's change times the multiplier, or None. A plain LoRA is one fused matrix product
        into `merged` (no delta is allocated)."""
        f = self.factors
        if self.kind == "lora" and "mid" not in f and "dora_scale" not in f:
            rows = merged.view(merged.shape[0], -1)
            rows.addmm_(_matrix(f["up"]), _matrix(f["down"]), alpha=self.scale * multiplier)
            return None
        base = original.float()
        delta, bias = self.delta(base)
        if "dora_scale" in f:
            merged += dora(base, delta, f["dora_scale"], multiplier)
        else:
            merged.add_(delta, alpha=multiplier)
        return None if bias is None else bias * multiplier

    def delta(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The change of `weight` (out, in[, kh, kw]) and of its bias (or None) at multiplier 1, float32."""
        f = self.factors
        if self.kind == "ia3":
            return _ia3(f["ia3"], weight, bool(f.get("on_input", torch.tensor(0)).item())), None
        if self.kind == "full":
            bias = f.get("diff_b")
            return f["diff"].reshape(weight.shape), bias
        built = BUILDERS[self.kind](f, weight.shape)
        return built.reshape(weight.shape) * self.scale, None


def _rank(module: NetworkModule) -> int | None:
    """The rank that alpha divides: LoRA's and LoHa's inner width; LoKr's only when a side is factored."""
    f = module.factors
    if module.kind == "lora":
        return f["down"].shape[0]
    if module.kind == "loha":
        return f["w1b"].shape[0]
    if module.kind == "lokr":
        factored = f.get("k1b", f.get("k2b"))
        return None if factored is None else factored.shape[0]
    return None


def _matrix(x: torch.Tensor) -> torch.Tensor:
    """(a, b, ...) -> (a, b * ...)."""
    return x.reshape(x.shape[0], -1)


def _tucker(core: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """A Tucker-decomposed weight: core (i, j, kh, kw), wa (i, out), wb (j, in) -> (out, in, kh, kw)."""
    return torch.einsum("ijkl,ip,jr->prkl", core, _matrix(wa), _matrix(wb))


def _lora(f: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """up (out, r) @ down (r, in * k * k); with a mid core (r_up, r_down, kh, kw): (out, in, kh, kw)."""
    if "mid" in f:
        return _tucker(f["mid"], _matrix(f["up"]).T, f["down"])
    return _matrix(f["up"]) @ _matrix(f["down"])


def _loha(f: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """(W1a W1b) * (W2a W2b); with Tucker cores each product is rebuilt through its core (wa then (r, out))."""
    if "t1" in f:
        first, second = _tucker(f["t1"], f["w1a"], f["w1b"]), _tucker(f["t2"], f["w2a"], f["w2b"])
    else:
        first, second = _matrix(f["w1a"]) @ _matrix(f["w1b"]), _matrix(f["w2a"]) @ _matrix(f["w2b"])
    return first * second


def _lokr(f: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """kron(W1, W2), W1 (a, b) and W2 (c, d[, kh, kw]) each whole or as a product of two factors."""
    w1 = f["k1"] if "k1" in f else f["k1a"] @ f["k1b"]
    if "k2" in f:
        w2 = f["k2"]
    elif "kt2" in f:
        w2 = _tucker(f["kt2"], f["k2a"], f["k2b"])
    else:
        w2 = f["k2a"] @ _matrix(f["k2b"])
        if len(shape) == 4:
            w2 = w2.reshape(w2.shape[0], -1, *shape[2:])
    while w1.dim() < w2.dim():
        w1 = w1.unsqueeze(-1)
    return torch.kron(w1.contiguous(), w2.contiguous())  # kron fails on strided views, e.g. the Tucker einsum's


BUILDERS = {"lora": _lora, "loha": _loha, "lokr": _lokr}  # kind -> (factors, weight shape) -> delta before scaling


def _ia3(w: torch.Tensor, weight: torch.Tensor, on_input: bool) -> torch.Tensor:
    """W * w, w scaling each output row (or each input column with on_input)."""
    view = [1] * weight.dim()
    view[1 if on_input else 0] = -1
    return weight.float() * w.reshape(view)


def dora(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, multiplier: float) -> torch.Tensor:
    """DoRA's change: W + delta rescaled to `magnitude` per output row ((out, 1, ...) magnitude) or per input
    column ((1, in, ...)), minus W, times the multiplier. float32 in, float32 out."""
    merged = weight + delta
    if magnitude.shape[0] == weight.shape[0] and magnitude.numel() == weight.shape[0]:
        norm = _matrix(merged).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))
    else:
        norm = _matrix(merged.transpose(0, 1)).norm(dim=1).reshape(1, -1, *[1] * (weight.dim() - 2))
    rescaled = merged * (magnitude.reshape(norm.shape) / (norm + torch.finfo(norm.dtype).eps))
    return (rescaled - weight) * multiplier


@dataclass(frozen=True)
class LoraFile:
    """A network file as read: its modules by module key (not yet placed in a model)."""

    name: str  # the file's stem, as prompts name it
    path: Path
    modules: dict[str, NetworkModule]
    metadata: dict[str, object] = field(default_factory=dict)


def read_lora(path: PathLike) -> LoraFile:
    """Read a LoRA / LyCORIS / PEFT file through the safe reader and group its tensors by module."""
    path = Path(path)
    tensors, metadata = read_state_dict(path)
    if not tensors:
        raise CheckpointError(path, "holds no tensors; it is not a LoRA")
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in tensors.items():
        placed = _split_key(key)
        if placed is None:
            unknown.append(key)
            continue
        module, factor = placed
        if not tensor.is_floating_point() and factor != "on_input":
            raise CheckpointError(path, f"{key!r} holds {tensor.dtype} values, not weights; re-download the file")
        groups.setdefault(module, {})[factor] = tensor.detach().to("cpu", torch.float32)
    for module in [m for m, factors in groups.items() if set(factors) == {"ia3"}]:  # plain weights, not IA3
        unknown.append(f"{module}.weight")
        del groups[module]
    if unknown:
        what = next((name for marker, name in UNSUPPORTED.items() if any(k.endswith(marker) for k in unknown)), None)
        if what:
            raise CheckpointError(path, f"is a {what} network, which latentforge cannot apply (LoRA, LoCon, LoHa, LoKr, IA3, full and DoRA can)")
        if any(key.startswith(CHECKPOINT_PREFIXES) for key in unknown):
            raise CheckpointError(path, "is a model checkpoint, not a LoRA: load it as the model (--model)")
        raise CheckpointError(path, f"is not a LoRA / LyCORIS file: keys such as {_few(unknown)} are no network weights")
    configs = _peft_configs(path, metadata)
    modules = {}
    for module, factors in groups.items():
        if configs and "alpha" not in factors and "down" in factors:
            alpha = _peft_alpha(path, configs, module, factors["down"].shape[0])
            if alpha is not None:
                factors["alpha"] = torch.tensor(alpha)
        modules[module] = _module(path, module, factors)
    return LoraFile(path.stem, path, modules, metadata)


def _split_key(key: str) -> tuple[str, str] | None:
    """A tensor key -> (module key, factor name), or None if it ends in no network suffix."""
    key = _older_diffusers(key)
    for suffix, factor in SUFFIXES.items():
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], factor
    return None


def _older_diffusers(key: str) -> str:
    """diffusers' first LoRA files name attention factors `attn1.processor.to_q_lora.down.weight`."""
    for proj, module in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out", "to_out.0")):
        marker = f".processor.{proj}_lora."
        if marker in key:
            return key.replace(marker, f".{module}.lora.")
    return key


def _peft_configs(path: Path, metadata: Mapping[str, object]) -> dict[str, dict]:
    """diffusers' adapter metadata (the PEFT LoraConfig of each part) by part prefix ("unet", "text_encoder",
    ..., "" for a file of one part). diffusers writes it flat ("unet.lora_alpha": 8, ...)."""
    raw = metadata.get(PEFT_METADATA)
    if raw is None:
        return {}
    try:
        config = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        config = None
    if not isinstance(config, dict):
        raise CheckpointError(path, f"its {PEFT_METADATA} metadata is not a JSON object; re-export the LoRA")
    parts: dict[str, dict] = {}
    for key, value in config.items():
        head, dot, rest = key.partition(".")
        if head in PEFT_PARTS and isinstance(value, dict) and not dot:
            parts.setdefault(head, {}).update(value)
        elif head in PEFT_PARTS and dot:
            parts.setdefault(head, {})[rest] = value
        else:
            parts.setdefault("", {})[key] = value
    return parts


def _peft_alpha(path: Path, configs: Mapping[str, dict], module: str, rank: int) -> float | None:
    """The alpha a PEFT config gives a module (its alpha_pattern, else lora_alpha; rsLoRA's alpha / sqrt(r)
    as an alpha over r), or None without a config."""
    part, _, name = module.partition(".")
    config = configs.get(part) if part in configs else configs.get("")
    if config is None:
        return None
    if part not in configs:
        name = module
    alpha = config.get("lora_alpha")
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if name == pattern or name.endswith("." + pattern) or re.fullmatch(pattern, name):
            alpha = value
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise CheckpointError(path, f"its PEFT config gives {module!r} no usable lora_alpha ({alpha!r}); re-export the LoRA")
    return float(alpha) * (math.sqrt(rank) if config.get("use_rslora") else 1.0)


def _module(path: Path, key: str, factors: dict[str, torch.Tensor]) -> NetworkModule:
    """Name the kind of a module from its factors; refuse incomplete or damaged ones."""
    names = set(factors)
    for kind, (needed, optional) in KINDS.items():
        if needed <= names and names <= needed | optional and _complete(kind, names):
            for factor, tensor in factors.items():
                if factor != "on_input" and not bool(torch.isfinite(tensor).all()):
                    raise CheckpointError(path, f"{key}.{factor} holds NaN/inf values; the file is damaged: re-download it")
            return NetworkModule(kind, factors, key)
    raise CheckpointError(path, f"module {key!r} has factors {sorted(names)}, which make no LoRA/LyCORIS module; the file is incomplete")


def _complete(kind: str, names: set[str]) -> bool:
    """LoKr needs each side whole or as two factors; a LoHa with Tucker cores needs both."""
    if kind == "lokr":
        return ("k1" in names or {"k1a", "k1b"} <= names) and ("k2" in names or {"k2a", "k2b"} <= names)
    if kind == "loha":
        return ("t1" in names) == ("t2" in names)
    return True


def _few(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:MAX_LISTED])
    return shown + (f" and {len(keys) - MAX_LISTED} more" if len(keys) > MAX_LISTED else "")


# -------------------------------------------------------------------------------------------------
# Placing a file's modules in a model


@dataclass(frozen=True)
class Placed:
    """A network file placed in one model: (part, our module name) -> its network module."""

    file: LoraFile
    modules: dict[tuple[str, str], NetworkModule]

    @property
    def parts(self) -> set[str]:
        return {part for part, _ in self.modules}


def place(lora: LoraFile, models: Mapping[str, nn.Module], unet_config) -> Placed:
    """Find each of the file's modules in `models` (part name -> module) and check that its delta fits the
    weight there; a module found nowhere, or a shape that does not fit, is one error naming the file."""
    tables = {
        part: spellings(part, list(patchable_modules(model)), unet_config if part == "unet" else None)
        for part, model in models.items()
        if part != "vae"
    }
    placed, lost = {}, []
    for key, module in lora.modules.items():
        split = split_part(key)
        ours = None if split is None or split[0] not in tables else tables[split[0]].get(split[1])
        if ours is None:
            lost.append(key)
            continue
        placed[(split[0], ours)] = module
    if lost:
        hint = _mismatch_hint(lost, tables)
        raise CheckpointError(lora.path, f"{len(lost)} of its {len(lora.modules)} modules match nothing in this model ({_few(lost)}){hint}")
    for (part, name), module in placed.items():
        weight = models[part].get_submodule(name).weight
        _check_fits(lora.path, module, weight)
    return Placed(lora, placed)


def _mismatch_hint(lost: list[str], tables: Mapping[str, dict[str, str]]) -> str:
    """Why modules might not match: a part the model lacks (an SDXL LoRA on SD 1.x), else a different model."""
    parts = {split[0] for key in lost if (split := split_part(key)) is not None}
    missing = parts - set(tables)
    if missing:
        return f"; this model has no {', '.join(sorted(missing))}: the LoRA was made for another model family (SDXL?)"
    return "; the LoRA was made for another model family or architecture: use one made for this model"


def _check_fits(path: Path, module: NetworkModule, weight: torch.Tensor) -> None:
    """The delta must have the weight's size: built from meta tensors (shapes only, no work)."""
    factors = {k: v.to("meta") for k, v in module.factors.items() if k not in ("alpha", "on_input")}
    try:
        if module.kind == "ia3":
            axis = 1 if float(module.factors.get("on_input", torch.tensor(0))) else 0
            ok = module.factors["ia3"].numel() == weight.shape[axis]
        elif module.kind == "full":
            ok = module.factors["diff"].numel() == weight.numel()
        else:
            ok = BUILDERS[module.kind](factors, weight.shape).numel() == weight.numel()
    except (RuntimeError, ValueError, IndexError):
        ok = False
    if not ok:
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in module.factors.items() if v.dim())
        raise CheckpointError(
            path,
            f"module {module.key!r} ({shapes}) does not fit this model's weight {tuple(weight.shape)}; "
            "the LoRA was made for another model family (e.g. SDXL vs SD 1.5): use one made for this model",
        )


# -------------------------------------------------------------------------------------------------
# Merging into the weights


@dataclass(frozen=True)
class Use:
    """A placed network and its multipliers for the text encoders and the UNet (A1111's te / unet weights)."""

    placed: Placed
    te: float = 1.0
    unet: float = 1.0

    def multiplier(self, part: str) -> float:
        return self.unet if part == "unet" else self.te


@dataclass
class Merger:
    """Merges networks into a model's weights and puts the original values back: it keeps each changed
    parameter's original tensor (the model's dtype), so restoring is exact."""

    originals: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)  # (part, parameter key)
    applied: tuple = ()  # the identity of what is merged now (see `_identity`)
    uses: list[Use] = field(default_factory=list)  # what is merged now

    @torch.no_grad()
    def restore(self, models: Mapping[str, nn.Module]) -> None:
        """Every changed parameter back to its original value, bit for bit."""
        self._put_back(models, keep=set())
        self.applied, self.uses = (), []

    @torch.no_grad()
    def apply(self, models: Mapping[str, nn.Module], uses: list[Use]) -> None:
        """Merge exactly `uses`: each weight they change <- its original + the sum of multiplier * delta (summed
        in float32, stored in the weight's dtype); every other weight changed before goes back to its original.
        Merging the same uses as now does nothing."""
        identity = tuple(_identity(use) for use in uses)
        if identity == self.applied:
            return
        changes = _changes(uses, set(models))
        self._put_back(models, keep={(part, f"{name}.weight") for part, name in changes})
        for (part, name), modules in changes.items():
            self._merge(models[part], part, name, modules)
        self.applied, self.uses = identity, list(uses)

    @torch.no_grad()
    def remerge(self, models: Mapping[str, nn.Module], parts: Iterable[str]) -> None:
        """Merge what is merged now into `parts` again, after their modules were rebuilt from the file (their
        kept originals belonged to the old modules)."""
        parts = set(parts)
        self.originals = {key: value for key, value in self.originals.items() if key[0] not in parts}
        for (part, name), modules in _changes(self.uses, parts).items():
            self._merge(models[part], part, name, modules)

    def _put_back(self, models: Mapping[str, nn.Module], keep: set[tuple[str, str]]) -> None:
        """Copy each kept original back into its parameter and forget it, except those in `keep` (weights about
        to be merged again from their original: their copy back would be overwritten)."""
        for key in [key for key in self.originals if key not in keep]:
            part, name = key
            models[part].get_parameter(name).copy_(self.originals.pop(key))

    def _merge(self, model: nn.Module, part: str, name: str, modules: list[tuple[NetworkModule, float]]) -> None:
        """One weight (and bias) <- original + each module's change times its multiplier, summed in float32."""
        layer = model.get_submodule(name)
        original = self._original(part, f"{name}.weight", layer.weight)
        merged = original.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        bias_total = None
        for module, multiplier in modules:
            bias = module.add_to(merged, original, multiplier)
            if bias is not None:
                bias_total = bias if bias_total is None else bias_total + bias
        layer.weight.copy_(merged)
        if bias_total is not None:
            if layer.bias is None:
                raise CheckpointError(modules[0][0].key, "changes a bias this model's layer does not have")
            bias = self._original(part, f"{name}.bias", layer.bias)
            layer.bias.copy_((bias.float() + bias_total).to(layer.bias.dtype))

    def _original(self, part: str, key: str, parameter: torch.Tensor) -> torch.Tensor:
        """The parameter's original value: kept from before the first merge that changed it."""
        if (part, key) not in self.originals:
            self.originals[(part, key)] = parameter.detach().clone()
        return self.originals[(part, key)]


def _changes(uses: list[Use], parts: set[str]) -> dict[tuple[str, str], list[tuple[NetworkModule, float]]]:
    """(part, module name) -> the network modules that change it, with their multipliers, for `parts`."""
    changes: dict[tuple[str, str], list[tuple[NetworkModule, float]]] = {}
    for use in uses:
        for (part, name), module in use.placed.modules.items():
            if part in parts and use.multiplier(part) != 0:
                changes.setdefault((part, name), []).append((module, use.multiplier(part)))
    return changes


def _identity(use: Use) -> tuple:
    """What makes two uses the same: the file (path and modification time) and the multipliers."""
    path = use.placed.file.path
    try:
        stamp = os.stat(path).st_mtime_ns
    except OSError:
        stamp = None
    return (str(path), stamp, id(use.placed), use.te, use.unet)


def effective_rank(lora: LoraFile) -> int | None:
    """The largest LoRA rank in the file (for listings), or None if it has no LoRA modules."""
    ranks = [_rank(m) for m in lora.modules.values() if m.kind == "lora"]
    return max(ranks) if ranks else None

