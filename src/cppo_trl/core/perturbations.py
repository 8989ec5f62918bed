"""Information-preserving and information-removing image views for CPPO (paper §4.1; docs/method.md).

Views are built on PIL images *before* the model's processor, so the method is model-agnostic and the number of
image tokens never changes: every view keeps the original width and height. All randomness comes from an explicit
`torch.Generator`, so a view is a pure function of (image, params, seed) and the global RNGs are never touched.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import PIL.Image
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from cppo_trl.core.images import to_rgb


logger = logging.getLogger(__name__)

PRESERVING_PERTURBATIONS: tuple[str, ...] = (
    "color_jitter",
    "perspective",
    "rotation",
    "gaussian_blur",
    "gaussian_noise",
)
REMOVING_PERTURBATIONS: tuple[str, ...] = ("patch_occlusion", "zoom_crop", "noise_rectangles")

_MAX_SEED = 2**63 - 1
# (columns, rows) of the vision tokens an image becomes (`cppo_trl.core.images.PixelBudget.token_grid`).
TokenGrid = tuple[int, int]


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class PerturbationParams:
    """Which transforms each view set may use and their parameters; defaults follow the paper's text (docs/method.md, paper or released code)."""

    preserving_perturbations: tuple[str, ...] = ("color_jitter", "perspective", "rotation", "gaussian_blur")
    removing_perturbations: tuple[str, ...] = ("patch_occlusion", "zoom_crop")
    # Fraction of patches masked (paper: 80%).
    occlusion_ratio: float = 0.8
    # Patch side in pixels: Qwen2.5-VL merges 28x28 px into one visual token.
    occlusion_patch_size: int = 28
    # Fraction of EACH side kept (one draw for both sides keeps the aspect ratio); the paper keeps 30% of the
    # area = sqrt(0.3) per side, the released code draws from (0.6, 0.7).
    zoom_crop_side_range: tuple[float, float] = (0.5477, 0.5477)
    noise_rectangles_count: int = 50
    # Each rectangle's width/height as a fraction of the image's width/height.
    noise_rectangles_size_range: tuple[float, float] = (0.05, 0.15)
    color_jitter_brightness: tuple[float, float] = (0.2, 1.3)
    color_jitter_contrast: tuple[float, float] = (0.2, 1.8)
    color_jitter_saturation: tuple[float, float] = (0.2, 1.8)
    perspective_distortion: float = 0.2
    perspective_probability: float = 0.5
    rotation_degrees: float = 10.0
    gaussian_blur_kernel_size: int = 5
    gaussian_blur_sigma: tuple[float, float] = (0.1, 2.0)
    # Standard deviation on the [0, 1] pixel scale.
    gaussian_noise_std: float = 0.05

    def __post_init__(self) -> None:
        """Fail at config time, naming the field, rather than deep inside a training step."""
        self._check_names("preserving_perturbations", PRESERVING_PERTURBATIONS)
        self._check_names("removing_perturbations", REMOVING_PERTURBATIONS)

        self._check_number("occlusion_ratio", low=0.0, high=1.0, low_inclusive=False)
        self._check_int("occlusion_patch_size", minimum=1)
        self._check_range("zoom_crop_side_range", low=0.0, high=1.0, low_inclusive=False)
        self._check_int("noise_rectangles_count", minimum=1)
        self._check_range("noise_rectangles_size_range", low=0.0, high=1.0, low_inclusive=False)
        self._check_range("color_jitter_brightness", low=0.0)
        self._check_range("color_jitter_contrast", low=0.0)
        self._check_range("color_jitter_saturation", low=0.0)
        self._check_number("perspective_distortion", low=0.0, high=1.0)
        self._check_number("perspective_probability", low=0.0, high=1.0)
        self._check_number("rotation_degrees", low=0.0, high=180.0)
        self._check_int("gaussian_blur_kernel_size", minimum=1)
        if self.gaussian_blur_kernel_size % 2 == 0:
            raise ValueError(f"gaussian_blur_kernel_size must be odd, got {self.gaussian_blur_kernel_size!r}")
        self._check_range("gaussian_blur_sigma", low=0.0, low_inclusive=False)
        self._check_number("gaussian_noise_std", low=0.0)

    def _check_names(self, field: str, valid: tuple[str, ...]) -> None:
        names = getattr(self, field)
        if isinstance(names, str) or not isinstance(names, Sequence):
            raise ValueError(f"{field} must be a list or tuple of transform names, got {names!r}")
        names = tuple(names)
        if not names:
            raise ValueError(f"{field} must not be empty; valid names: {', '.join(valid)}")
        unknown = [name for name in names if name not in valid]
        if unknown:
            raise ValueError(f"{field} has unknown transform(s) {unknown!r}; valid names: {', '.join(valid)}")
        if len(set(names)) != len(names):
            # A duplicate would silently double that transform's draw probability.
            raise ValueError(f"{field} has duplicate names: {names!r}")
        object.__setattr__(self, field, names)

    def _check_int(self, field: str, minimum: int) -> None:
        value = getattr(self, field)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"{field} must be an integer >= {minimum}, got {value!r}")

    def _check_number(self, field: str, low: float, high: float = math.inf, low_inclusive: bool = True) -> None:
        value = getattr(self, field)
        above_low = _is_number(value) and (value >= low if low_inclusive else value > low)
        if not (above_low and value <= high):
            bracket = "[" if low_inclusive else "("
            raise ValueError(f"{field} must be a number in {bracket}{low}, {high}], got {value!r}")

    def _check_range(self, field: str, low: float, high: float = math.inf, low_inclusive: bool = True) -> None:
        value = getattr(self, field)
        bracket = "[" if low_inclusive else "("
        if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != 2:
            raise ValueError(f"{field} must be a (low, high) pair, got {value!r}")
        for bound in value:
            ok = _is_number(bound) and (bound >= low if low_inclusive else bound > low) and bound <= high
            if not ok:
                raise ValueError(f"{field} bounds must be numbers in {bracket}{low}, {high}], got {value!r}")
        if value[0] > value[1]:
            raise ValueError(f"{field} must have low <= high, got {value!r}")
        object.__setattr__(self, field, (float(value[0]), float(value[1])))


