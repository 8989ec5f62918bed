"""The zoom task: an answer in the pixels that only a zoom recovers, and the measurement that proves it.

A large image (896 px) with a tiny four-colour tile at the centre of each quarter; the question names a quarter and
asks for the colour of its tile's top-left cell. The four cells of a tile always hold the four colours once each, so
once the processor has shrunk the image to its budget every tile is the same grey blob whatever the answer.
`measure_detail_visibility` checks that on the processor's own output, against the crop `ZoomEnvironment` returns.
Rows come out in the loaders' format (`prompt`, `images`, `solution`; `cppo_trl.data.loaders.convert_rows`), like
`cppo_trl.data.synthetic`.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw

from cppo_trl.core.images import to_rgb
from cppo_trl.data.loaders import DEFAULT_PROMPT_SUFFIX, convert_rows
from cppo_trl.data.synthetic import SYNTHETIC_COLORS
from cppo_trl.data.zoom_tool import ZoomEnvironment


ZOOM_TASK = "zoom"
ZOOM_REGIONS = ("top-left", "top-right", "bottom-left", "bottom-right")
ZOOM_COLORS = SYNTHETIC_COLORS  # red, green, blue, yellow
# Sizes chosen with `measure_detail_visibility` at the miniature's 128 x 128 px budget: in the whole image a 2-px cell
# is a fraction of a processed pixel (the answer moves a pixel by at most 7.4 of 255; a decoder is at chance); in the
# crop of the 8-px `zoom_box` each cell is ~32 px (254.7; decoder 100%). 4-px cells in a 448-px image still show (187).
ZOOM_IMAGE_SIZE = 896
ZOOM_TILE_SIZE = 4  # a 2x2 tile of 2-px cells
ZOOM_JITTER = 0  # the tile's corner moves up to this many pixels off its place at the quarter's centre
ZOOM_BOX_SIDE = 8  # the box `zoom_box` names (and the miniature's SFT teaches): the quarter's centre, tile inside
_QUESTION = (
    "What color is the top-left cell of the tiny four-color tile at the center of the {region} quarter? "
    "Answer red, green, blue or yellow."
)


def region_center(region: str, image_size: int = ZOOM_IMAGE_SIZE) -> tuple[int, int]:
    """Pixel centre of one quarter of a square image."""
    index = ZOOM_REGIONS.index(region)
    return (index % 2 * 2 + 1) * image_size // 4, (index // 2 * 2 + 1) * image_size // 4


def zoom_box(region: str, image_size: int = ZOOM_IMAGE_SIZE, side: int = ZOOM_BOX_SIDE) -> list[int]:
    """The `side`-pixel box centred on a quarter's centre: it holds that quarter's tile whatever its jitter."""
    cx, cy = region_center(region, image_size)
    return [cx - side // 2, cy - side // 2, cx + side // 2, cy + side // 2]


def _draw_layout(layout: dict[str, Any]) -> PILImage.Image:
    size, shade = layout["image_size"], layout["shade"]
    image = PILImage.new("RGB", (size, size), (shade, shade, shade))
    draw = ImageDraw.Draw(image)
    cell = layout["tile_size"] // 2
    for (x, y), colors in zip(layout["tile_corners"], layout["tile_colors"], strict=True):
        for position, color in enumerate(colors):  # top-left, top-right, bottom-left, bottom-right
            left, top = x + position % 2 * cell, y + position // 2 * cell
            draw.rectangle((left, top, left + cell - 1, top + cell - 1), fill=ZOOM_COLORS[color])
    return image


def _draw_row_layout(rng: random.Random, image_size: int, tile_size: int, jitter: int) -> dict[str, Any]:
    corners, colors = [], []
    for region in ZOOM_REGIONS:
        cx, cy = region_center(region, image_size)
        corners.append(
            (cx - tile_size // 2 + rng.randint(-jitter, jitter), cy - tile_size // 2 + rng.randint(-jitter, jitter))
        )
        colors.append(tuple(rng.sample(list(ZOOM_COLORS), len(ZOOM_COLORS))))
    return {
        "image_size": image_size,
        "tile_size": tile_size,
        "shade": rng.randint(200, 240),
        "tile_corners": corners,
        "tile_colors": colors,
        "region": rng.choice(ZOOM_REGIONS),
    }


def _answer_cell(layout: dict[str, Any]) -> list[int]:
    """[x1, y1, x2, y2) of the asked tile's top-left cell."""
    x, y = layout["tile_corners"][ZOOM_REGIONS.index(layout["region"])]
    cell = layout["tile_size"] // 2
    return [x, y, x + cell, y + cell]


