"""Tests for cppo_trl.core.images: to_rgb, and the pixel budget that says what the processor does to an image."""

import inspect
import io
import logging
import warnings

import numpy as np
import PIL.Image
import pytest
from transformers import AutoProcessor

from cppo_trl.core.images import PixelBudget, load_processor, to_rgb


def _noise_image(width: int, height: int, seed: int = 0) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


# --- the pixel budget -----------------------------------------------------------------------------------------------
QWEN_BUDGET = {"size": {"shortest_edge": 3136, "longest_edge": 1003520}}  # the GPU recipes: 4 to 1280 merged tokens


def _encode(processor, image, **kwargs):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=[[image]], return_tensors="pt", **kwargs)


def test_budget_predicts_the_processors_own_grid(tiny_vlm):
    """The budget resizes nothing: it says what the processor will do. For off-grid, oversized and tiny images its
    token grid is the processor's `image_grid_thw` (merged 2x2), and the processor given the raw image is the one
    place the image is resized."""
    processor = AutoProcessor.from_pretrained(tiny_vlm("qwen2_5_vl"), **QWEN_BUDGET)
    budget = PixelBudget.from_processor(processor)
    assert budget == PixelBudget(factor=28, min_pixels=3136, max_pixels=1003520)
    for size in [(3000, 2000), (17, 900), (28, 28), (1, 1), (1204, 812), (500, 333), (301, 199)]:
        grid = _encode(processor, _noise_image(*size))["image_grid_thw"][0].tolist()
        columns, rows = budget.token_grid(*size)
        assert grid == [1, 2 * rows, 2 * columns], size
        width, height = budget.target_size(*size)
        assert (width, height) == (columns * 28, rows * 28) and 3136 <= width * height <= 1003520, size
    assert budget.token_grid(3000, 2000) == (43, 29)  # 1,247 merged tokens <= 1,280
    assert budget.processor_kwargs() == {"size": {"shortest_edge": 3136, "longest_edge": 1003520}}
    default = AutoProcessor.from_pretrained(tiny_vlm("qwen2_5_vl"))  # the checkpoint's own limits, as vLLM loads it
    via_kwargs = _encode(default, _noise_image(3000, 2000), **budget.processor_kwargs())
    assert via_kwargs["image_grid_thw"][0].tolist() == [1, 58, 86]  # the call's limits win over the checkpoint's


def test_resizing_first_is_not_the_processors_resize(tiny_vlm):
    """Why nothing resizes before the processor: Qwen's resize is not idempotent near its limits. With
    min_pixels = max_pixels = 112², a 300x200 image becomes 3 x 4 = 12 vision tokens, but the same image resized to
    that target first becomes 20, so any pre-resize changes the tokens GRPO would see."""
    processor = AutoProcessor.from_pretrained(
        tiny_vlm("qwen2_5_vl"), size={"shortest_edge": 112 * 112, "longest_edge": 112 * 112}
    )
    budget = PixelBudget.from_processor(processor)
    image = _noise_image(300, 200)
    direct = _encode(processor, image)["image_grid_thw"][0]
    assert int(direct.prod()) // 4 == 12 and budget.token_grid(300, 200) == (4, 3)
    pre_resized = image.resize(budget.target_size(300, 200), PIL.Image.Resampling.BICUBIC)
    assert int(_encode(processor, pre_resized)["image_grid_thw"][0].prod()) // 4 == 20


def test_budget_from_processors(tiny_vlm):
    assert PixelBudget.from_processor(AutoProcessor.from_pretrained(tiny_vlm("qwen3_vl"))).factor == 32
    for family in ("gemma3", "llava", "idefics3"):  # fixed-size resize: no budget to agree on
        assert PixelBudget.from_processor(AutoProcessor.from_pretrained(tiny_vlm(family))) is None


