"""Tests for cppo_trl.core.perturbations: size preservation, determinism, information removal, validation."""

import dataclasses
import inspect
import math
import os
import random
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from cppo_trl.core.perturbations import (
    PRESERVING_PERTURBATIONS,
    REMOVING_PERTURBATIONS,
    ImageViews,
    PerturbationParams,
    apply_perturbation,
    make_views,
    make_views_for_sample,
    sample_key,
    view_seed,
)


ALL_PERTURBATIONS = PRESERVING_PERTURBATIONS + REMOVING_PERTURBATIONS
# Perspective always applied, so every transform is exercised.
ALWAYS = PerturbationParams(perspective_probability=1.0)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _array(image: PIL.Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def _corr(a: PIL.Image.Image, b: PIL.Image.Image) -> float:
    return float(np.corrcoef(_array(a).ravel(), _array(b).ravel())[0, 1])


def _noise_image(width: int, height: int, seed: int = 0) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _grey(array: np.ndarray) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.repeat(array.astype(np.uint8)[..., None], 3, axis=2))


def _textured() -> PIL.Image.Image:
    """4x4 grid of 16x16 cells with shuffled grey levels: position matters, no smooth trend to survive a zoom."""
    levels = np.random.default_rng(0).permutation(16).reshape(4, 4) * 15 + 20
    return _grey(np.kron(levels, np.ones((16, 16))))


def _gradient() -> PIL.Image.Image:
    y, x = np.mgrid[0:64, 0:64]
    return _grey(x * 2 + y * 2)


# --- size and mode --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(1, 1), (3, 7), (7, 3), (1, 40), (29, 57), (28, 28), (5000, 20), (20, 5000)])
@pytest.mark.parametrize("name", ALL_PERTURBATIONS)
def test_every_transform_keeps_size_and_rgb(name, size):
    out = apply_perturbation(_noise_image(*size), name, ALWAYS, _gen(0))
    assert out.size == size
    assert out.mode == "RGB"


def test_make_views_keeps_size_of_non_rgb_input():
    image = PIL.Image.new("RGBA", (31, 17), (10, 20, 30, 255))
    views = make_views(image, ALWAYS, seed=3)
    assert isinstance(views, ImageViews)
    assert views.preserved.size == views.removed.size == (31, 17)
    assert views.preserved.mode == views.removed.mode == "RGB"


def test_apply_perturbation_rejects_bad_input():
    with pytest.raises(ValueError, match="RGB"):
        apply_perturbation(PIL.Image.new("L", (4, 4)), "rotation", ALWAYS, _gen(0))
    with pytest.raises(ValueError, match="valid names"):
        apply_perturbation(PIL.Image.new("RGB", (4, 4)), "solarize", ALWAYS, _gen(0))


# --- determinism ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_PERTURBATIONS)
def test_transform_is_deterministic_per_seed(name):
    image = _noise_image(120, 90)  # 20 occlusion patches: seeds cannot pick the same subset by chance
    first = apply_perturbation(image, name, ALWAYS, _gen(7)).tobytes()
    assert apply_perturbation(image, name, ALWAYS, _gen(7)).tobytes() == first
    assert apply_perturbation(image, name, ALWAYS, _gen(8)).tobytes() != first


def test_identity_parameters_are_identity():
    """Degenerate parameters must not alter pixels: checks the transforms add no hidden change."""
    image = _noise_image(40, 30)
    params = PerturbationParams(
        color_jitter_brightness=(1.0, 1.0),
        color_jitter_contrast=(1.0, 1.0),
        color_jitter_saturation=(1.0, 1.0),
        perspective_probability=0.0,
        rotation_degrees=0.0,
        gaussian_noise_std=0.0,
        zoom_crop_side_range=(1.0, 1.0),
    )
    for name in ("color_jitter", "perspective", "rotation", "gaussian_noise", "zoom_crop"):
        assert apply_perturbation(image, name, params, _gen(0)).tobytes() == image.tobytes(), name


def test_make_views_deterministic_and_seed_sensitive():
    image = _noise_image(120, 90)
    a, b = make_views(image, ALWAYS, seed=123), make_views(image, ALWAYS, seed=123)
    assert (a.preserving_name, a.removing_name) == (b.preserving_name, b.removing_name)
    assert a.preserved.tobytes() == b.preserved.tobytes()
    assert a.removed.tobytes() == b.removed.tobytes()
    others = [make_views(image, ALWAYS, seed=seed) for seed in range(5)]
    assert len({v.preserved.tobytes() for v in others}) == 5
    assert len({v.removed.tobytes() for v in others}) == 5


