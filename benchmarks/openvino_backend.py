"""Would an OpenVINO backend for latentforge's own UNet pay? (issue 21's route (b); docs/design.md, "Skipping work")

    PYTHONPATH=src ../ov-venv/bin/python -m benchmarks.openvino_backend [--repeats 3]

Runs in OpenVINO's environment (docs/benchmarks.md, "OpenVINO's environment") with this repository's source
on the path. On the random-weight SD 1.5 file (benchmarks.load): our UNet, its inference fast paths off so that
the plain graph is traced, converted with `openvino.convert_model` and compiled (OpenVINO's default precision:
bfloat16 on this CPU), against the same UNet in PyTorch bfloat16, a guided step (batch 2, 64 x 64 latents)
each, taking turns; and one top-level self-attention (2 x 8 heads x 4,096 tokens x 40) in OpenVINO's fused
SDPA against latentforge's `attention`. Prints the figures; nothing is written.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from benchmarks.common import THREADS, limit_threads
from benchmarks.load import FILES


def median_times(ways: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Each way once to warm up, then `repeats` timed calls taking turns (order reversed every other round)."""
    for way in ways.values():
        way()
    times: dict[str, list[float]] = {name: [] for name in ways}
    for i in range(repeats):
        for name in list(ways)[:: 1 if i % 2 == 0 else -1]:
            start = time.perf_counter()
            ways[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def unet_step(repeats: int) -> None:
    import openvino as ov
    import torch

    import latentforge

    plain = latentforge.load(FILES["fp32"], dtype="float32", device="cpu").unet.eval()
    for module in plain.modules():  # the plain graph: no inference fast path traced into it
        if hasattr(module, "inference"):
            module.inference = False
    g = torch.Generator().manual_seed(0)
    x, t, context = torch.randn(2, 4, 64, 64, generator=g), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 768, generator=g)
    start = time.perf_counter()
    with torch.no_grad():
        model = ov.convert_model(plain, example_input=(x, t, context))
    converted = time.perf_counter() - start
    del plain
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": str(THREADS)})
    precision = compiled.get_property("INFERENCE_PRECISION_HINT")
    request, inputs = compiled.create_infer_request(), (x.numpy(), t.numpy(), context.numpy())
    ours = latentforge.load(FILES["fp32"], dtype="bfloat16", device="cpu")
    xb, cb = x.bfloat16(), context.bfloat16()

    def torch_step() -> object:
        with torch.no_grad():
            return ours.unet(xb, t, cb)

    times = median_times({"openvino": lambda: request.infer(inputs), "pytorch": torch_step}, repeats)
    difference = (torch.from_numpy(compiled(inputs)[0]) - torch_step().float()).abs().max().item()
    print(f"our UNet through OpenVINO ({precision}): converted in {converted:.0f} s; guided step {times['openvino']:.2f} s "
          f"against {times['pytorch']:.2f} s in PyTorch bfloat16 ({times['openvino'] / times['pytorch']:.2f}x); "
          f"max |difference| {difference:.3g}")  # fmt: skip


def attention(repeats: int) -> None:
    import openvino as ov
    import torch

    from latentforge.attention import attention as ours

    class SDPA(torch.nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 8, 4096, 40, generator=g) for _ in range(3))
    compiled = ov.Core().compile_model(ov.convert_model(SDPA(), example_input=(q, k, v)), "CPU",
                                       {"INFERENCE_NUM_THREADS": str(THREADS)})  # fmt: skip
    request, inputs = compiled.create_infer_request(), (q.numpy(), k.numpy(), v.numpy())
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()

    def torch_attention() -> object:
        with torch.no_grad():
            return ours(qb, kb, vb)

    times = median_times({"openvino": lambda: request.infer(inputs), "latentforge": torch_attention}, repeats)
    print(f"one top-level self-attention, bfloat16: OpenVINO's SDPA {times['openvino']:.3f} s, "
          f"latentforge's {times['latentforge']:.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    limit_threads()
    attention(args.repeats * 2)
    unet_step(args.repeats)


if __name__ == "__main__":
    main()
