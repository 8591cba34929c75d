"""`latentforge explain`: the figures of "The Illustrated Stable Diffusion", drawn from a real run of the model.

`explain(pipe, prompt)` runs one generation with probes on it (the sampler's callback, cross-attention probes),
a handful of extra UNet and VAE calls, and returns the `Run`: every number the page shows. `render(run)` turns
it into one self-contained HTML page (matplotlib figures as PNG data URIs; no network needed to read it).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import html
import io
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from string import Template

import torch
import torch.nn.functional as F
from PIL import Image

from ..guidance import to_x0
from ..images import image_to_tensor
from ..pipeline import Pipeline, Step
from ..prompts import chunk_prompt, embedding_slots
from ..schedules import NoiseSchedule
from ..unet import Attention
from .clip import ClipBatch, image_caption_similarity, read_clip

SHOWN_STEPS = 4  # at most this many steps are decoded and drawn (evenly spaced, the first and last always)
ATTENTION_STEPS = 3  # steps whose cross-attention maps are drawn: first, middle, last
NOISE_LEVELS = 5  # forward diffusion: level 0 is the clean latents, level k the training step k/(n-1) of the way
TRAINING_LEVEL = 2  # the level of the training example
HIGH_GUIDANCE = 7.5  # the "high" guidance of the comparison (twice the default when that is higher)
BATCH_PIXELS = 4 * 512 * 512  # the figures' latents are decoded together, this many image pixels per VAE call
MISSING = "latentforge explain draws with matplotlib: pip install 'latentforge[explain]'"


@dataclass
class AttentionMaps:
    """Cross-attention probabilities of the conditional pass, averaged over heads and layers, per step."""

    maps: dict[int, torch.Tensor] = field(default_factory=dict)  # step -> (77, h, w) at latent size
    layers: dict[int, int] = field(default_factory=dict)  # step -> attention calls averaged
    sum_error: float = 0.0  # the largest |sum over tokens - 1| of any pixel of any head, before averaging


@dataclass
class Run:
    """Everything the page shows, from one run."""

    prompt: str
    model: str
    seed: int
    sampler: str
    cfg_scale: float
    decoder: str  # what painted the figures' images: "the VAE decoder" or "the tiny decoder (TAESD)"
    ids: list[int]  # the 77 token ids (of the first chunk: a longer prompt is read in chunks)
    weights: list[float]  # their emphasis weights ("(red:1.3)" gives red 1.3)
    prompt_tokens: int  # the prompt's tokens, all chunks, without start and end
    tokens: list[str]  # their strings
    special: dict[str, int]  # "start", "end", "pad" -> id
    context: torch.Tensor  # (77, width) the prompt's text vectors
    parameters: dict[str, int]  # part -> parameter count
    image: Image.Image
    latents: torch.Tensor  # (1, 4, h, w) the final latents
    steps: list[Step]  # every sampler step, from the callback
    shown: list[int]  # the steps drawn
    step_images: list[Image.Image]  # the current latents of each shown step, decoded
    denoised_images: list[Image.Image]  # the predicted clean latents of each shown step, decoded
    guidance_steps: list[int]  # steps whose UNet outputs were kept (their first call: the latents of the step before)
    scales: list[float]  # guidance 1, the default, high
    # at each guidance step, the predicted clean image of: the empty prompt, then each scale (1 = the prompt alone)
    guidance_images: list[list[Image.Image]]
    differences: list[torch.Tensor]  # (h, w) |cond - uncond| of the predicted clean latents, channel mean
    scale_runs: list[Image.Image]  # the same seed generated at each scale (only when asked for: two more runs)
    attention: AttentionMaps
    source: Image.Image  # the forward diffusion's input (the generated image or --image)
    noise_steps: list[int | None]  # the training step of each level (None: clean)
    noised_images: list[Image.Image]
    example: dict[str, torch.Tensor | float | int]  # noisy, noise, predicted (1, 4, h, w), t, error
    reconstruction: Image.Image  # the VAE round trip of `source`
    variations: list[str]  # the prompt and variations of it
    similarity: torch.Tensor  # (n, n) cosine similarities of their end-token text vectors
    clip: ClipBatch | None = None  # images against captions, by a CLIP model trained here (`clip=` its run folder)


def explain(
    pipe: Pipeline, prompt: str, seed: int = 0, steps: int | None = None, image: Image.Image | None = None,
    guidance_runs: bool = False, fast_decode: bool = False, clip: str | Path | None = None,
) -> Run:  # fmt: skip
    """Generate `prompt` once with probes, make the few extra UNet and VAE calls the figures need -> Run.

    The guidance figure mixes the run's own conditional and unconditional predictions at each scale;
    `guidance_runs` also generates the seed to the end at guidance 1 and the high scale (two more runs).
    `fast_decode` paints the step, guidance and noise-level figures with the model's tiny decoder (TAESD)
    instead of the VAE decoder; the image and its VAE round trip stay the VAE's. `clip`, the run folder of a
    CLIP model trained here (`latentforge train clip`), adds its images-against-captions matrix."""
    defaults = pipe.config.defaults
    clip_model = read_clip(clip) if clip is not None else None  # a bad folder is said before the run
    steps = defaults.steps if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int):  # the figures' steps are chosen before the run checks it
        raise ValueError(f"steps must be a whole number, got {steps!r}")
    if fast_decode and pipe.tiny_decoder is None:
        raise ValueError(
            "fast decoding needs a tiny decoder: give one (taesd_decoder) with --tiny-decoder FILE, or to the server "
            "with serve --tiny-decoder-dir DIR"
        )
    tokenizer = _tokenizer(pipe)
    shown = _spread(steps, SHOWN_STEPS)
    # the UNet's outputs are kept at an early and a middle shown step (their input: the step before's latents)
    guidance_steps = sorted({shown[1], shown[len(shown) // 2]}) if len(shown) > 1 else []
    result, collected, maps, outputs = _probed_run(pipe, prompt, seed, steps, tokenizer.max_length, guidance_steps)
    # what the run read: emphasis and BREAK parsed, and the embeddings it used (the conditioner holds them now)
    slots = {name: e.n_vectors for name, e in pipe.conditioner.embeddings.items()}
    chunks = chunk_prompt(tokenizer, prompt, embeddings=slots)
    ids = chunks.ids[0].tolist()
    high = max(HIGH_GUIDANCE, 2 * defaults.cfg_scale)
    scales = [1.0, defaults.cfg_scale, high]
    guidance_steps = sorted(outputs)  # none when the run was not guided
    mixed, differences = _guidance_mix(pipe, collected, outputs, scales)
    scale_runs = []
    if guidance_runs:
        scale_runs = [pipe.generate(prompt, seed=seed, steps=steps, cfg_scale=s)[0] for s in (1.0, high)]
        scale_runs.insert(1, result)
    cond = pipe.encode_prompt(prompt)[0]
    source = result if image is None else image.convert("RGB")
    forward = _forward_diffusion(pipe, source, cond, seed)
    # every figure's latents in a few decoder calls: the steps' latents and predictions, the guidance mixes,
    # the noise levels above 0 (level 0 is the VAE round trip, decoded by the VAE)
    figures = [collected[i].latents for i in shown] + [collected[i].denoised for i in shown]
    figures += [z for row in mixed for z in row] + forward["noisy"][1:]
    known = [] if fast_decode else [(collected[-1].latents, result)]  # the image's own latents: decoded already
    decoded = iter(_decode_all(pipe, figures, fast_decode, known))
    step_images, denoised_images = [next(decoded) for _ in shown], [next(decoded) for _ in shown]
    guidance_images = [[next(decoded) for _ in row] for row in mixed]
    noised_images = [forward["reconstruction"]] + list(decoded)
    words = prompt.split()
    variations = [prompt, " ".join(reversed(words)), " ".join(words[: max(1, len(words) // 2)]), "a photo", ""]
    return Run(
        prompt=prompt, model=pipe.name or "latentforge-shapes", seed=seed, sampler=defaults.sampler,
        cfg_scale=defaults.cfg_scale, decoder="the tiny decoder (TAESD)" if fast_decode else "the VAE decoder",
        ids=ids, weights=chunks.weights[0].tolist(), prompt_tokens=_token_count(chunks, tokenizer.eos_id),
        tokens=_token_strings(tokenizer, ids, slots),
        special={"start": tokenizer.bos_id, "end": tokenizer.eos_id, "pad": tokenizer.pad_id},
        context=cond.context[0, : len(ids)].float().cpu(),
        parameters={name: sum(p.numel() for p in m.parameters()) for name, m in pipe.models().items()},
        image=result, latents=collected[-1].latents.float().cpu(), steps=collected, shown=shown,
        step_images=step_images, denoised_images=denoised_images, guidance_steps=guidance_steps, scales=scales,
        guidance_images=guidance_images, differences=differences, scale_runs=scale_runs, attention=maps,
        source=source, noise_steps=forward["noise_steps"], noised_images=noised_images, example=forward["example"],
        reconstruction=forward["reconstruction"], variations=variations,
        similarity=_text_similarity(pipe, tokenizer, variations),
        clip=None if clip_model is None else image_caption_similarity(*clip_model, seed=seed),
    )  # fmt: skip


def _probed_run(pipe: Pipeline, prompt: str, seed: int, steps: int, tokens: int, guidance_steps: list[int]):
    """The generation with its probes -> (image, every step's callback, attention maps, the UNet's outputs at
    `guidance_steps` (unguided steps left out))."""
    collected: list[Step] = []
    maps, outputs = AttentionMaps(), {}
    step = collected.__len__  # the step the UNet is in: the callbacks so far
    with (
        attention_probes(pipe, maps, step, _attention_steps(steps), tokens) as probes,
        unet_outputs(pipe, outputs, step, guidance_steps),
    ):

        def on_step(s: Step) -> None:
            collected.append(s)
            probes.follow()

        image = pipe.generate(prompt, seed=seed, steps=steps, callback=on_step)[0]
    return image, collected, maps, outputs


def _tokenizer(pipe: Pipeline):
    tokenizer = getattr(pipe.conditioner, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(f"latentforge explain does not know this model family's tokenizer ({pipe.name})")
    return tokenizer


def _first_chunk(tokenizer, text: str) -> list[int]:
    """The ids of the text's first window of 77 (start, up to 75 tokens, end, padding), as the run reads them."""
    return chunk_prompt(tokenizer, text).ids[0].tolist()