def test_make_views_views_are_independent():
    """Tuning one set's parameters must not reshuffle the other view (clean ablations)."""
    image = _noise_image(120, 90)
    base = make_views(image, ALWAYS, seed=11)
    tuned = make_views(image, dataclasses.replace(ALWAYS, rotation_degrees=3.0, occlusion_ratio=0.5), seed=11)
    other_preserving = make_views(image, dataclasses.replace(ALWAYS, gaussian_blur_sigma=(3.0, 4.0)), seed=11)
    assert base.removing_name == tuned.removing_name
    if base.preserving_name != "rotation":
        assert tuned.preserved.tobytes() == base.preserved.tobytes()
    assert other_preserving.removed.tobytes() == base.removed.tobytes()


def test_make_views_leaves_global_rng_untouched():
    torch_state, python_state, numpy_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    make_views(_noise_image(32, 32), ALWAYS, seed=1)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == python_state
    assert np.array_equal(np.random.get_state()[1], numpy_state[1])


def test_make_views_draws_uniformly_from_configured_sets():
    image = _noise_image(2, 2)  # tiny: this test is about the draw, not the transforms
    views = [make_views(image, PerturbationParams(), seed=seed) for seed in range(240)]
    preserving = [v.preserving_name for v in views]
    removing = [v.removing_name for v in views]
    for name in PerturbationParams().preserving_perturbations:
        assert 35 <= preserving.count(name) <= 85, (name, preserving.count(name))  # expected 60
    for name in PerturbationParams().removing_perturbations:
        assert 90 <= removing.count(name) <= 150, (name, removing.count(name))  # expected 120
    assert set(preserving) == set(PerturbationParams().preserving_perturbations)

    only = PerturbationParams(preserving_perturbations=["gaussian_noise"], removing_perturbations=["noise_rectangles"])
    view = make_views(image, only, seed=0)
    assert (view.preserving_name, view.removing_name) == ("gaussian_noise", "noise_rectangles")


def test_view_seed_stable_distinct_and_in_range():
    seed = view_seed(42, 10, b"key")
    assert seed == view_seed(42, 10, b"key")
    assert view_seed(42, 10, "key") == seed  # str keys hash as UTF-8
    variants = {seed, view_seed(42, 11, b"key"), view_seed(43, 10, b"key"), view_seed(42, 10, b"kez")}
    assert len(variants) == 4
    for value in [*variants, view_seed(0, 0, b""), view_seed(-5, 2**70, b"\xff" * 100)]:
        assert isinstance(value, int)
        assert 0 <= value < 2**63
    with pytest.raises(TypeError):
        view_seed(1.5, 0, b"k")
    with pytest.raises(TypeError):
        view_seed(1, 0, 3)


def test_view_seed_independent_of_process_hash_salt():
    """Ranks and resumed runs are separate processes with different str-hash salts; the seed must not change.

    The child runs view_seed's own source (it only needs hashlib), which avoids a multi-second torch import.
    """
    code = f"import hashlib\n{inspect.getsource(view_seed)}\nprint(view_seed(42, 10, 'prompt-key'))"
    for salt in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": salt}
        child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
        assert child.stdout.strip() == str(view_seed(42, 10, "prompt-key"))


def test_sample_key_identifies_text_and_pixels():
    red, blue = PIL.Image.new("RGB", (4, 3), (255, 0, 0)), PIL.Image.new("RGB", (4, 3), (0, 0, 255))
    key = sample_key("what is shown?", [red, blue])
    assert isinstance(key, bytes) and len(key) == 32
    assert key == sample_key("what is shown?", [red.copy(), blue.copy()])
    different = {
        sample_key("what is shown? ", [red, blue]),
        sample_key("what is shown?", [blue, red]),
        sample_key("what is shown?", [red]),
        sample_key("what is shown?", [red, PIL.Image.new("RGB", (3, 4), (0, 0, 255))]),
        sample_key("what is shown?", [red, blue.convert("RGBA")]),
    }
    assert key not in different and len(different) == 5

    palette_a, palette_b = PIL.Image.new("P", (2, 2), 0), PIL.Image.new("P", (2, 2), 0)
    palette_a.putpalette([255, 0, 0] * 256)
    palette_b.putpalette([0, 255, 0] * 256)
    assert sample_key("", [palette_a]) != sample_key("", [palette_b])