def _zoom_row(rng: random.Random, image_size: int, tile_size: int, jitter: int) -> dict[str, Any]:
    layout = _draw_row_layout(rng, image_size, tile_size, jitter)
    region = layout["region"]
    return {
        "question": _QUESTION.format(region=region),
        "answer": layout["tile_colors"][ZOOM_REGIONS.index(region)][0],
        "image": _draw_layout(layout),
        "task": ZOOM_TASK,
        "region": region,
        "zoom_box": zoom_box(region, image_size),
        "answer_cell": _answer_cell(layout),
    }


def _zoom_rows(
    num_samples: int, rng: random.Random, image_size: int, tile_size: int, jitter: int
) -> list[dict[str, Any]]:
    if image_size < 16 * ZOOM_BOX_SIDE or tile_size < 2 or tile_size % 2 or jitter < 0:
        raise ValueError(
            f"need image_size >= {16 * ZOOM_BOX_SIDE}, an even tile_size >= 2 and jitter >= 0; got {image_size}, "
            f"{tile_size}, {jitter}"
        )
    if tile_size // 2 + jitter > ZOOM_BOX_SIDE // 2:
        raise ValueError(f"tile_size {tile_size} with jitter {jitter} would leave the {ZOOM_BOX_SIDE}-px zoom box")
    return [_zoom_row(rng, image_size, tile_size, jitter) for _ in range(num_samples)]


_KEEP_COLUMNS = ("question", "task", "region", "zoom_box", "answer_cell")


def make_zoom_dataset(
    num_samples: int,
    seed: int = 0,
    image_size: int = ZOOM_IMAGE_SIZE,
    prompt_suffix: str | None = DEFAULT_PROMPT_SUFFIX,
    system_prompt: str | None = None,
    tile_size: int = ZOOM_TILE_SIZE,
    jitter: int = ZOOM_JITTER,
) -> datasets.Dataset:
    """The zoom task, deterministic for a seed: `prompt`/`images`/`solution` plus `question` (without the suffix),
    `task`, `region` (the quarter the question names), `zoom_box` (a box that shows its tile, in pixels) and
    `answer_cell` (the answer's pixels, [x1, y1, x2, y2))."""
    rows = _zoom_rows(num_samples, random.Random(seed), image_size, tile_size, jitter)
    return convert_rows(
        rows,
        keep_columns=_KEEP_COLUMNS,
        prompt_suffix=prompt_suffix,
        system_prompt=system_prompt,
        num_workers=1,
    )


def make_zoom_splits(
    num_train: int,
    num_test: int,
    seed: int = 0,
    image_size: int = ZOOM_IMAGE_SIZE,
    prompt_suffix: str | None = DEFAULT_PROMPT_SUFFIX,
    system_prompt: str | None = None,
) -> datasets.DatasetDict:
    """Train and test splits drawn from one random stream (`train` equals `make_zoom_dataset(num_train, seed)`)."""
    rng = random.Random(seed)
    splits = {}
    for name, count in (("train", num_train), ("test", num_test)):
        rows = _zoom_rows(count, rng, image_size, ZOOM_TILE_SIZE, ZOOM_JITTER)
        splits[name] = convert_rows(
            rows,
            keep_columns=_KEEP_COLUMNS,
            prompt_suffix=prompt_suffix,
            system_prompt=system_prompt,
            num_workers=1,
        )
    return datasets.DatasetDict(splits)


