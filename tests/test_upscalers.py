"""ESRGAN / Real-ESRGAN upscalers: both key layouts load and equal an independent transcription of the published
architecture (written here as plain modules, the BasicSR one and the original ESRGAN nn.Sequential, whose own
state-dict keys are the files' keys), the scale is read from the tensors, tiles agree with the whole image,
and the CLI, the registry and the A1111 routes use them by name, with one-line errors."""

import base64
import io

import numpy as np
import pytest
import requests
import torch
import webuiapi
from PIL import Image, PngImagePlugin
from torch import nn

from latentforge import upscalers as up
from latentforge.cli import main
from latentforge.server import ServerThread, Settings, create_app
from latentforge.weightfiles import write_safetensors

TINY = {"nf": 16, "nb": 2, "gc": 8}  # channels, blocks, growth
# tiled vs whole, the largest difference in 0..255 levels after rounding, 64 px tiles, 16 px overlap (see the
# test): measured 0 (0.004 before rounding) for x4, x2 and x1; 1-2 with an 8 px overlap, 60-80 with none
TILE_TOLERANCE = 1


# --------------------------------------------------------------------------- the reference transcriptions


def lrelu():
    return nn.LeakyReLU(negative_slope=0.2)


class RefDense(nn.Module):
    """BasicSR's ResidualDenseBlock_5C, written out."""

    def __init__(self, nf, gc):
        super().__init__()
        self.conv1 = nn.Conv2d(nf, gc, 3, 1, 1)
        self.conv2 = nn.Conv2d(nf + gc, gc, 3, 1, 1)
        self.conv3 = nn.Conv2d(nf + 2 * gc, gc, 3, 1, 1)
        self.conv4 = nn.Conv2d(nf + 3 * gc, gc, 3, 1, 1)
        self.conv5 = nn.Conv2d(nf + 4 * gc, nf, 3, 1, 1)
        self.act = lrelu()

    def forward(self, x):
        a = self.act(self.conv1(x))
        b = self.act(self.conv2(torch.cat((x, a), dim=1)))
        c = self.act(self.conv3(torch.cat((x, a, b), dim=1)))
        d = self.act(self.conv4(torch.cat((x, a, b, c), dim=1)))
        e = self.conv5(torch.cat((x, a, b, c, d), dim=1))
        return x + 0.2 * e


class RefRRDB(nn.Module):
    def __init__(self, nf, gc):
        super().__init__()
        self.rdb1, self.rdb2, self.rdb3 = RefDense(nf, gc), RefDense(nf, gc), RefDense(nf, gc)

    def forward(self, x):
        return x + 0.2 * self.rdb3(self.rdb2(self.rdb1(x)))


