"""Images as every consumer must receive them: 8-bit RGB (`to_rgb`), and the pixel budget that sizes them.

The resize itself is left to the processor, the one place that does it for training: a resize of our own, however
close, is not the processor's (another filter gives other pixels, and Qwen's `smart_resize` is not idempotent near its
limits: with `min_pixels = max_pixels = 112²` a 300x200 image gets 12 vision tokens from the processor but 20 once
resized to its own target first), and GRPO on the same data would then see other images. So `PixelBudget` only says
what the processor will do (target size, token grid) and hands the same limits to the other consumers: vLLM
(`mm_processor_kwargs`) and the views (occlusion cells on the token grid).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import PIL.Image
import PIL.ImageOps


logger = logging.getLogger(__name__)

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Normalise any PIL image to 8-bit RGB as a VLM processor expects, so views and the anchor see the same pixels.

    - EXIF orientation is applied first (what a viewer, and transformers' `load_image`, shows); the size returned is
      the transposed one.
    - Transparency (an alpha band, premultiplied or not, or a `transparency` entry) is composited onto white, as
      transformers' `convert_to_rgb` does.
    - 16-bit integer modes (`I;16*`) are rescaled by their bit depth (65535 -> 255) instead of clipped. Mode `I` is
      32-bit, but Pillow uses it as the container for 16-bit samples, so it is read on the same 0..65535 scale;
      values outside it are clipped (with a warning).
    - Mode `F` is read on the 0..255 scale Pillow itself assumes for `F` -> `L`, clipped and rounded (NaN -> 0). A
      per-image min-max stretch would make brightness depend on content, so it is not used.
    - Every other mode (1, L, P, CMYK, YCbCr, LAB, HSV, ...) goes through Pillow's own `convert("RGB")`.
    """
    if not isinstance(image, PIL.Image.Image):
        raise TypeError(f"to_rgb expects a PIL.Image.Image, got {type(image).__name__}")
    if image.width == 0 or image.height == 0:
        raise ValueError(f"cannot build views of an empty image (size {image.size})")
    image = PIL.ImageOps.exif_transpose(image)

    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        values = np.asarray(image)
        if image.mode == "F":
            values = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 255.0)
            max_value = 255.0
        else:
            if image.mode == "I" and (values.min() < 0 or values.max() > 65535):
                logger.warning("to_rgb: mode 'I' values outside 0..65535 are clipped (read as 16-bit samples)")
                values = np.clip(values, 0, 65535)
            max_value = 65535.0
        grey = np.rint(values.astype(np.float64) * (255.0 / max_value)).astype(np.uint8)
        return PIL.Image.fromarray(grey).convert("RGB")

    bands = image.getbands()
    if "A" in bands or "a" in bands or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


@dataclass(frozen=True)
class PixelBudget:
    """Qwen-style dynamic resolution: sides rounded to a multiple of `factor` px with `min_pixels` <= area <= `max_pixels`.

    `factor` is the side of one merged vision token (patch size x merge size: 28 for Qwen2/2.5-VL, 32 for Qwen3-VL).
    """

    factor: int
    min_pixels: int
    max_pixels: int

    @classmethod
    def from_processor(cls, processor) -> PixelBudget | None:
        """The budget the processor itself applies (its `min_pixels`/`max_pixels`, as set by the recipe), or None for
        processors that resize to a fixed size (Gemma3, LLaVA, Idefics3, ...), where no budget can disagree."""
        image_processor = getattr(processor, "image_processor", processor)
        patch, merge = getattr(image_processor, "patch_size", None), getattr(image_processor, "merge_size", None)
        size = getattr(image_processor, "size", None)
        # transformers 5 keeps Qwen's min/max pixels as size.shortest_edge / size.longest_edge (areas, not sides).
        low = getattr(image_processor, "min_pixels", None) or getattr(size, "shortest_edge", None)
        high = getattr(image_processor, "max_pixels", None) or getattr(size, "longest_edge", None)
        if not (isinstance(patch, int) and isinstance(merge, int) and low and high):
            return None
        return cls(factor=patch * merge, min_pixels=int(low), max_pixels=int(high))

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) the processor resizes a `width` x `height` image to."""
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        new_height, new_width = smart_resize(
            height, width, factor=self.factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels
        )
        return new_width, new_height

    def token_grid(self, width: int, height: int) -> tuple[int, int]:
        """(columns, rows) of merged vision tokens of a `width` x `height` image after the processor's resize."""
        new_width, new_height = self.target_size(width, height)
        return new_width // self.factor, new_height // self.factor

    def processor_kwargs(self) -> dict[str, dict[str, int]]:
        """The limits as a processor call takes them (transformers 5's `size`), for vLLM's `mm_processor_kwargs`, so
        that vLLM resizes exactly like the trainer's processor."""
        return {"size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}}


def load_processor(
    source: str,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
):
    """Left-padded processor (generation appends on the right) with the recipe's pixel limits, checked to have taken
    effect: every consumer derives its `PixelBudget` from this processor, so a limit a transformers version quietly
    ignored would silently change every prompt. Fixed-size processors have no such limit (logged, not an error)."""
    from transformers import AutoProcessor

    limits = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v}
    load = {"revision": revision, "trust_remote_code": trust_remote_code, "padding_side": "left"}
    processor = AutoProcessor.from_pretrained(source, **load)
    size = dict(getattr(getattr(processor, "image_processor", None), "size", None) or {})
    if limits and {"shortest_edge", "longest_edge"} <= size.keys():
        # Qwen-style: the limits as `size` (shortest_edge = min_pixels, longest_edge = max_pixels). Loaded as
        # min_pixels/max_pixels they reach every processor call, deprecated there since transformers 5.18.
        size.update({"shortest_edge": limits.get("min_pixels", size["shortest_edge"])})
        size.update({"longest_edge": limits.get("max_pixels", size["longest_edge"])})
        processor = AutoProcessor.from_pretrained(source, size=size, **load)
    elif limits:
        processor = AutoProcessor.from_pretrained(source, **load, **limits)
    budget = PixelBudget.from_processor(processor)
    if limits and budget is None:
        logger.warning(
            "min_pixels/max_pixels have no effect on %s: it resizes every image to a fixed size",
            type(getattr(processor, "image_processor", processor)).__name__,
        )
    elif budget is not None and any(getattr(budget, name) != value for name, value in limits.items()):
        raise ValueError(
            f"The processor of {source} did not take the pixel limits {limits}: its budget is {budget}. This "
            f"transformers version may expect `size={{'shortest_edge': ..., 'longest_edge': ...}}` instead."
        )
    return processor