def view_seed(base_seed: int, step: int, sample_key: str | bytes) -> int:
    """Deterministic 63-bit seed from (training seed, optimizer step, sample identity).

    Uses sha256, not Python's `hash()` (salted per process), so a resumed run and every rank derive the same seed.
    A `str` key is hashed as its UTF-8 bytes.
    """
    for name, value in (("base_seed", base_seed), ("step", step)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if isinstance(sample_key, str):
        sample_key = sample_key.encode("utf-8")
    if not isinstance(sample_key, bytes):
        raise TypeError(f"sample_key must be str or bytes, got {type(sample_key).__name__}")
    digest = hashlib.sha256(f"cppo-view-seed\0{base_seed}\0{step}\0".encode() + sample_key).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def sample_key(prompt_text: str, images: Sequence[PIL.Image.Image]) -> bytes:
    """Stable identity of a prompt from its text and pixels.

    The G rollouts of one prompt get the same key and therefore share the same views. Fields are length-prefixed
    so that different (text, images) splits cannot collide; palettes are included since P-mode pixels are indices.
    """
    hasher = hashlib.sha256()

    def update(chunk: bytes) -> None:
        hasher.update(len(chunk).to_bytes(8, "big"))
        hasher.update(chunk)

    update(prompt_text.encode("utf-8"))
    update(str(len(images)).encode())
    for image in images:
        if not isinstance(image, PIL.Image.Image):
            raise TypeError(f"sample_key expects PIL images, got {type(image).__name__}")
        update(f"{image.mode}\0{image.width}\0{image.height}".encode())
        update(bytes(image.getpalette() or ()) if image.mode in ("P", "PA") else b"")
        update(image.tobytes())
    return hasher.digest()


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def _randint(low: int, high: int, generator: torch.Generator) -> int:
    """Integer in [low, high), like torch.randint but with our generator."""
    return int(torch.randint(low, high, (1,), generator=generator))


def _patch_occlusion(
    img: torch.Tensor, params: PerturbationParams, generator: torch.Generator, token_grid: TokenGrid | None = None
) -> torch.Tensor:
    """Black out round(ratio * n) of the image's n cells, chosen uniformly.

    With a `token_grid` (columns, rows of the vision tokens the processor will cut the image into), the cells are the
    image regions those tokens cover, `[round(k * W / cols), round((k + 1) * W / cols))` along each side: after the
    processor's own resize each masked cell lands on one token (up to the resampling kernel's pixel at its edges).
    Without one, the cells are `occlusion_patch_size` squares from the top-left corner, border cells partial. At
    least one cell is masked, so the removing view never degenerates to the original.
    """
    _, height, width = img.shape
    if token_grid is None:
        size = params.occlusion_patch_size
        cols, rows = math.ceil(width / size), math.ceil(height / size)
        x_edges = [min(width, c * size) for c in range(cols + 1)]
        y_edges = [min(height, r * size) for r in range(rows + 1)]
    else:
        cols, rows = token_grid
        x_edges = [round(c * width / cols) for c in range(cols + 1)]
        y_edges = [round(r * height / rows) for r in range(rows + 1)]
    n_cells = rows * cols
    n_masked = max(1, math.floor(params.occlusion_ratio * n_cells + 0.5))  # half-up, not banker's rounding
    chosen = torch.randperm(n_cells, generator=generator)[:n_masked].tolist()
    out = img.clone()
    for cell in chosen:
        row, col = divmod(cell, cols)
        out[:, y_edges[row] : y_edges[row + 1], x_edges[col] : x_edges[col + 1]] = 0
    return out


def _zoom_crop(img: torch.Tensor, params: PerturbationParams, generator: torch.Generator) -> torch.Tensor:
    _, height, width = img.shape
    side = _uniform(*params.zoom_crop_side_range, generator)
    crop_h, crop_w = max(1, round(side * height)), max(1, round(side * width))
    top = _randint(0, height - crop_h + 1, generator)
    left = _randint(0, width - crop_w + 1, generator)
    return F.resized_crop(
        img, top, left, crop_h, crop_w, [height, width], interpolation=InterpolationMode.BILINEAR, antialias=True
    )


def _noise_rectangles(img: torch.Tensor, params: PerturbationParams, generator: torch.Generator) -> torch.Tensor:
    _, height, width = img.shape
    low, high = params.noise_rectangles_size_range
    out = img.clone()
    for _ in range(params.noise_rectangles_count):
        rect_w = max(1, round(_uniform(low, high, generator) * width))
        rect_h = max(1, round(_uniform(low, high, generator) * height))
        left = _randint(0, width - rect_w + 1, generator)
        top = _randint(0, height - rect_h + 1, generator)
        noise = torch.randint(0, 256, (3, rect_h, rect_w), generator=generator, dtype=torch.uint8)
        out[:, top : top + rect_h, left : left + rect_w] = noise
    return out


def _color_jitter(img: torch.Tensor, params: PerturbationParams, generator: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation in a random order, as torchvision's ColorJitter does."""
    order = torch.randperm(3, generator=generator).tolist()
    factors = (
        _uniform(*params.color_jitter_brightness, generator),
        _uniform(*params.color_jitter_contrast, generator),
        _uniform(*params.color_jitter_saturation, generator),
    )
    adjust = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation)
    for index in order:
        img = adjust[index](img, factors[index])
    return img


def _perspective(img: torch.Tensor, params: PerturbationParams, generator: torch.Generator) -> torch.Tensor:
    """torchvision RandomPerspective's corner sampling, with our generator.

    A 1-px wide or tall image has no quadrilateral to warp (collinear corners), so it is returned unchanged, as is
    the rare draw whose end corners are degenerate (tiny images with a large distortion).
    """
    if float(torch.rand((), generator=generator)) >= params.perspective_probability:
        return img
    _, height, width = img.shape
    if height < 2 or width < 2:
        return img
    bound_h = int(params.perspective_distortion * (height // 2)) + 1
    bound_w = int(params.perspective_distortion * (width // 2)) + 1
    top_left = [_randint(0, bound_w, generator), _randint(0, bound_h, generator)]
    top_right = [_randint(width - bound_w, width, generator), _randint(0, bound_h, generator)]
    bottom_right = [_randint(width - bound_w, width, generator), _randint(height - bound_h, height, generator)]
    bottom_left = [_randint(0, bound_w, generator), _randint(height - bound_h, height, generator)]
    start = [[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]]
    end = [top_left, top_right, bottom_right, bottom_left]
    try:
        return F.perspective(img, start, end, interpolation=InterpolationMode.BILINEAR, fill=[0.0])
    except torch.linalg.LinAlgError:
        logger.debug("perspective: degenerate corners %s for a %dx%d image, left unchanged", end, width, height)
        return img


def _rotation(img: torch.Tensor, params: PerturbationParams, generator: torch.Generator) -> torch.Tensor:
    """Nearest interpolation and black fill, as torchvision's RandomRotation defaults (used by the released code)."""
    angle = _uniform(-params.rotation_degrees, params.rotation_degrees, generator)
    return F.rotate(img, angle, interpolation=InterpolationMode.NEAREST, expand=False, fill=[0.0])


def _largest_odd_at_most(limit: int, kernel_size: int) -> int:
    return min(kernel_size, limit if limit % 2 else limit - 1)


def _gaussian_blur(img: torch.Tensor, params: PerturbationParams, generator: torch.Generator) -> torch.Tensor:
    """Blur with the kernel clipped per axis to the largest odd size that fits (reflect padding needs it).

    An axis of 1 px gets a 1-tap kernel, i.e. is not blurred; a 1x1 image is returned unchanged.
    """
    _, height, width = img.shape
    sigma = _uniform(*params.gaussian_blur_sigma, generator)
    kernel = [
        _largest_odd_at_most(width, params.gaussian_blur_kernel_size),
        _largest_odd_at_most(height, params.gaussian_blur_kernel_size),
    ]
    if kernel == [1, 1]:
        return img
    return F.gaussian_blur(img, kernel, [sigma, sigma])


def _gaussian_noise(img: torch.Tensor, params: PerturbationParams, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(img.shape, generator=generator) * params.gaussian_noise_std
    noisy = (img.float() / 255.0 + noise).clamp_(0.0, 1.0)
    return (noisy * 255.0).round_().to(torch.uint8)


_TRANSFORMS: dict[str, Callable[[torch.Tensor, PerturbationParams, torch.Generator], torch.Tensor]] = {
    "color_jitter": _color_jitter,
    "perspective": _perspective,
    "rotation": _rotation,
    "gaussian_blur": _gaussian_blur,
    "gaussian_noise": _gaussian_noise,
    "patch_occlusion": _patch_occlusion,
    "zoom_crop": _zoom_crop,
    "noise_rectangles": _noise_rectangles,
}


def apply_perturbation(
    image: PIL.Image.Image,
    name: str,
    params: PerturbationParams,
    generator: torch.Generator,
    token_grid: TokenGrid | None = None,
) -> PIL.Image.Image:
    """Apply ONE named transform to an RGB image (call `to_rgb` first); the result is RGB of the same size.

    The size is checked because a changed size would change the number of image tokens between anchor and view.
    `token_grid` (the image's vision-token columns and rows) aligns `patch_occlusion` to the tokens.
    """
    if not isinstance(image, PIL.Image.Image) or image.mode != "RGB":
        mode = image.mode if isinstance(image, PIL.Image.Image) else type(image).__name__
        raise ValueError(f"apply_perturbation expects an RGB PIL image (use to_rgb), got {mode}")
    if name not in _TRANSFORMS:
        raise ValueError(f"unknown perturbation {name!r}; valid names: {', '.join(_TRANSFORMS)}")
    tensor = F.pil_to_tensor(image)
    if name == "patch_occlusion":
        out = F.to_pil_image(_patch_occlusion(tensor, params, generator, token_grid))
    else:
        out = F.to_pil_image(_TRANSFORMS[name](tensor, params, generator))
    if out.size != image.size or out.mode != "RGB":
        raise RuntimeError(f"{name} produced a {out.mode} {out.size} image from an RGB {image.size} one")
    return out


@dataclass(frozen=True)
class ImageViews:
    """The two CPPO views of one image and the transform names that made them (for logging)."""

    preserved: PIL.Image.Image
    removed: PIL.Image.Image
    preserving_name: str
    removing_name: str


def make_views(
    image: PIL.Image.Image, params: PerturbationParams, seed: int, token_grid: TokenGrid | None = None
) -> ImageViews:
    """Draw one transform uniformly from each set with a generator seeded by `seed`, and apply it.

    Each view gets its own sub-seed, so neither view depends on how many random numbers the other transform
    consumed: tuning a preserving transform's parameters leaves the removed view unchanged, and vice versa.
    """
    rgb = to_rgb(image)
    generator = torch.Generator().manual_seed(seed)
    preserving_name = params.preserving_perturbations[_randint(0, len(params.preserving_perturbations), generator)]
    removing_name = params.removing_perturbations[_randint(0, len(params.removing_perturbations), generator)]
    preserving_seed, removing_seed = torch.randint(0, _MAX_SEED, (2,), generator=generator).tolist()
    return ImageViews(
        preserved=apply_perturbation(rgb, preserving_name, params, torch.Generator().manual_seed(preserving_seed)),
        removed=apply_perturbation(
            rgb, removing_name, params, torch.Generator().manual_seed(removing_seed), token_grid
        ),
        preserving_name=preserving_name,
        removing_name=removing_name,
    )


def make_views_for_sample(
    images: Sequence[PIL.Image.Image],
    params: PerturbationParams,
    base_seed: int,
    step: int,
    key: bytes,
    token_grids: Sequence[TokenGrid | None] | None = None,
    image_keys: Sequence[int] | None = None,
) -> list[ImageViews]:
    """Views for several images of one sample; image i is seeded by (base_seed, step, key, image_keys[i]).

    `image_keys` defaults to the image's index, so a prompt's images get the same views in all its rollouts; a caller
    seeds an image that differs between rollouts (a tool's answer) by its content instead. `token_grids` aligns each
    image's occlusion cells to its vision tokens.
    """
    prompt_seed = view_seed(base_seed, step, key)
    image_keys = range(len(images)) if image_keys is None else image_keys
    token_grids = [None] * len(images) if token_grids is None else token_grids
    return [
        make_views(image, params, view_seed(prompt_seed, image_key, b"image"), grid)
        for image, image_key, grid in zip(images, image_keys, token_grids, strict=True)
    ]
