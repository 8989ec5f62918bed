"""PAPO's masked image: square cells of the raw image blackened at random, each cell independently (docs/papo.md).

The authors' `random_patch_blackening` (PAPO `verl/trainer/papo_utils.py`) walks a grid of `patch_size` px cells from
the top-left corner (the last row and column may be partial) and blackens each cell with probability `black_prob`
(0.6 in every released config), drawing from the global `np.random`. Here the draw comes from a seed instead, so a
resumed run and every rank rebuild the same mask; the grid, the order and the probability are the authors'.
"""

from __future__ import annotations

import math

import numpy as np
import PIL.Image


def patch_mask(width: int, height: int, patch_size: int, probability: float, seed: int) -> np.ndarray:
    """(rows, columns) booleans, True for a cell to blacken: one Bernoulli(`probability`) draw per `patch_size` px
    cell of a `width` x `height` image, row by row as the authors draw them."""
    if not (isinstance(patch_size, int) and patch_size >= 1):
        raise ValueError(f"patch_size must be an integer >= 1, got {patch_size!r}")
    if not 0.0 <= probability <= 1.0:  # also rejects NaN
        raise ValueError(f"probability must be in [0, 1], got {probability!r}")
    if width < 1 or height < 1:
        raise ValueError(f"cannot mask an empty image ({width}x{height})")
    rows, columns = math.ceil(height / patch_size), math.ceil(width / patch_size)
    return np.random.default_rng(seed).random((rows, columns)) < probability


def blacken_patches(image: PIL.Image.Image, mask: np.ndarray, patch_size: int) -> PIL.Image.Image:
    """A copy of the RGB `image` with every cell of `mask` that is True set to black (0, 0, 0)."""
    if image.mode != "RGB":
        raise ValueError(
            f"blacken_patches expects an RGB image (see cppo_trl.core.images.to_rgb), got mode {image.mode!r}"
        )
    rows, columns = math.ceil(image.height / patch_size), math.ceil(image.width / patch_size)
    if mask.shape != (rows, columns):
        raise ValueError(f"mask shape {mask.shape} does not match the {rows}x{columns} cells of a {image.size} image")
    pixels = np.array(image)  # (H, W, 3), a copy
    # Expand cells to pixels, then crop the partial last row/column of cells to the image.
    full = np.kron(mask, np.ones((patch_size, patch_size), dtype=bool))[: image.height, : image.width]
    pixels[full] = 0
    return PIL.Image.fromarray(pixels)