def space_to_depth(x, r):
    """Pixel-unshuffle by hand: (B, C, H, W) -> (B, C*r*r, H/r, W/r), channel c*r*r + i*r + j = x[c, i::r, j::r]."""
    b, c, h, w = x.shape
    return x.view(b, c, h // r, r, w // r, r).permute(0, 1, 3, 5, 2, 4).reshape(b, c * r * r, h // r, w // r)


class RefBasicSR(nn.Module):
    """Real-ESRGAN's RRDBNet (basicsr.archs.rrdbnet_arch): scale 4 as is, 2 and 1 after a pixel-unshuffle."""

    def __init__(self, scale, nf=16, nb=2, gc=8):
        super().__init__()
        self.unshuffle = {4: 1, 2: 2, 1: 4}[scale]
        self.conv_first = nn.Conv2d(3 * self.unshuffle**2, nf, 3, 1, 1)
        self.body = nn.Sequential(*[RefRRDB(nf, gc) for _ in range(nb)])
        self.conv_body = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_hr = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_last = nn.Conv2d(nf, 3, 3, 1, 1)
        self.act = lrelu()
        self.up2x = nn.Upsample(scale_factor=2, mode="nearest")

    def forward(self, x):
        if self.unshuffle > 1:
            x = space_to_depth(x, self.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        feat = self.act(self.conv_up1(self.up2x(feat)))
        feat = self.act(self.conv_up2(self.up2x(feat)))
        return self.conv_last(self.act(self.conv_hr(feat)))


class RefOldDense(nn.Module):
    """The original ESRGAN's ResidualDenseBlock_5C: each conv in a Sequential with its activation (conv1.0...)."""

    def __init__(self, nf, gc):
        super().__init__()
        for i in range(1, 5):
            setattr(self, f"conv{i}", nn.Sequential(nn.Conv2d(nf + (i - 1) * gc, gc, 3, 1, 1), lrelu()))
        self.conv5 = nn.Sequential(nn.Conv2d(nf + 4 * gc, nf, 3, 1, 1))

    def forward(self, x):
        a = self.conv1(x)
        b = self.conv2(torch.cat((x, a), 1))
        c = self.conv3(torch.cat((x, a, b), 1))
        d = self.conv4(torch.cat((x, a, b, c), 1))
        return self.conv5(torch.cat((x, a, b, c, d), 1)) * 0.2 + x


class RefOldRRDB(nn.Module):
    def __init__(self, nf, gc):
        super().__init__()
        self.RDB1, self.RDB2, self.RDB3 = RefOldDense(nf, gc), RefOldDense(nf, gc), RefOldDense(nf, gc)

    def forward(self, x):
        return self.RDB3(self.RDB2(self.RDB1(x))) * 0.2 + x


class Shortcut(nn.Module):
    def __init__(self, sub):
        super().__init__()
        self.sub = sub

    def forward(self, x):
        return x + self.sub(x)


def ref_old(doublings, nf=16, nb=2, gc=8, in_nc=3):
    """The original ESRGAN generator (its `model` Sequential: model.0, model.1.sub.N..., upsampling, HR, last)."""
    layers = [nn.Conv2d(in_nc, nf, 3, 1, 1), Shortcut(nn.Sequential(*[RefOldRRDB(nf, gc) for _ in range(nb)],
                                                                     nn.Conv2d(nf, nf, 3, 1, 1)))]  # fmt: skip
    for _ in range(doublings):
        layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(nf, nf, 3, 1, 1), lrelu()]
    layers += [nn.Conv2d(nf, nf, 3, 1, 1), lrelu(), nn.Conv2d(nf, 3, 3, 1, 1)]
    holder = nn.Module()
    holder.model = nn.Sequential(*layers)
    holder.forward = holder.model.forward
    return holder


def randomised(module, seed):
    """Random weights with outputs of image-like spread (the default init gives near-constant outputs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.1 if p.dim() > 1 else 0.02))
    return module.eval()


def image_input(h, w, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, h, w, generator=gen)


def state_of(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------- loading and equality


@pytest.mark.parametrize("scale", [4, 2, 1])
def test_basicsr_layout_equals_the_reference_and_the_scale_is_inferred(tmp_path, scale):
    ref = randomised(RefBasicSR(scale, **TINY), seed=scale)
    path = tmp_path / "RealESRGAN.pth"
    torch.save({"params_ema": state_of(ref), "params": {}}, path)  # Real-ESRGAN's wrapper
    model = up.read_upscaler(path)
    assert model.scale == scale
    assert (model.config.blocks, model.config.channels, model.config.growth) == (2, 16, 8)
    assert model.conv_first.in_channels == {4: 3, 2: 12, 1: 48}[scale]
    x = image_input(24, 32)
    with torch.no_grad():
        want = ref(x)
    got = model(x)
    assert got.shape == (1, 3, 24 * scale, 32 * scale)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("doublings", [2, 1, 3, 0])  # x4 (4x-UltraSharp's layout), x2, x8, x1
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_old_esrgan_layout_equals_the_reference(tmp_path, doublings, suffix):
    ref = randomised(ref_old(doublings, **TINY), seed=10 + doublings)
    state = state_of(ref)
    assert "model.1.sub.0.RDB1.conv1.0.weight" in state and f"model.1.sub.{TINY['nb']}.weight" in state
    path = tmp_path / f"4x-Sharp{suffix}"
    write_safetensors(state, path) if suffix == ".safetensors" else torch.save(state, path)
    model = up.read_upscaler(path)
    assert model.scale == 2**doublings
    x = image_input(20, 28, seed=1)
    with torch.no_grad():
        want = ref(x)
    torch.testing.assert_close(model(x), want, rtol=0, atol=1e-5)


def test_the_old_layout_made_from_the_new_is_the_original_networks_and_gives_identical_outputs():
    new = randomised(RefBasicSR(4, **TINY), seed=3)
    old_state = up.to_old_layout(state_of(new))
    original = ref_old(2, **TINY)
    assert set(old_state) == set(original.state_dict())  # key for key the original ESRGAN's names
    original.load_state_dict(old_state)
    x = image_input(16, 20, seed=2)
    a, b = up.load_rrdbnet(state_of(new)), up.load_rrdbnet(old_state)
    assert torch.equal(a(x), b(x))
    with torch.no_grad():  # the two transcriptions agree with each other too
        torch.testing.assert_close(original(x), new(x), rtol=0, atol=1e-5)
    assert up.to_new_layout(old_state).keys() == state_of(new).keys()


def test_old_layout_with_pixel_unshuffle_is_a_x2():
    ref = randomised(ref_old(2, in_nc=12, **TINY), seed=4)
    assert up.load_rrdbnet(state_of(ref)).config == up.RRDBConfig(16, 2, 8, upsamples=2, unshuffle=2)


# --------------------------------------------------------------------------- bad files, one line each


def one_line(excinfo):
    text = str(excinfo.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def test_a_file_that_is_not_an_rrdbnet_says_so(tmp_path):
    path = tmp_path / "lora.safetensors"
    write_safetensors({"lora_unet_x.lora_up.weight": torch.zeros(4, 4), "lora_unet_x.alpha": torch.ones(())}, path)
    with pytest.raises(ValueError) as e:
        up.read_upscaler(path)
    assert one_line(e).startswith("lora.safetensors is not an ESRGAN/RRDBNet upscaler (keys such as lora_unet_x.")


def test_missing_unexpected_and_misshapen_keys_are_named():
    state = state_of(randomised(RefBasicSR(4, **TINY), seed=5))
    missing = {k: v for k, v in state.items() if k != "body.1.rdb2.conv3.bias"}
    with pytest.raises(ValueError, match=r"lacks key body\.1\.rdb2\.conv3\.bias;") as e:
        up.load_rrdbnet(missing, "x.pth")
    one_line(e)
    with pytest.raises(ValueError, match=r"has unexpected key body\.0\.rdb1\.conv1x1\.weight;"):
        up.load_rrdbnet(state | {"body.0.rdb1.conv1x1.weight": torch.zeros(8, 16, 1, 1)}, "x.pth")
    with pytest.raises(ValueError, match=r"x\.pth: body\.0\.rdb1\.conv2\.weight is \(8, 20, 3, 3\)"):
        up.load_rrdbnet(state | {"body.0.rdb1.conv2.weight": torch.zeros(8, 20, 3, 3)}, "x.pth")
    old = up.to_old_layout(state)
    del old["model.1.sub.0.RDB3.conv5.0.weight"]
    with pytest.raises(ValueError, match=r"\(ESRGAN layout\) it lacks key model\.1\.sub\.0\.RDB3\.conv5\.0\.weight"):
        up.load_rrdbnet(old, "x.pth")


def test_keys_and_shapes_are_checked_before_the_network_is_made():
    config = up.RRDBConfig(16, 2, 8, upsamples=3, unshuffle=2)
    assert {k: tuple(v.shape) for k, v in up.RRDBNet(config).state_dict().items()} == up.expected_shapes(config)
    state = state_of(randomised(RefBasicSR(4, **TINY), seed=6))
    # a file claiming a huge network with small tensors is refused from its names and shapes alone
    huge = state | {"conv_first.weight": torch.zeros(100_000, 3, 1, 1)}
    with pytest.raises(ValueError, match=r"x\.pth: conv_first\.weight is \(100000, 3, 1, 1\), a x4 RRDBNet \(2 blocks, 100000 channels"):
        up.load_rrdbnet(huge, "x.pth")
    many = state | {"body.99999999.rdb1.conv1.weight": torch.zeros(8, 16, 3, 3)}
    with pytest.raises(ValueError, match=r"x\.pth: it lacks key body\.2\.rdb1\.conv1\.weight \(blocks go up to 99999999\)"):
        up.load_rrdbnet(many, "x.pth")
    deep = up.to_old_layout(state) | {"model.99999999.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"x\.pth: the last conv is model\.99999999, which no x1 to x16 ESRGAN layout has"):
        up.load_rrdbnet(deep, "x.pth")
    for key, value in [("conv_last.weight", None), ("conv_first.weight", torch.zeros(16))]:
        broken = {k: v for k, v in state.items() if k != key} | ({key: value} if value is not None else {})
        with pytest.raises(ValueError, match=r"x\.pth: not a complete BasicSR-layout RRDBNet") as e:
            up.load_rrdbnet(broken, "x.pth")
        one_line(e)


def test_a_pickle_with_code_is_refused_without_running_it(tmp_path):
    class Boom:
        def __reduce__(self):
            return (print, ("ran",))

    path = tmp_path / "evil.pth"
    torch.save({"params_ema": {"conv_first.weight": Boom()}}, path)
    with pytest.raises(ValueError) as e:
        up.read_upscaler(path)
    assert "evil.pth" in one_line(e)


# --------------------------------------------------------------------------- tiles


def image_model(scale, seed):
    """A random RRDBNet (PyTorch's default init, whose dense blocks stay near identity as trained ones do) with
    its last conv rescaled so that outputs spread over 0..1 (std 0.2 around 0.5): rounding to 0..255 is then a
    fair measure."""
    torch.manual_seed(seed)
    ref = RefBasicSR(scale, **TINY).eval()
    x = image_input(64, 64, seed=seed)
    with torch.no_grad():
        k = 0.2 / ref(x).std()
        ref.conv_last.weight *= k
        ref.conv_last.bias.mul_(k).add_(0.5 - ref(x).mean())
    return up.load_rrdbnet(state_of(ref))


@pytest.mark.parametrize("scale", [4, 2, 1])
def test_tiles_agree_with_the_whole_image(scale):
    model = image_model(scale, seed=20 + scale)
    x = image_input(152, 200, seed=3)
    with torch.no_grad():
        whole = model(x)
    tiled = up.run_tiled(model, x, tile=64 * (2 if scale == 1 else 1), overlap=16)  # 3 x 4 tiles (x1: 2 x 3)
    levels = ((tiled.clamp(0, 1) - whole.clamp(0, 1)).abs() * 255).round()
    assert levels.max() <= TILE_TOLERANCE, levels.max()
    # no overlap gives visible seams: the blending is what keeps the tiles equal to the whole
    seams = ((up.run_tiled(model, x, tile=64, overlap=0).clamp(0, 1) - whole.clamp(0, 1)).abs() * 255).round()
    assert seams.max() > 10 * TILE_TOLERANCE
    # an image that fits one tile is run whole
    small = image_input(40, 48, seed=4)
    with torch.no_grad():
        assert torch.equal(up.run_tiled(model, small), model(small).float())


def test_blending_weights_add_up_to_one():
    for length, tile, overlap, scale in [(200, 64, 16, 4), (152, 64, 16, 2), (97, 32, 8, 1), (130, 64, 0, 2),
                                         (200, 64, 32, 4), (100, 64, 48, 1)]:  # fmt: skip
        starts = up._starts(length, tile, overlap)
        total = torch.zeros(length * scale)
        for start, weight in zip(starts, up._ramps(starts, tile, overlap, scale)):
            total[start * scale : (start + tile) * scale] += weight
        torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-6)


def test_sides_that_are_not_a_multiple_of_the_unshuffle_are_padded_and_cropped():
    model = image_model(2, seed=6)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (75, 101, 3), dtype=np.uint8))
    assert up.upscale(image, model).size == (202, 150)


# --------------------------------------------------------------------------- scales and built-ins


def test_other_scales_run_the_model_again_and_resize_with_lanczos():
    model = image_model(2, seed=7)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 40, 3), dtype=np.uint8))
    once = up.model_upscale(model, image)
    assert np.array_equal(np.asarray(up.upscale(image, model)), np.asarray(once))
    twice = up.model_upscale(model, once)
    assert np.array_equal(np.asarray(up.upscale(image, model, 4)), np.asarray(twice))
    want = twice.resize((120, 96), Image.Resampling.LANCZOS)  # 3x: two runs (x4), then down to x3
    assert np.array_equal(np.asarray(up.upscale(image, model, 3)), np.asarray(want))
    assert up.passes(model, (32, 40), (64, 80)) == [(64, 80)]
    assert len(up.passes(model, (32, 40), (32 * 100, 40 * 100))) == up.MAX_PASSES


def test_built_in_upscalers_are_plain_resizes_and_the_infotext_stays():
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (30, 20, 3), dtype=np.uint8))
    image.info["parameters"] = "a cat\nSteps: 20, Seed: 5"
    for name, resample in [("Lanczos", Image.Resampling.LANCZOS), ("Nearest", Image.Resampling.NEAREST),
                           ("None", Image.Resampling.LANCZOS)]:  # fmt: skip
        result = up.upscale(image, name, 2.5)
        assert np.array_equal(np.asarray(result), np.asarray(image.resize((50, 75), resample)))
        assert result.info["parameters"] == image.info["parameters"]
    with pytest.raises(ValueError, match="the Lanczos upscaler needs a scale"):
        up.upscale(image, "Lanczos")


def test_latent_upscale_modes_are_a1111s():
    assert list(up.LATENT_UPSCALE_MODES) == [
        "Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)", "Latent (nearest)",
        "Latent (nearest-exact)",
    ]  # fmt: skip
    latents = torch.randn(1, 4, 8, 8)
    for mode, antialias in up.LATENT_UPSCALE_MODES.values():
        assert torch.nn.functional.interpolate(latents, scale_factor=2, mode=mode, antialias=antialias).shape[-1] == 16


# --------------------------------------------------------------------------- registry, CLI, server


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An upscaler folder: a x4 BasicSR file, a x2 old-layout one in a subfolder, and a LoRA that is no upscaler."""
    root = tmp_path_factory.mktemp("upscalers")
    model = image_model(4, seed=30)
    torch.save({"params_ema": model.state_dict()}, root / "RealESRGAN_x4plus.pth")
    (root / "sub").mkdir()
    write_safetensors(up.to_old_layout(image_model(2, seed=31).state_dict()), root / "sub" / "2x-Old.safetensors")
    write_safetensors({"lora_unet_a.lora_down.weight": torch.zeros(2, 2)}, root / "notone.safetensors")
    return root


def test_the_registry_finds_models_by_name_never_by_path(folder):
    ups = up.Upscalers.from_dirs([folder])
    assert ups.names() == ["None", "Lanczos", "Nearest", "2x-Old", "notone", "RealESRGAN_x4plus"]
    assert ups.get("Lanczos") == "Lanczos"
    assert ups.get("2x-Old").scale == 2 and ups.get("RealESRGAN_x4plus.pth").scale == 4
    for bad, message in [("4x-Missing", "no upscaler named '4x-Missing' in"), ("../x4", "is not a name"),
                         ("notone", "notone.safetensors is not an ESRGAN/RRDBNet upscaler")]:  # fmt: skip
        with pytest.raises(ValueError, match=message) as e:
            ups.get(bad)
        one_line(e)


def png_with_text(path, size=(24, 20), text="a red circle\nSteps: 3, Seed: 7"):
    array = np.random.default_rng(5).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.fromarray(array).save(path, pnginfo=info)
    return Image.open(path)


def test_cli_upscale_writes_pngs_of_the_right_size_with_the_infotext(folder, tmp_path, capsys):
    source = png_with_text(tmp_path / "in.png")
    out = tmp_path / "out"
    assert main(["upscale", str(tmp_path / "in.png"), "--upscaler", "RealESRGAN_x4plus", "--upscaler-dir", str(folder),
                 "--out", str(out), "--device", "cpu"]) == 0  # fmt: skip
    written = capsys.readouterr().out.split()
    assert len(written) == 1 and written[0].endswith("-in.png")
    result = Image.open(written[0])
    assert result.size == (96, 80) and result.info["parameters"] == source.info["parameters"]
    model = up.Upscalers.from_dirs([folder]).get("RealESRGAN_x4plus")
    assert np.array_equal(np.asarray(result.convert("RGB")), np.asarray(up.upscale(source, model)))
    # a file by path, with another scale; a built-in
    assert main(["upscale", str(tmp_path / "in.png"), "--upscaler", str(folder / "sub" / "2x-Old.safetensors"),
                 "--scale", "3", "--out", str(out), "--device", "cpu"]) == 0  # fmt: skip
    assert Image.open(capsys.readouterr().out.split()[0]).size == (72, 60)
    assert main(["upscale", str(tmp_path / "in.png"), "--upscaler", "Lanczos", "--scale", "2", "--out", str(out)]) == 0
    assert Image.open(capsys.readouterr().out.split()[0]).size == (48, 40)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--upscaler", "Bogus"], "no upscaler named 'Bogus'"),
        (["--upscaler", "notone"], "notone.safetensors is not an ESRGAN/RRDBNet upscaler"),
        (["--upscaler", "Lanczos"], "the Lanczos upscaler needs a scale"),
        (["--upscaler", "Lanczos", "--scale", "0"], "--scale must be above 0"),
    ],
)
def test_cli_upscale_errors_are_one_line(folder, tmp_path, capsys, arguments, message):
    png_with_text(tmp_path / "in.png")
    rc = main(["upscale", str(tmp_path / "in.png"), "--upscaler-dir", str(folder), "--out", str(tmp_path), *arguments])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.fixture(scope="module")