def test_load_processor_applies_and_checks_the_limits(tiny_vlm, monkeypatch, caplog):
    processor = load_processor(str(tiny_vlm("qwen2_5_vl")), min_pixels=3136, max_pixels=1003520)
    assert PixelBudget.from_processor(processor) == PixelBudget(factor=28, min_pixels=3136, max_pixels=1003520)
    one_limit = load_processor(str(tiny_vlm("qwen2_5_vl")), max_pixels=12544)  # the other keeps its default
    assert PixelBudget.from_processor(one_limit).max_pixels == 12544
    with warnings.catch_warnings():  # the limits are the processor's `size`, not call kwargs deprecated since 5.18
        warnings.simplefilter("error", FutureWarning)
        processor(images=[PIL.Image.new("RGB", (300, 200))], text=["<|image_pad|>"])
    assert processor.tokenizer.padding_side == "left"
    with caplog.at_level(logging.WARNING, logger="cppo_trl.core.images"):
        assert PixelBudget.from_processor(load_processor(str(tiny_vlm("gemma3")), max_pixels=1003520)) is None
    assert "no effect on Gemma3ImageProcessor" in caplog.text

    import transformers

    original = transformers.AutoProcessor.from_pretrained

    def ignoring_limits(source, size=None, min_pixels=None, max_pixels=None, **kwargs):  # a version that drops them
        return original(source, **kwargs)

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", ignoring_limits)
    with pytest.raises(ValueError, match="did not take the pixel limits .*'max_pixels': 1003520"):
        load_processor(str(tiny_vlm("qwen2_5_vl")), max_pixels=1003520)


# --- to_rgb -----------------------------------------------------------------------------------------------------


def test_to_rgb_composites_alpha_on_white():
    rgba = PIL.Image.new("RGBA", (3, 1))
    rgba.putpixel((0, 0), (255, 0, 0, 0))
    rgba.putpixel((1, 0), (255, 0, 0, 255))
    rgba.putpixel((2, 0), (255, 0, 0, 128))
    out = to_rgb(rgba)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (255, 0, 0)
    assert out.getpixel((2, 0)) == (255, 127, 127)

    la = PIL.Image.new("LA", (2, 1))
    la.putpixel((0, 0), (50, 0))
    la.putpixel((1, 0), (50, 255))
    assert [to_rgb(la).getpixel((x, 0)) for x in range(2)] == [(255, 255, 255), (50, 50, 50)]

    premultiplied = PIL.Image.new("RGBa", (1, 1), (0, 0, 0, 0))
    assert to_rgb(premultiplied).getpixel((0, 0)) == (255, 255, 255)


def test_to_rgb_palette_modes():
    palette = PIL.Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    assert [to_rgb(palette).getpixel((x, 0)) for x in range(2)] == [(255, 0, 0), (0, 255, 0)]

    palette.info["transparency"] = 0
    assert [to_rgb(palette).getpixel((x, 0)) for x in range(2)] == [(255, 255, 255), (0, 255, 0)]

    pa = PIL.Image.new("PA", (1, 1), (1, 0))
    pa.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    assert to_rgb(pa).getpixel((0, 0)) == (255, 255, 255)

    rgb_key = PIL.Image.new("RGB", (2, 1), (10, 20, 30))
    rgb_key.putpixel((1, 0), (1, 2, 3))
    rgb_key.info["transparency"] = (10, 20, 30)
    assert [to_rgb(rgb_key).getpixel((x, 0)) for x in range(2)] == [(255, 255, 255), (1, 2, 3)]


