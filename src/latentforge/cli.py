"""The `latentforge` command: a thin front over the library."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__


def cmd_tokenize(args: argparse.Namespace) -> None:
    """Print the 77 token ids of a prompt (SD 1.x padding, or SD 2.x with --pad-zero)."""
    from .tokenizer import Tokenizer

    tokenizer = Tokenizer(pad_token="!" if args.pad_zero else "<|endoftext|>")
    ids = tokenizer(args.prompt)[0].tolist()
    print(" ".join(str(i) for i in ids))


def cmd_inspect(args: argparse.Namespace) -> None:
    """Print what a checkpoint is: layout, version, prediction type, part sizes."""
    from .checkpoints import read_checkpoint

    config, parts = read_checkpoint(args.path, args.prediction_type)
    layout = "diffusers folder" if Path(args.path).is_dir() else "single file"
    print(f"{args.path}: {layout}, {config.describe()}")
    for name, tensors in parts.items():
        count = sum(t.numel() for t in tensors.values())
        dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
        print(f"  {name}: {count / 1e6:.1f}M parameters ({', '.join(dtypes)})")


def cmd_convert(args: argparse.Namespace) -> None:
    """Convert between the single-file and diffusers layouts, and between float dtypes."""
    from .checkpoints import CheckpointError, read_checkpoint, write_diffusers, write_single_file
    from .pipeline import DTYPES, load_tokenizer

    dst = Path(args.dst)
    if dst.exists():
        raise CheckpointError(dst, "already exists", "choose a new destination (nothing is overwritten)")
    layout = args.to or ("single" if dst.suffix == ".safetensors" else "diffusers")
    if layout == "single" and dst.suffix != ".safetensors":
        raise ValueError(f"{dst}: a single-file checkpoint is written as .safetensors; name it {dst.name}.safetensors")
    dtype = DTYPES[args.dtype] if args.dtype else None
    config, parts = read_checkpoint(args.src, args.prediction_type)
    if layout == "single":
        write_single_file(config, parts, dst, dtype)
    else:
        write_diffusers(config, parts, dst, load_tokenizer(args.src, config), dtype)
    print(f"wrote {dst} ({'single file' if layout == 'single' else 'diffusers folder'}, {config.describe()})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentforge", description="Stable Diffusion in plain PyTorch.")
    parser.add_argument("--version", action="version", version=f"latentforge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tokenize", help="print the 77 CLIP token ids of a prompt")
    p.add_argument("prompt")
    p.add_argument("--pad-zero", action="store_true", help="pad with token 0 as SD 2.x does (default: end token)")
    p.set_defaults(func=cmd_tokenize)

    prediction = dict(
        choices=["epsilon", "v_prediction"],
        help="override what the model predicts, for SD 2.x files whose weights cannot tell",
    )
    p = sub.add_parser("inspect", help="tell what a checkpoint is (version, prediction type, sizes)")
    p.add_argument("path", help="a .safetensors/.ckpt file or a diffusers folder")
    p.add_argument("--prediction-type", **prediction)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "convert",
        help="convert a checkpoint between the single-file and diffusers layouts and float types",
        description="Reads SRC (single file or diffusers folder) and writes DST: a .safetensors name gets "
        "the original single-file layout, any other name a diffusers folder. DST must not exist.",
    )
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--to", choices=["single", "diffusers"], help="layout of DST (default: from its name)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="store weights as (default: as read)")
    p.add_argument("--prediction-type", **prediction)
    p.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError) as e:  # user input problems: one line, no traceback
        print(f"latentforge {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