def url(folder, tmp_path_factory):
    model = tmp_path_factory.mktemp("model") / "never-loaded.safetensors"
    model.write_bytes(b"")  # the upscaling routes use no Stable Diffusion model
    settings = Settings(models=[str(model)], upscaler_dirs=[str(folder)], device="cpu", max_image_pixels=200 * 200)
    with ServerThread(create_app(settings)) as url:
        yield url


def b64png(image):
    buffer = io.BytesIO()
    info = PngImagePlugin.PngInfo()
    for key, value in image.info.items():
        info.add_text(key, value)
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode()


def decoded(text):
    return Image.open(io.BytesIO(base64.b64decode(text)))


def test_upscaler_routes_answer_as_a1111(url, folder):
    api = webuiapi.WebUIApi(baseurl=f"{url}/sdapi/v1")
    listed = api.get_upscalers()
    assert [e["name"] for e in listed] == ["None", "Lanczos", "Nearest", "2x-Old", "notone", "RealESRGAN_x4plus"]
    assert set(listed[0]) == {"name", "model_name", "model_path", "model_url", "scale"}
    assert listed[5]["model_path"] == str(folder / "RealESRGAN_x4plus.pth")
    assert api.get_latent_upscale_modes() == [{"name": name} for name in up.LATENT_UPSCALE_MODES]