def test_to_rgb_matches_transformers_convert_to_rgb():
    """The processor path must see the same pixels for every mode that transformers handles."""
    from transformers.image_transforms import convert_to_rgb

    images = [_noise_image(5, 4).convert(mode) for mode in ("RGBA", "LA", "L", "1", "P", "CMYK", "YCbCr")]
    transparent = _noise_image(5, 4).convert("P")
    transparent.info["transparency"] = 3
    images.append(transparent)
    alpha = _noise_image(5, 4).convert("RGBA")
    alpha.putalpha(PIL.Image.fromarray(np.arange(20, dtype=np.uint8).reshape(4, 5) * 12))
    images.append(alpha)
    # transformers before 5.18 (5.17 is what the [gpu] extra installs) drops the alpha band (`convert("RGB")`) where
    # later releases composite onto white as `to_rgb` does: there only the images without transparency are compared.
    blends = "return_numpy" in inspect.signature(convert_to_rgb).parameters
    for image in images:
        if not blends and ("A" in image.getbands() or "transparency" in image.info):
            continue
        np.testing.assert_array_equal(np.asarray(to_rgb(image)), np.asarray(convert_to_rgb(image)), image.mode)


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("1", 1, (255, 255, 255)),
        ("L", 77, (77, 77, 77)),
        ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
        ("YCbCr", (128, 128, 128), (128, 128, 128)),
        ("HSV", (0, 255, 255), (255, 0, 0)),
        ("RGB", (1, 2, 3), (1, 2, 3)),
    ],
)
def test_to_rgb_standard_modes(mode, value, expected):
    for size in [(1, 1), (3, 2)]:
        out = to_rgb(PIL.Image.new(mode, size, value))
        assert out.mode == "RGB" and out.size == size
        assert out.getpixel((0, 0)) == expected


def test_to_rgb_rescales_16_bit_by_bit_depth():
    values = np.array([[0, 32768, 65535, 257]], dtype=np.uint16)
    expected = [0, 128, 255, 1]
    little = PIL.Image.fromarray(values)
    big = PIL.Image.frombytes("I;16B", (4, 1), values.astype(">u2").tobytes())
    as_int = PIL.Image.fromarray(values.astype(np.int32))
    assert (little.mode, big.mode, as_int.mode) == ("I;16", "I;16B", "I")
    for image in (little, big, as_int):
        assert [to_rgb(image).getpixel((x, 0)) for x in range(4)] == [(v, v, v) for v in expected], image.mode


def test_to_rgb_clips_out_of_range_int_with_warning(caplog):
    image = PIL.Image.fromarray(np.array([[-5, 70000]], dtype=np.int32))
    with caplog.at_level(logging.WARNING, logger="cppo_trl.core.images"):
        out = to_rgb(image)
    assert [out.getpixel((x, 0)) for x in range(2)] == [(0, 0, 0), (255, 255, 255)]
    assert "clipped" in caplog.text


def test_to_rgb_float_on_0_255_scale():
    image = PIL.Image.fromarray(np.array([[-5.0, 0.4, 127.6, 300.0, np.nan]], dtype=np.float32))
    assert image.mode == "F"
    assert [to_rgb(image).getpixel((x, 0))[0] for x in range(5)] == [0, 0, 128, 255, 0]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_to_rgb_applies_exif_orientation(fmt):
    image = PIL.Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 10, 10))  # top-left corner red
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    image.save(buffer, fmt, exif=exif.tobytes())
    reloaded = PIL.Image.open(io.BytesIO(buffer.getvalue()))
    assert reloaded.size == (40, 20)
    out = to_rgb(reloaded)
    assert out.size == (20, 40)
    red, green, blue = out.getpixel((15, 5))  # top-left went to top-right
    assert red > 200 and blue < 60


def test_to_rgb_rejects_empty_and_non_images():
    with pytest.raises(ValueError, match="empty"):
        to_rgb(PIL.Image.new("RGB", (0, 5)))
    with pytest.raises(TypeError):
        to_rgb(np.zeros((4, 4, 3), dtype=np.uint8))


def test_to_rgb_returns_new_image():
    image = PIL.Image.new("RGB", (3, 3), (1, 2, 3))
    out = to_rgb(image)
    out.putpixel((0, 0), (9, 9, 9))
    assert image.getpixel((0, 0)) == (1, 2, 3)