def test_make_views_for_sample_per_image_and_per_step():
    image = _noise_image(40, 40)
    key = sample_key("prompt", [image, image])
    views = make_views_for_sample([image, image], ALWAYS, base_seed=0, step=5, key=key)
    assert len(views) == 2
    # Identical pixels, different index: each image still gets its own views.
    assert views[0].removed.tobytes() != views[1].removed.tobytes()
    assert views[0].preserved.tobytes() != views[1].preserved.tobytes()

    again = make_views_for_sample([image, image], ALWAYS, base_seed=0, step=5, key=key)
    assert [v.removed.tobytes() for v in again] == [v.removed.tobytes() for v in views]
    assert [v.preserved.tobytes() for v in again] == [v.preserved.tobytes() for v in views]

    for changed in (
        make_views_for_sample([image, image], ALWAYS, base_seed=0, step=6, key=key),
        make_views_for_sample([image, image], ALWAYS, base_seed=1, step=5, key=key),
        make_views_for_sample([image, image], ALWAYS, base_seed=0, step=5, key=b"other"),
    ):
        assert changed[0].removed.tobytes() != views[0].removed.tobytes()
    assert make_views_for_sample([], ALWAYS, base_seed=0, step=0, key=key) == []


# --- information preserved / removed -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(280, 140), (100, 60), (5, 5)])
def test_patch_occlusion_masks_exact_patch_count(size):
    width, height = size
    patch = 28
    white = PIL.Image.new("RGB", size, (255, 255, 255))
    out = np.asarray(apply_perturbation(white, "patch_occlusion", PerturbationParams(), _gen(0)))
    assert set(np.unique(out)) <= {0, 255}
    rows, cols = math.ceil(height / patch), math.ceil(width / patch)
    black_cells, black_pixels = 0, 0
    for r in range(rows):
        for c in range(cols):
            cell = out[r * patch : (r + 1) * patch, c * patch : (c + 1) * patch]
            assert cell.min() == cell.max(), "a patch is either fully masked or untouched"
            if cell.max() == 0:
                black_cells += 1
                black_pixels += cell.shape[0] * cell.shape[1]
    assert black_cells == max(1, math.floor(0.8 * rows * cols + 0.5))
    assert int((out.max(axis=2) == 0).sum()) == black_pixels
    if size == (280, 140):  # grid aligned: exactly 80% of pixels
        assert black_pixels == 40 * patch * patch == 0.8 * width * height
    if size == (5, 5):  # smaller than a patch: one patch, fully masked
        assert black_pixels == 25


def test_patch_occlusion_ratio_one_masks_everything():
    out = apply_perturbation(
        PIL.Image.new("RGB", (50, 30), (255, 255, 255)),
        "patch_occlusion",
        PerturbationParams(occlusion_ratio=1.0),
        _gen(0),
    )
    assert np.asarray(out).max() == 0


def test_zoom_crop_removes_far_more_than_color_jitter():
    image = _textured()
    zoom = [apply_perturbation(image, "zoom_crop", ALWAYS, _gen(seed)) for seed in range(20)]
    jitter = [apply_perturbation(image, "color_jitter", ALWAYS, _gen(seed)) for seed in range(20)]
    zoom_corr = [_corr(image, out) for out in zoom]
    jitter_corr = [_corr(image, out) for out in jitter]
    assert min(jitter_corr) > 0.95
    assert max(zoom_corr) < 0.7 and np.mean(zoom_corr) < 0.4
    assert min(np.abs(_array(out) - _array(image)).mean() for out in zoom) > 10


def test_noise_rectangles_bounded_by_configured_size():
    grey = PIL.Image.new("RGB", (40, 20), (128, 128, 128))
    params = PerturbationParams(noise_rectangles_count=1, noise_rectangles_size_range=(0.5, 0.5))
    changed = np.argwhere(np.asarray(apply_perturbation(grey, "noise_rectangles", params, _gen(0))).max(axis=2) != 128)
    (top, left), (bottom, right) = changed.min(axis=0), changed.max(axis=0)
    assert bottom - top < 10 and right - left < 20  # one 20x10 rectangle
    assert len(changed) > 0.9 * 200

    many = np.asarray(
        apply_perturbation(PIL.Image.new("RGB", (200, 100), (128,) * 3), "noise_rectangles", ALWAYS, _gen(0))
    )
    changed_fraction = (many != 128).any(axis=2).mean()
    assert 0.1 < changed_fraction < 0.8  # 50 rectangles of 5-15% per side