def test_extra_single_image_through_webuiapi(url, folder, tmp_path):
    api = webuiapi.WebUIApi(baseurl=f"{url}/sdapi/v1")
    source = png_with_text(tmp_path / "in.png")
    result = api.extra_single_image(source, upscaler_1="RealESRGAN_x4plus", upscaling_resize=4)
    model = up.Upscalers.from_dirs([folder]).get("RealESRGAN_x4plus")
    assert np.array_equal(np.asarray(result.image.convert("RGB")), np.asarray(up.upscale(source, model)))
    assert result.image.info["parameters"] == source.info["parameters"]
    assert result.info == "<p>Postprocess upscale by: 4, Postprocess upscaler: RealESRGAN_x4plus</p>"
    # to a size, cropped; a second upscaler blended in
    result = api.extra_single_image(source, resize_mode=1, upscaling_resize_w=50, upscaling_resize_h=30,
                                    upscaler_1="Lanczos", upscaler_2="2x-Old", extras_upscaler_2_visibility=0.5)  # fmt: skip
    assert result.image.size == (50, 30)
    # "None": the image as it came
    result = api.extra_single_image(source, upscaler_1="None")
    assert np.array_equal(np.asarray(result.image.convert("RGB")), np.asarray(source.convert("RGB")))


def test_extra_batch_images(url, tmp_path):
    api = webuiapi.WebUIApi(baseurl=f"{url}/sdapi/v1")
    sources = [png_with_text(tmp_path / "a.png"), png_with_text(tmp_path / "b.png", size=(16, 12))]
    result = api.extra_batch_images(sources, upscaler_1="2x-Old", upscaling_resize=2)
    assert [image.size for image in result.images] == [(48, 40), (32, 24)]


