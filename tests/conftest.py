"""Tiny random Stable Diffusion pipelines, built and saved by diffusers itself, once per session.

Each is a real diffusers folder (`save_pretrained`) in one of the shapes latentforge must load:
SD 1.x (quick-GELU CLIP, eight heads, conv projections), SD 2.x (GELU text tower, fixed-width heads,
linear projections, "!" padding), SD 2.x v-prediction, and the 9-channel inpainting UNet.
"""

import pytest
import torch

KINDS = ("sd1", "sd2", "sd2v", "inpaint")
# Text width of the tiny models (768 / 1024 in the real ones). Heads follow the real rules (eight in
# an SD 1.x UNet, 64 wide in SD 2.x and in both text towers), so that a file without latentforge's
# config metadata, as everyone else's files are, can be read by inferring the config from its tensors.
CONTEXT = 128


def tiny_diffusers_vae(**options):
    """A diffusers AutoencoderKL in SD's shape (four levels, 8x down), small and random."""
    import diffusers

    return diffusers.AutoencoderKL(
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        **options,
    )


def tiny_diffusers_pipeline(kind: str, seed: int = 0):
    """A diffusers StableDiffusionPipeline with small random weights in the shape of `kind`."""
    import diffusers
    import transformers

    from latentforge.tokenizer import Tokenizer

    sd2 = kind.startswith("sd2")
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=9 if kind == "inpaint" else 4,
        out_channels=4,
        block_out_channels=(64, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CONTEXT,
        attention_head_dim=[1, 2] if sd2 else 8,
        use_linear_projection=sd2,
        norm_num_groups=32,
    )
    vae = tiny_diffusers_vae()
    text_encoder = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            hidden_size=CONTEXT,
            num_hidden_layers=3,
            num_attention_heads=2,
            intermediate_size=256,
            hidden_act="gelu" if sd2 else "quick_gelu",
            max_position_embeddings=77,
            vocab_size=49408,
        )
    )
    with torch.no_grad():  # move every weight off its init so that no layer can hide behind zeros
        for model in (unet, vae, text_encoder):
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.03)
    scheduler = diffusers.DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
        prediction_type="v_prediction" if kind == "sd2v" else "epsilon",
    )  # fmt: skip
    return unet, vae, text_encoder, scheduler, Tokenizer(pad_token="!" if sd2 else "<|endoftext|>")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on shared cores lose a lot to it: a module that
    trains them asks for one thread with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def private_hash_cache(tmp_path_factory):
    """Model hashes are remembered in a folder of this test run, never in the user's ~/.cache."""
    from latentforge.modelhash import HASH_CACHE_ENV

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(HASH_CACHE_ENV, str(tmp_path_factory.mktemp("cache")))
        yield


_FOLDERS = {}


def saved_folder(kind: str, tmp_path_factory):
    """A tiny diffusers folder of `kind`, written by diffusers' own save_pretrained (once per session)."""
    if kind in _FOLDERS:
        return _FOLDERS[kind]
    import diffusers
    import transformers

    unet, vae, text_encoder, scheduler, tokenizer = tiny_diffusers_pipeline(kind)
    root = tmp_path_factory.mktemp(f"diffusers-{kind}")
    tokenizer.save_pretrained(root / "vocab")
    cls = diffusers.StableDiffusionInpaintPipeline if kind == "inpaint" else diffusers.StableDiffusionPipeline
    pipe = cls(
        unet=unet, vae=vae, text_encoder=text_encoder, scheduler=scheduler,
        tokenizer=transformers.CLIPTokenizer.from_pretrained(root / "vocab"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(root / "model")
    _FOLDERS[kind] = root / "model"
    return _FOLDERS[kind]


@pytest.fixture(scope="session", params=KINDS)
def diffusers_folder(request, tmp_path_factory):
    """(kind, path) for each of the four shapes."""
    return request.param, saved_folder(request.param, tmp_path_factory)


@pytest.fixture(scope="session")
def sd1_folder(tmp_path_factory):
    """The SD 1.x-shaped folder, for checks that do not depend on the shape."""
    return saved_folder("sd1", tmp_path_factory)


class Interrupted(Exception):
    """Stands for a training process being killed (the exact-resume tests)."""


class Interrupting:
    """A dataset (a world with `iterate`) that raises Interrupted once the training stream reaches item `limit`."""

    def __init__(self, world, limit: int) -> None:
        self.world, self.limit = world, limit

    def iterate(self, start: int, step: int):
        for index, item in enumerate(self.world.iterate(start, step)):
            if start + index * step >= self.limit:
                raise Interrupted
            yield item
