"""How well an autoencoder alone keeps the shapes world: drawn scenes -> encode -> decode -> the judge.

    python -m benchmarks.vae_roundtrip [VAE ...] [--scenes 400] [--seed 11]

Each VAE is a `latentforge train vae` run folder or vae.safetensors (default: the shipped model's).
Half the scenes have two objects. The latents are the posterior means (no sampling noise), so the
misses counted are what the decoder cannot draw back from what the encoder keeps: the ceiling of any
UNet on those latents. Prints, per VAE, the judged misses by attribute for one- and two-object scenes.
"""

from __future__ import annotations

import argparse
import random
from collections import Counter

import torch

from benchmarks.common import limit_threads


def misses(vae, scenes) -> Counter:
    """(objects, attribute) -> how many scenes the round trip gets wrong in that attribute."""
    from latentforge.images import tensor_to_images
    from latentforge.training.judge import judge_image, score
    from latentforge.training.world import draw, image_tensor

    images = torch.stack([image_tensor(draw(scene)) for scene in scenes])
    with torch.no_grad():
        decoded = vae.decode(vae.encode(images)[0]).clamp(-1, 1)
    counts: Counter = Counter()
    for scene, image in zip(scenes, tensor_to_images(decoded), strict=True):
        for attribute, right in score(judge_image(image), scene).items():
            counts[(len(scene.objects), attribute)] += not right
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("vaes", nargs="*", help="VAE run folders or vae.safetensors (default: the shipped model's)")
    parser.add_argument("--scenes", type=int, default=400)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    limit_threads()
    import latentforge
    from latentforge.training.loop import load_part
    from latentforge.training.world import sample_scene

    rng = random.Random(args.seed)
    scenes = [sample_scene(rng, 0.5) for _ in range(args.scenes)]
    totals = Counter(len(scene.objects) for scene in scenes)
    sources = args.vaes or ["shipped"]
    for source in sources:
        vae = latentforge.load(dtype="float32").vae if source == "shipped" else load_part(source, "vae")
        counts = misses(vae, scenes)
        for objects in (1, 2):
            wrong = ", ".join(f"{a} {counts[(objects, a)]}" for a in ("colour", "shape", "size", "all"))
            print(f"{source}: {objects} object(s), {totals[objects]} scenes; wrong: {wrong}")


if __name__ == "__main__":
    main()