@pytest.mark.parametrize(
    ("fields", "loc", "message"),
    [
        ({"upscaler_1": "Bogus"}, "upscaler_1", "upscaler_1: no upscaler named 'Bogus'"),
        ({"upscaler_1": "../RealESRGAN_x4plus"}, "upscaler_1", "is not a name"),
        ({"upscaler_1": "/etc/passwd"}, "upscaler_1", "is not a name"),
        ({"upscaler_1": "notone"}, "upscaler_1", "is not an ESRGAN/RRDBNet upscaler"),
        ({"upscaler_1": "Lanczos", "upscaling_resize": 3, "image": (100, 100)}, "upscaling_resize",
         "image upscaled would be 300x300, over the server's limit of 40000 pixels"),
        # a 2x model asked for 1.2x of a 130 px image runs once (260 px > 200 px limit) before its Lanczos resize
        ({"upscaler_1": "2x-Old", "upscaling_resize": 1.2, "image": (130, 130)}, "upscaling_resize", "after 2x-Old"),
    ],
)
def test_bad_extras_requests_are_422_with_one_line(url, fields, loc, message):
    size = fields.pop("image", (24, 20))
    image = Image.fromarray(np.zeros((size[1], size[0], 3), dtype=np.uint8))
    response = requests.post(f"{url}/sdapi/v1/extra-single-image", json={"image": b64png(image), **fields}, timeout=60)
    assert response.status_code == 422
    (detail,) = response.json()["detail"]
    assert detail["loc"] == ["body", loc] and message in detail["msg"] and "\n" not in detail["msg"]