def _token_strings(tokenizer, ids: list[int], embeddings: dict[str, int]) -> list[str]:
    """Each id's text; an embedding's slots show its name ("name#k" for the k-th of several vectors)."""
    names = {}
    for name, slots in embedding_slots(tokenizer, embeddings).items():
        names.update({i: name if len(slots) == 1 else f"{name}#{k}" for k, i in enumerate(slots)})
    return [names[i] if i in names else tokenizer.decode([i], skip_special_tokens=False) for i in ids]


def _token_count(chunks, end: int) -> int:
    """The prompt's tokens in all its windows (a longer prompt is generated from all of them, 75 at a time)."""
    return sum(row.index(end) - 1 for row in chunks.ids.tolist())


def _spread(n: int, k: int) -> list[int]:
    """At most k indices of range(n), evenly spaced, first and last included."""
    k = min(k, n)
    return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})


def _attention_steps(steps: int) -> set[int]:
    return set(_spread(steps, ATTENTION_STEPS))


def _decode_all(
    pipe: Pipeline, latents: list[torch.Tensor], fast: bool, known: list[tuple[torch.Tensor, Image.Image]] = ()
) -> list[Image.Image]:
    """Latents (1, 4, h, w) of one size -> images. Latents equal to one of `known` take its image, equal ones are
    decoded once, the rest together, BATCH_PIXELS image pixels per call (a batch may round a pixel differently
    by one level from a decode of its own)."""
    unique: list[torch.Tensor] = []
    slots: list[int | Image.Image] = []
    for z in latents:
        same = next((image for k, image in known if torch.equal(z, k)), None)
        if same is None:
            same = next((i for i, u in enumerate(unique) if torch.equal(z, u)), None)
            if same is None:
                unique.append(z)
                same = len(unique) - 1
        slots.append(same)
    decoded: list[Image.Image] = []
    if unique:
        h, w = unique[0].shape[-2:]
        per_call = max(1, BATCH_PIXELS // (h * w * pipe.config.vae.downscale**2))
        decode = pipe.preview if fast else pipe.decode
        decoded = [im for i in range(0, len(unique), per_call) for im in decode(torch.cat(unique[i : i + per_call]))]
    return [decoded[slot] if isinstance(slot, int) else slot for slot in slots]


class attention_probes:
    """Within it, every cross-attention module of the UNet adds its conditional row's probabilities, averaged
    over heads and upsampled to the latent size, to `maps` for the steps in `wanted` (`step()` tells the
    step: the callbacks so far). The probes are on only during those steps: call `follow()` after each step."""

    def __init__(self, pipe: Pipeline, maps: AttentionMaps, step, wanted: set[int], tokens: int):
        self.modules = [
            m for name, m in pipe.unet.named_modules() if name.endswith("attn2") and isinstance(m, Attention)
        ]
        self.maps, self.step, self.wanted, self.tokens = maps, step, wanted, tokens
        h = pipe.config.native_size // pipe.config.vae.downscale  # generate's default size
        self.size = (h, h)

    def __enter__(self):
        self.follow()
        return self

    def __exit__(self, *exc) -> None:
        for m in self.modules:
            m.probe = None

    def follow(self) -> None:
        """Probes on for a wanted step, off otherwise (an attention module computes the probabilities only for
        a probe)."""
        probe = self.add if self.step() in self.wanted else None
        for m in self.modules:
            m.probe = probe

    def add(self, probs: torch.Tensor) -> None:
        """probs (B, heads, N, M): the last row of the batch is the conditional pass (the pipeline's order)."""
        step = self.step()
        row = probs[-1, :, :, : self.tokens]  # (heads, N, 77)
        self.maps.sum_error = max(self.maps.sum_error, float((row.sum(-1) - 1).abs().max()))
        h, w = self.size
        scale = math.isqrt(h * w // row.shape[1])  # this level's downsampling of the latents
        grid = row.mean(0).T.reshape(1, self.tokens, h // scale, w // scale)
        grid = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)[0].cpu()
        self.maps.maps[step] = self.maps.maps.get(step, 0) + grid
        self.maps.layers[step] = self.maps.layers.get(step, 0) + 1


@contextlib.contextmanager
def unet_outputs(pipe: Pipeline, outputs: dict[int, torch.Tensor], step, wanted: list[int]):
    """Within it, the output (2, 4, h, w: unconditional, conditional) of the first UNet call of each step in
    `wanted` is kept in `outputs[step]` (a forward hook; `step()` tells the step). An unguided call (one row) or
    a composed one (AND: more rows) is not kept."""

    def keep(module, args, out) -> None:
        i = step()
        if i in wanted and i not in outputs and len(out) == 2:
            outputs[i] = out.float().cpu()

    handle = pipe.unet.register_forward_hook(keep)
    try:
        yield outputs
    finally:
        handle.remove()


def _guidance_mix(pipe: Pipeline, steps: list[Step], outputs: dict[int, torch.Tensor], scales: list[float]):
    """At each step of `outputs`: the predicted clean latents of the empty prompt and of the guided prediction
    at each scale (scale 1: the prompt alone), and |cond - uncond| of the clean latents (channel mean). The
    step's first call saw the latents the step before left (in sigma form: times sqrt(1 + sigma^2))."""
    mixed, differences = [], []
    for i, out in sorted(outputs.items()):
        before = steps[i - 1]
        sigma = torch.tensor(before.sigma)
        x = before.latents.float().cpu() * torch.sqrt(1 + sigma**2)
        uncond, cond = out.chunk(2)
        x0 = functools.partial(to_x0, x=x, sigma=sigma, prediction_type=pipe.config.prediction_type)
        row = [x0(uncond)] + [x0(uncond + s * (cond - uncond)) for s in scales]
        # the default scale's is the run's own prediction (the step's, when the sampler calls the UNet once a
        # step: the same numbers up to rounding, and the same picture, decoded once)
        if torch.allclose(row[2], steps[i].denoised.float().cpu(), rtol=0, atol=1e-4):
            row[2] = steps[i].denoised
        mixed.append(row)
        differences.append((x0(cond) - x0(uncond)).abs().mean(1)[0])
    return mixed, differences


@torch.no_grad()
def _forward_diffusion(pipe: Pipeline, source: Image.Image, cond, seed: int) -> dict:
    """The image encoded and noised at NOISE_LEVELS levels of the training schedule (latents; level 0 decoded:
    the VAE round trip); one training example at TRAINING_LEVEL with the UNet's predicted noise."""
    g = torch.Generator().manual_seed(seed)
    clean = pipe.encode_image(image_to_tensor(source), g).float().cpu()
    noise = torch.randn(clean.shape, generator=g)
    schedule = NoiseSchedule.from_config(pipe.config.scheduler or {})
    last = schedule.num_train_timesteps - 1
    noise_steps: list[int | None] = [None] + [round(k * last / (NOISE_LEVELS - 1)) for k in range(1, NOISE_LEVELS)]
    noisy = []
    for t in noise_steps:
        a = 1.0 if t is None else float(schedule.alphas_cumprod[t])
        noisy.append(math.sqrt(a) * clean + math.sqrt(1 - a) * noise)  # the training forward process (VP form)
    t = noise_steps[TRAINING_LEVEL]
    a = float(schedule.alphas_cumprod[t])
    x_t = noisy[TRAINING_LEVEL]
    dtype = pipe.unet.out[2].weight.dtype
    out = pipe.unet(x_t.to(pipe.device, dtype), torch.tensor([t]), cond.context, cond.vector).float().cpu()
    # a v-prediction model's output -> the noise it implies: eps = sqrt(a) v + sqrt(1 - a) x_t
    predicted = out if pipe.config.prediction_type == "epsilon" else math.sqrt(a) * out + math.sqrt(1 - a) * x_t
    example = {"noisy": x_t, "noise": noise, "predicted": predicted, "t": t,
               "error": float(F.mse_loss(predicted, noise))}  # fmt: skip
    return {"noise_steps": noise_steps, "noisy": noisy, "example": example, "reconstruction": pipe.decode(clean)[0]}


@torch.no_grad()
def _text_similarity(pipe: Pipeline, tokenizer, texts: list[str]) -> torch.Tensor:
    """(n, n) cosine similarities of the texts' vectors at their end token (what CLIP's text side pools), the
    texts encoded in one batch."""
    context = pipe.encode_prompt(texts)[0].context.float().cpu()
    ends = [_first_chunk(tokenizer, text).index(tokenizer.eos_id) for text in texts]
    v = F.normalize(context[torch.arange(len(texts)), ends], dim=-1)
    return v @ v.T


# -- the page -----------------------------------------------------------------------------------------


def render(run: Run) -> str:
    """The Run as one self-contained HTML page."""
    plt = _pyplot()
    sections = [
        _parts(plt, run), _generation(plt, run), _guidance(plt, run), _attention(plt, run),
        _forward(plt, run), _latent_space(plt, run), _clip(plt, run),
    ]  # fmt: skip
    template = Template(resources.files(__package__).joinpath("template.html").read_text(encoding="utf-8"))
    return template.substitute(
        prompt=html.escape(run.prompt), model=html.escape(run.model), seed=run.seed, steps=len(run.steps),
        sampler=html.escape(run.sampler), cfg_scale=run.cfg_scale, sections="\n".join(sections),
    )  # fmt: skip


def write_page(pipe: Pipeline, prompt: str, out: str | Path, **options) -> Run:
    """explain() then render() into the file `out`."""
    _pyplot()  # the one-line error before the run, not after it
    run = explain(pipe, prompt, **options)
    Path(out).write_text(render(run), encoding="utf-8")
    return run


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ValueError(MISSING) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _section(name: str, title: str, text: str, figures: list[tuple[str, str]]) -> str:
    images = "\n".join(f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">' for alt, data in figures)
    return f'<section id="{name}">\n<h2>{html.escape(title)}</h2>\n<p>{text}</p>\n{images}\n</section>'


def _png(plt, fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _row(plt, images: list, titles: list[str], cmap: str | None = None, height: float = 2.0):
    """One row of pictures (PIL images or 2-d tensors), titled."""
    fig, axes = plt.subplots(1, len(images), figsize=(height * len(images), height + 0.4), squeeze=False)
    for ax, image, title in zip(axes[0], images, titles):
        ax.imshow(image if isinstance(image, Image.Image) else image.numpy(), cmap=cmap)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    return fig


def _token_label(run: Run, i: int) -> str:
    name = {run.special["start"]: "START", run.special["end"]: "END"}.get(run.ids[i], run.tokens[i])
    if run.ids[i] == run.special["pad"] and i > run.ids.index(run.special["end"]):
        name = "PAD"
    return name


def _prompt_tokens(run: Run) -> list[int]:
    """Positions of the prompt's own tokens (between start and end)."""
    return list(range(1, run.ids.index(run.special["end"])))


def _parts(plt, run: Run) -> str:
    end = run.ids.index(run.special["end"])
    weight = {i: f" (x{w:g})" for i, w in enumerate(run.weights) if w != 1}
    listed = ", ".join(
        f"{i}:{html.escape(_token_label(run, i))}={run.ids[i]}{weight.get(i, '')}"
        for i in range(min(end + 3, len(run.ids)))
    )
    fig, ax = plt.subplots(figsize=(9, 3))
    ax.imshow(run.context.numpy().T, aspect="auto", cmap="coolwarm")
    ax.set_xlabel(f"token position (0 start, {end} end, then padding)")
    ax.set_ylabel(f"{run.context.shape[1]} dimensions")
    ax.set_title(f"text vectors: {tuple(run.context.shape)}", fontsize=9)
    latents = run.latents[0]
    channels = _row(plt, [c for c in latents] + [run.image],
                    [f"latent channel {i}" for i in range(len(latents))] + [f"image 3 x {run.image.height} x {run.image.width}"],
                    cmap="gray")  # fmt: skip
    counts = ", ".join(f"{name} {n / 1e6:.2f}M" for name, n in run.parameters.items())
    longer = run.prompt_tokens > len(run.ids) - 2
    text = (
        f"The prompt becomes {len(run.ids)} token ids ({listed}, ...: the start and end tokens frame it, padding "
        f"fills the rest)."
        + (" Emphasis such as (word:1.3) or [word] weights a token's vector (the x numbers)."
           if weight else "")
        + (f" This prompt has {run.prompt_tokens} tokens: the model reads them in chunks of {len(run.ids) - 2} "
           "(each framed the same way, their vectors joined); the first chunk is shown." if longer else "")
        + f" The text encoder turns them into {len(run.ids)} vectors of {run.context.shape[1]} numbers "
        f"(the heat map). The UNet works on latents of shape {tuple(latents.shape)}, one picture per channel, and the "
        f"VAE decoder paints the image from them. Parameters: {counts}."
    )
    return _section("parts", "1. The parts and their shapes", text,
                    [("text vectors heat map", _png(plt, fig)), ("latent channels and image", _png(plt, channels))])  # fmt: skip


def _generation(plt, run: Run) -> str:
    titles = [f"step {i + 1}" for i in run.shown]
    now = _row(plt, run.step_images, [f"{t}: latents" for t in titles])
    clean = _row(plt, run.denoised_images, [f"{t}: predicted" for t in titles])
    fig, ax = plt.subplots(figsize=(6, 2.5))
    ax.plot(range(1, len(run.steps) + 1), [s.sigma for s in run.steps], marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("sigma (noise level)")
    text = (
        f"The sampler starts from random latents and takes {len(run.steps)} steps. The top row decodes the current "
        "latents at each step: noise turning into the image. The second row decodes the UNet's prediction of the "
        "clean latents at that step, which settles early. The plot is the noise level (sigma) left after each step. "
        f"The pictures are painted by {run.decoder}."
    )
    return _section("generation", "2. Generation, step by step", text,
                    [("current latents per step", _png(plt, now)), ("predicted image per step", _png(plt, clean)),
                     ("sigma per step", _png(plt, fig))])  # fmt: skip


def _guidance(plt, run: Run) -> str:
    n = len(run.guidance_steps)
    names = ["empty prompt"] + [f"guidance {s:g}" + (" (prompt alone)" if s == 1 else "") for s in run.scales]
    figures = []
    if n:
        rows = len(names) + 1
        fig, axes = plt.subplots(rows, n, figsize=(2.2 * n, 2.3 * rows), squeeze=False)
        for j, i in enumerate(run.guidance_steps):
            for row, (image, name) in enumerate(zip(run.guidance_images[j], names)):
                axes[row][j].imshow(image)
                axes[row][j].set_title(f"step {i + 1}: {name}", fontsize=8)
            axes[-1][j].imshow(run.differences[j].numpy(), cmap="magma")
            axes[-1][j].set_title(f"step {i + 1}: |prompt - empty|", fontsize=8)
            for row in range(rows):
                axes[row][j].axis("off")
        figures.append(("predictions at each guidance scale", _png(plt, fig)))
    if run.scale_runs:
        runs = _row(plt, run.scale_runs, [f"generated at guidance {s:g}" for s in run.scales])
        figures.append(("the same seed generated at each scale", _png(plt, runs)))
    text = (
        "At each step the UNet runs twice: with the prompt and with an empty prompt. Guidance moves the prediction "
        f"away from the empty prompt's by the scale ({run.cfg_scale:g} here) times their difference (bottom row: "
        "where they differ). Each column is one step of this run: its two predictions (as clean images), mixed at "
        "guidance 1 (the prompt alone), the default and a high value."
    )
    if run.scale_runs:
        text += " Below, the same seed generated to the end at each of those scales."
    if not n:
        text += " This run was not guided (guidance 1, or a prompt composed with AND): there is no pair to show."
    return _section("guidance", "3. Guidance", text, figures)


def _attention(plt, run: Run) -> str:
    tokens = _prompt_tokens(run)
    figures = []
    for step, total in sorted(run.attention.maps.items()):
        average = total / run.attention.layers[step]
        maps = [average[i] / average[i].max() for i in tokens]
        fig = _row(
            plt, [run.image] + maps, ["image"] + [_token_label(run, i) for i in tokens], cmap="viridis", height=1.6
        )
        fig.suptitle(f"step {step + 1}", fontsize=9)
        figures.append((f"cross-attention at step {step + 1}", _png(plt, fig)))
    text = (
        "Text enters the UNet only through cross-attention: every latent pixel spreads one unit of attention over "
        "the 77 text vectors. Each map shows where one prompt token is looked at, averaged over heads and layers "
        "(each scaled to its own maximum)."
    )
    return _section("attention", "4. Where the text enters", text, figures)


def _forward(plt, run: Run) -> str:
    titles = ["level 0: clean"] + [f"level {k}: t={t}" for k, t in enumerate(run.noise_steps) if t is not None]
    levels = _row(plt, run.noised_images, titles)
    e = run.example
    pictures = [e["noisy"][0, 0], e["noise"][0, 0], e["predicted"][0, 0], (e["predicted"] - e["noise"])[0, 0].abs()]
    example = _row(
        plt, pictures, [f"noisy latents (t={e['t']})", "true noise", "predicted noise", "|error|"], cmap="gray"
    )
    text = (
        "Training runs the other way: an image is encoded and noise of a chosen level is added (levels of the "
        "training schedule, each decoded here). The UNet learns to predict the noise that was added: one training "
        f"example (latent channel 0), its prediction and their error (mean squared error {e['error']:.3f})."
    )
    return _section("forward", "5. Forward diffusion: the training view", text,
                    [("noise levels", _png(plt, levels)), ("training example", _png(plt, example))])  # fmt: skip


def _latent_space(plt, run: Run) -> str:
    w, h = run.source.size
    c, lh, lw = run.example["noisy"].shape[1:]
    fig = _row(plt, [run.source, run.reconstruction], ["image", "VAE round trip"], height=3)
    ratio = (3 * h * w) / (c * lh * lw)
    text = (
        f"The diffusion happens in the VAE's latent space: {h} x {w} x 3 = {3 * h * w} numbers become "
        f"{lh} x {lw} x {c} = {c * lh * lw}, {ratio:g}x fewer. The price is the detail the decoder cannot bring back: "
        "compare the image with its round trip through the encoder and decoder."
    )
    return _section("latent", "6. The latent space", text, [("image and VAE reconstruction", _png(plt, fig))])


def _clip(plt, run: Run) -> str:
    labels = [_short(v) for v in run.variations]
    fig = _matrix(plt, run.similarity, labels, labels)
    figures = [("text similarities", _png(plt, fig))]
    text = (
        "The text encoder is the text half of a CLIP model, trained to pull an image and its caption together. "
        "A Stable Diffusion model ships only the text half, so the first figure shows the text side: cosine "
        "similarities of the end-token vectors of the prompt and variations of it."
    )
    if run.clip is None:
        text += (
            " The image half stays in the CLIP training run (the shipped model's: the folder <code>latentforge train "
            "clip</code> wrote, runs/clip in docs/default-model.md); give that folder with <code>--clip</code> to "
            "see images measured against their captions."
        )
    else:
        batch = run.clip
        n = len(batch.images)
        images = _row(plt, batch.images, [f"image {i + 1}" for i in range(n)], height=1.4)
        matrix = _matrix(plt, batch.similarity, [_short(c) for c in batch.captions], [f"image {i + 1}" for i in range(n)])
        figures += [("images of the CLIP batch", _png(plt, images)), ("images against captions", _png(plt, matrix))]
        text += (
            f" Below, the CLIP model trained here measures {n} held-out images of its data against their captions: "
            "each row is an image, each column a caption, and a matching pair (the diagonal) should be the most "
            "alike of its row."
        )
    return _section("clip", "7. CLIP: text and images in one space", text, figures)


def _short(text: str) -> str:
    return repr(text) if len(text) < 30 else repr(text[:27] + "...")


def _matrix(plt, values: torch.Tensor, columns: list[str], rows: list[str]):
    """A similarity matrix as a heat map, each cell's value written in it."""
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.imshow(values.numpy(), cmap="viridis", vmin=-1, vmax=1)
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    for i in range(len(rows)):
        for j in range(len(columns)):
            ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w")
    return fig
