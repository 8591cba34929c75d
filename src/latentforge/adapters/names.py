"""Where the modules named in a LoRA file are in our models: one table per model part, built from the module
tree and layouts.py's UNet table, holding every spelling real files use.

- kohya / A1111 files flatten a module path with "_" after a part prefix: `lora_unet_`, `lora_te_` (SD 1.x/2.x),
  `lora_te1_` / `lora_te2_` (SDXL). The UNet path is in diffusers' names in SD 1.x/2.x kohya files
  (`down_blocks_0_attentions_0_proj_in`) and in the original LDM names in SDXL ones
  (`input_blocks_1_1_proj_in`); the text encoders' in transformers' (`text_model_encoder_layers_0_mlp_fc1`).
- diffusers / PEFT files keep dots after a part prefix: `unet.down_blocks.0.attentions.0.proj_in`,
  `text_encoder.text_model.encoder.layers.0.mlp.fc1`.

Our UNet's module names are the LDM ones and our text encoders' are transformers' without `text_model.`.
"""

from __future__ import annotations

from torch import nn

from ..layouts import unet_to_diffusers
from ..unet import UNetConfig

# part prefixes of kohya files, longest first so that "lora_te1_" is not read as "lora_te_" + "1_..."
KOHYA_PARTS = {"lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2", "lora_te_": "text_encoder", "lora_unet_": "unet"}
# part prefixes of diffusers / PEFT files
DOTTED_PARTS = {"text_encoder_2.": "text_encoder_2", "text_encoder.": "text_encoder", "unet.": "unet"}
TEXT_MODEL = "text_model."  # transformers' tower prefix, absent from our text encoders' names


def patchable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules an add-on can change: those with a 2-d (linear) or 4-d (convolution) weight, by name."""
    found = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.dim() in (2, 4) and not isinstance(module, nn.Embedding):
            found[name] = module
    return found


def flat(name: str) -> str:
    """A dotted module path as kohya writes it: dots become underscores."""
    return name.replace(".", "_")


def spellings(part: str, ours: list[str], unet_config: UNetConfig | None = None) -> dict[str, str]:
    """Every accepted spelling of each of a part's module names (dotted and kohya-flat, LDM and diffusers for
    the UNet) -> our module name. Two modules never share a spelling (checked)."""
    if part == "unet":
        if unet_config is None:
            raise ValueError("the UNet's module spellings need its config")
        renamed = unet_to_diffusers({name + ".weight": name for name in ours}, unet_config)
        theirs = {name: key.removesuffix(".weight") for key, name in renamed.items()}
    else:
        theirs = {name: TEXT_MODEL + name for name in ours}
    table: dict[str, str] = {}
    for name in ours:
        for spelling in {name, theirs[name], flat(name), flat(theirs[name])}:
            if table.setdefault(spelling, name) != name:
                raise AssertionError(f"{part}: {spelling!r} names both {table[spelling]!r} and {name!r}")
    return table


def split_part(module_key: str) -> tuple[str, str] | None:
    """A file's module key -> (our part name, the module's path within the part), or None if it has no part
    prefix that any format uses."""
    for prefixes in (KOHYA_PARTS, DOTTED_PARTS):
        for prefix, part in prefixes.items():
            if module_key.startswith(prefix):
                return part, module_key[len(prefix) :]
    return None


def kohya_name(part: str, module: str, unet_config: UNetConfig | None = None, ldm: bool = False) -> str:
    """Our module name -> its kohya module key, as kohya's trainers write it: `lora_unet_` + the diffusers
    path (SD 1.x/2.x) or, with `ldm`, the LDM path (SDXL); `lora_te_` (`lora_te1_`/`lora_te2_` for SDXL, with
    `ldm`) + the transformers path."""
    if part == "unet":
        path = module
        if not ldm:
            if unet_config is None:
                raise ValueError("the UNet's diffusers names need its config")
            path = next(iter(unet_to_diffusers({module + ".weight": None}, unet_config))).removesuffix(".weight")
        return "lora_unet_" + flat(path)
    prefix = {"text_encoder": "lora_te1_" if ldm else "lora_te_", "text_encoder_2": "lora_te2_"}[part]
    return prefix + flat(TEXT_MODEL + module)