@pytest.mark.parametrize("name", PRESERVING_PERTURBATIONS)
def test_preserving_transforms_keep_high_correlation(name):
    """Compared on the central 48x48 px, which a 10-degree rotation or 0.2 perspective never moves out of frame."""
    image = _gradient()
    for seed in range(10):
        out = apply_perturbation(image, name, ALWAYS, _gen(seed))
        assert _corr(image.crop((8, 8, 56, 56)), out.crop((8, 8, 56, 56))) > 0.9


@pytest.mark.parametrize("name", ["patch_occlusion", "zoom_crop"])
def test_removing_transforms_have_low_correlation(name):
    image = _textured()
    correlations = [_corr(image, apply_perturbation(image, name, ALWAYS, _gen(seed))) for seed in range(20)]
    assert np.mean(correlations) < 0.4


def test_perspective_probability():
    image = _noise_image(40, 30)
    never = PerturbationParams(perspective_probability=0.0)
    applied = [
        apply_perturbation(image, "perspective", PerturbationParams(), _gen(seed)).tobytes() != image.tobytes()
        for seed in range(100)
    ]
    assert 30 <= sum(applied) <= 70  # p = 0.5
    assert apply_perturbation(image, "perspective", never, _gen(0)).tobytes() == image.tobytes()


def test_perspective_survives_degenerate_tiny_images():
    params = PerturbationParams(perspective_probability=1.0, perspective_distortion=1.0)
    for seed in range(50):
        for size in [(1, 1), (1, 5), (2, 2), (3, 2)]:
            assert apply_perturbation(_noise_image(*size), "perspective", params, _gen(seed)).size == size


# --- PerturbationParams validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("preserving_perturbations", ("color_jitter", "solarize")),
        ("preserving_perturbations", ()),
        ("preserving_perturbations", ("rotation", "rotation")),
        ("preserving_perturbations", "rotation"),
        ("preserving_perturbations", ("patch_occlusion",)),
        ("removing_perturbations", ()),
        ("removing_perturbations", ["gaussian_blur"]),
        ("occlusion_ratio", 0.0),
        ("occlusion_ratio", 1.5),
        ("occlusion_ratio", float("nan")),
        ("occlusion_patch_size", 0),
        ("occlusion_patch_size", 2.5),
        ("zoom_crop_side_range", (0.7, 0.6)),
        ("zoom_crop_side_range", (0.0, 0.5)),
        ("zoom_crop_side_range", (0.5, 1.2)),
        ("zoom_crop_side_range", (0.5,)),
        ("noise_rectangles_count", -1),
        ("noise_rectangles_size_range", (0.15, 0.05)),
        ("color_jitter_brightness", (1.3, 0.2)),
        ("color_jitter_contrast", (-0.1, 1.0)),
        ("color_jitter_saturation", (1.8, 0.2)),
        ("perspective_distortion", 1.5),
        ("perspective_probability", -0.1),
        ("rotation_degrees", -1.0),
        ("gaussian_blur_kernel_size", 4),
        ("gaussian_blur_kernel_size", 0),
        ("gaussian_blur_sigma", (0.0, 1.0)),
        ("gaussian_blur_sigma", (2.0, 0.1)),
        ("gaussian_noise_std", -0.01),
    ],
)
def test_params_validation_names_field(field, value):
    with pytest.raises(ValueError, match=field) as error:
        PerturbationParams(**{field: value})
    if "perturbations" in field and value and not isinstance(value, str) and value[0] != "rotation":
        assert "valid names" in str(error.value)


def test_params_accept_lists_and_freeze_them():
    params = PerturbationParams(
        preserving_perturbations=["rotation", "gaussian_noise"],
        removing_perturbations=["noise_rectangles"],
        zoom_crop_side_range=[0.6, 0.7],
        gaussian_blur_sigma=[1, 2],
    )
    assert params.preserving_perturbations == ("rotation", "gaussian_noise")
    assert params.removing_perturbations == ("noise_rectangles",)
    assert params.zoom_crop_side_range == (0.6, 0.7)
    assert params.gaussian_blur_sigma == (1.0, 2.0)
    hash(params)  # frozen and hashable, so it can key caches
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.occlusion_ratio = 0.5  # type: ignore[misc]


def test_default_params_follow_paper():
    params = PerturbationParams()
    assert params.removing_perturbations == ("patch_occlusion", "zoom_crop")
    assert params.occlusion_ratio == 0.8
    assert params.zoom_crop_side_range[0] ** 2 == pytest.approx(0.3, abs=1e-4)  # 30% of the area kept