def write_zoom_file(dataset: datasets.Dataset, path: str | Path) -> Path:
    """Write a zoom split as a parquet file that the training script's local-file loader reads back
    (`dataset_name: <path>`): the bare `question`, the `answer` and the image as PNG bytes. With the same
    `prompt_suffix` the loader rebuilds exactly the prompts of `dataset`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for row in dataset:
        buffer = io.BytesIO()
        row["images"][0].save(buffer, format="PNG")
        rows.append({"question": row["question"], "answer": row["solution"], "image": buffer.getvalue()})
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# ------------------------------------------------------------------------------- is the detail really too small?
def processed_pixels(image: PILImage.Image, processor) -> np.ndarray:
    """The image exactly as a Qwen-style processor hands it to the model, back in 0-255 RGB (height, width, 3):
    the processor's own resize and normalisation, its patches put back in place."""
    image_processor = getattr(processor, "image_processor", processor)
    out = image_processor(images=[to_rgb(image)], return_tensors="np")
    values = np.asarray(out["pixel_values"], dtype=np.float64)
    grid_t, grid_h, grid_w = (int(v) for v in np.asarray(out["image_grid_thw"])[0])
    merge, patch = image_processor.merge_size, image_processor.patch_size
    temporal = image_processor.temporal_patch_size
    # Qwen2-VL flattens (t, T, C, h/m, m, P, w/m, m, P) as (t, h/m, w/m, m, m, C, T, P, P): undo that transpose.
    values = values.reshape(grid_t, grid_h // merge, grid_w // merge, merge, merge, 3, temporal, patch, patch)
    values = values.transpose(0, 6, 5, 1, 3, 7, 2, 4, 8).reshape(grid_t * temporal, 3, grid_h * patch, grid_w * patch)
    mean = np.asarray(image_processor.image_mean).reshape(3, 1, 1)
    std = np.asarray(image_processor.image_std).reshape(3, 1, 1)
    return ((values[0] * std + mean) * 255.0).transpose(1, 2, 0)


def _cell_colour(pixels: np.ndarray, cell: Sequence[float], box: Sequence[float]) -> str:
    """Nearest palette colour of the mean of `pixels` over `cell`, both given in the coordinates of `box`, the
    region `pixels` shows (at least one pixel is read)."""
    height, width = pixels.shape[:2]
    sx, sy = width / (box[2] - box[0]), height / (box[3] - box[1])
    x1, x2 = (cell[0] - box[0]) * sx, (cell[2] - box[0]) * sx
    y1, y2 = (cell[1] - box[1]) * sy, (cell[3] - box[1]) * sy
    left, top = min(int(math.floor(x1)), width - 1), min(int(math.floor(y1)), height - 1)
    right, bottom = max(int(math.ceil(x2)), left + 1), max(int(math.ceil(y2)), top + 1)
    mean = pixels[top:bottom, left:right].reshape(-1, 3).mean(axis=0)
    return min(ZOOM_COLORS, key=lambda name: float(np.sum((np.asarray(ZOOM_COLORS[name]) - mean) ** 2)))


def measure_detail_visibility(processor, num_samples: int = 16, seed: int = 0) -> dict[str, float]:
    """How much of the answer survives the processor's resize, in the whole image and in the zoomed crop.

    Each sample is drawn like a task row, then rendered four times with the asked tile's colours rotated, so that the
    answer takes every value while everything else (other cells excepted) stays put. Both views, the whole image and
    `ZoomEnvironment.zoom_in(zoom_box)`'s crop, go through the processor (`processed_pixels`). Reported:

    - `*_answer_contrast`: per sample, the largest difference (0-255) any processed pixel shows between the four
      renderings, averaged over samples: how far the answer moves the pixels the model receives;
    - `*_decoder_accuracy`: a decoder that knows exactly where the cell is reads the mean colour there and takes the
      nearest palette colour (chance: 0.25);
    - the processed sizes of both views.
    """
    rng = random.Random(seed)
    environment = ZoomEnvironment()
    contrast = {"full": [], "zoom": []}
    correct = {"full": 0, "zoom": 0}
    sizes = {}
    for _ in range(num_samples):
        layout = _draw_row_layout(rng, ZOOM_IMAGE_SIZE, ZOOM_TILE_SIZE, ZOOM_JITTER)
        index = ZOOM_REGIONS.index(layout["region"])
        box, cell = zoom_box(layout["region"]), _answer_cell(layout)
        renders = {"full": [], "zoom": []}
        for shift in range(len(ZOOM_COLORS)):
            colours = list(layout["tile_colors"])
            colours[index] = colours[index][shift:] + colours[index][:shift]
            image = _draw_layout({**layout, "tile_colors": colours})
            environment.reset(images=[image])
            crop = environment.zoom_in(box)[0]["image"]
            for view, picture, region in (("full", image, (0, 0, *image.size)), ("zoom", crop, box)):
                pixels = processed_pixels(picture, processor)
                sizes[view] = pixels.shape[1::-1]
                renders[view].append(pixels)
                correct[view] += _cell_colour(pixels, cell, region) == colours[index][0]
        for view, stack in renders.items():
            stack = np.stack(stack)
            contrast[view].append(float((stack.max(axis=0) - stack.min(axis=0)).max()))
    total = num_samples * len(ZOOM_COLORS)
    return {
        "full_answer_contrast": float(np.mean(contrast["full"])),
        "zoom_answer_contrast": float(np.mean(contrast["zoom"])),
        "full_decoder_accuracy": correct["full"] / total,
        "zoom_decoder_accuracy": correct["zoom"] / total,
        "full_processed_size": list(sizes["full"]),
        "zoom_processed_size": list(sizes["zoom"]),
        "num_samples": num_samples,
    }
