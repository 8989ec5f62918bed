"""A zoom-in tool for VLM agents: the crop of the *original* image a tool call asks for.

`ZoomEnvironment` is a TRL `environment_factory`: `reset(**row)` keeps the row's images (the prompt already shows
them, so it returns None) and its one public method, `zoom_in(bbox_2d)`, becomes the rollout's tool (TRL derives the
tool schema from its docstring). It crops the box from the image in the dataset row, not the processor's downsized
copy, enlarges the crop and returns it as an image part, so the policy sees the region at a resolution the whole image
never reaches under the processor's pixel budget. `RelativeZoomEnvironment` takes the box on a 0-1000 grid (how
Qwen3-VL grounds boxes). `ENVIRONMENTS` is the registry the training script's `environment` argument reads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from PIL import Image as PILImage

from cppo_trl.core.images import to_rgb


class ZoomEnvironment:
    """Zoom-in tool over the row's image, for TRL's `environment_factory` (one instance per rollout, reused).

    `reset(**row)` receives the dataset row's fields (TRL passes them as keyword arguments) and keeps its `images`
    (or `image`) in 8-bit RGB; the tool crops the first of them, as DeepEyes's `image_zoom_in_tool` does. Coordinates
    are pixels of that original image (`coordinate_scale` None) or, in a subclass, a `coordinate_scale` x
    `coordinate_scale` grid over it. The box is clamped to the image; an empty, too thin or malformed box answers an
    error string the model sees (TRL sends it as the tool message) and counts in `num_errors`. The crop is enlarged
    (aspect kept, bicubic) until its short side is at least `min_short_side` pixels; the processor then resizes it to
    its pixel budget like any image.

    Only `zoom_in` is public: TRL turns every public method of an environment (except `reset` and `get_reward`)
    into a tool.
    """

    coordinate_scale: int | None = None
    min_short_side: int = 112
    max_aspect_ratio: float = 100.0  # the processor refuses aspect ratios of 200 and more; DeepEyes allows 100

    def __init__(self) -> None:
        self._images: list[PILImage.Image] = []
        self.num_calls = 0
        self.num_errors = 0

    def reset(self, **row: Any) -> None:
        """Keep the row's images for the tool; the prompt already shows them, so there is no first observation."""
        images = row.get("images")
        if images is None and row.get("image") is not None:
            images = [row["image"]]
        self._images = [to_rgb(image) for image in images or []]
        self.num_calls = self.num_errors = 0
        return None

    def zoom_in(self, bbox_2d: list[int]) -> list | str:
        """
        Crop a region of the image and show it enlarged, to see details too small in the whole image.

        Args:
            bbox_2d: The region [x1, y1, x2, y2] in pixels of the original image (top-left and bottom-right corners).

        Returns:
            The enlarged region.
        """
        return self._zoom(bbox_2d)

    # -- helpers (private: a public method would become a tool)
    def _zoom(self, bbox_2d: Any) -> list | str:
        self.num_calls += 1
        result = self._crop(bbox_2d)
        if isinstance(result, str):
            self.num_errors += 1
            return result
        crop, shown = result
        return [
            {"type": "image", "image": self._enlarge(crop)},
            {"type": "text", "text": f"Zoom on [{shown[0]}, {shown[1]}, {shown[2]}, {shown[3]}]."},
        ]

    def _crop(self, bbox_2d: Any) -> tuple[PILImage.Image, list] | str:
        """The crop and the clamped box in the caller's coordinates, or the error message."""
        if not self._images:
            return "Error: there is no image to zoom into."
        numbers = list(bbox_2d) if isinstance(bbox_2d, list | tuple) else None
        if (
            numbers is None
            or len(numbers) != 4
            or not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in numbers)
        ):
            return f"Error: bbox_2d must be four numbers [x1, y1, x2, y2], got {bbox_2d!r}."
        image = self._images[0]
        width, height = image.size
        scale_x, scale_y = (
            (1.0, 1.0)
            if self.coordinate_scale is None
            else (width / self.coordinate_scale, height / self.coordinate_scale)
        )
        # Rounded to 1e-6 px first, so that a grid coordinate that maps onto a pixel edge (500 x 0.4) stays on it.
        x1, y1, x2, y2 = (round(v * scale, 6) for v, scale in zip(numbers, (scale_x, scale_y) * 2, strict=True))
        left = min(max(math.floor(x1), 0), width)
        top = min(max(math.floor(y1), 0), height)
        right = min(max(math.ceil(x2), 0), width)
        bottom = min(max(math.ceil(y2), 0), height)
        limit = self.coordinate_scale or None
        shown = [_clamp(v, limit or (width if i % 2 == 0 else height)) for i, v in enumerate(numbers)]
        if right <= left or bottom <= top:
            size = f"{self.coordinate_scale}x{self.coordinate_scale} grid" if limit else f"{width}x{height} image"
            return (
                f"Error: bbox_2d {_box_text(numbers)} is empty once clamped to the {size}: x2 must be greater than "
                f"x1 and y2 greater than y1, inside the image."
            )
        box_width, box_height = right - left, bottom - top
        if max(box_width, box_height) / min(box_width, box_height) > self.max_aspect_ratio:
            return (
                f"Error: bbox_2d {_box_text(numbers)} is too thin ({box_width}x{box_height} pixels); its aspect "
                f"ratio must be at most {self.max_aspect_ratio:g}."
            )
        return image.crop((left, top, right, bottom)), shown

    def _enlarge(self, crop: PILImage.Image) -> PILImage.Image:
        scale = self.min_short_side / min(crop.size)
        if scale <= 1:
            return crop
        size = (max(1, round(crop.width * scale)), max(1, round(crop.height * scale)))
        return crop.resize(size, PILImage.Resampling.BICUBIC)


class RelativeZoomEnvironment(ZoomEnvironment):
    """`ZoomEnvironment` with the box on a 0-1000 grid over the image, the coordinates Qwen3-VL grounds in."""

    coordinate_scale = 1000

    def zoom_in(self, bbox_2d: list[int]) -> list | str:
        """
        Crop a region of the image and show it enlarged, to see details too small in the whole image.

        Args:
            bbox_2d: The region [x1, y1, x2, y2] on a 0-1000 grid over the image (top-left and bottom-right corners; [0, 0, 1000, 1000] is the whole image).

        Returns:
            The enlarged region.
        """
        return self._zoom(bbox_2d)


def _clamp(value: float, limit: int) -> int | float:
    value = min(max(value, 0), limit)
    return int(value) if float(value).is_integer() else round(value, 1)


def _box_text(numbers: Sequence[float]) -> str:
    return "[" + ", ".join(str(int(v)) if float(v).is_integer() else str(v) for v in numbers) + "]"


# The training script's `environment` names (`CPPOScriptArguments.environment`).
ENVIRONMENTS: dict[str, type[ZoomEnvironment]] = {"zoom": ZoomEnvironment, "zoom_relative": RelativeZoomEnvironment}


def get_environment(name: str) -> type[ZoomEnvironment]:
    """The environment class registered as `name` (what `environment_factory` takes)."""
    if name not in ENVIRONMENTS:
        raise ValueError(f"Unknown environment {name!r}; valid names: {sorted(ENVIRONMENTS)}")
    return ENVIRONMENTS[name]
