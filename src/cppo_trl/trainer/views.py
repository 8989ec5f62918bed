"""Per-sample image views that ride through TRL's generation batch: built, processed, checked and stacked.

A perception method (CPPO's preserving/removing views, PAPO's masked image) re-scores each rollout with its prompt
image replaced by a view. This module does what every such method needs, whatever the views are:

- process a view with the *same prompt text* as the original and check that the processor gives the same prompt
  tokens and the same vision-token layout (`image_grid_thw`, `image_sizes`); a view that changed the layout would
  silently misalign every completion token, so it is an error naming the sample;
- store the processed vision tensors per rollout in a list, which TRL's `shuffle_sequence_dict`/`split_tensor_dict`
  permute and split together with the other rows (a flat tensor over images would not be);
- stack the stored tensors of some rows back into the keyword arguments of a forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import PIL.Image
import torch
from trl.data_utils import apply_chat_template, prepare_multimodal_messages

from cppo_trl.core.images import PixelBudget, prepare_image


# Vision tensors TRL keeps from the processor and passes to `_get_per_token_logps_and_entropies` (TRL 1.16,
# `_generate_and_score_completions` output). Text-side tensors (`token_type_ids`, `mm_token_type_ids`) are shared by
# all views because the prompt tokens are checked to be identical.
VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "image_position_ids")
TEXT_SIDE_KEYS = ("token_type_ids", "mm_token_type_ids")
# Per-image layout tensors of the original batch that a view must reproduce exactly.
LAYOUT_KEYS = ("image_grid_thw", "image_sizes")

MakeViewImages = Callable[[Sequence[PIL.Image.Image], Sequence[PIL.Image.Image], bytes], "ViewImages"]


@dataclass(frozen=True)
class ViewImages:
    """The view images of one prompt, per view name (each list parallel to the prompt's images), and per image the
    names of the transforms that drew them (for inspection and tests)."""

    images: dict[str, list[PIL.Image.Image]]
    transforms: list[tuple[str, ...]]


@dataclass(frozen=True)
class SampleViews:
    """What one rollout carries: per view name, the processed vision tensors of its prompt's view."""

    tensors: dict[str, dict[str, torch.Tensor]]
    transforms: list[tuple[str, ...]]


def row_images(row: dict[str, Any]) -> list | None:
    """The row's images in the dataset's `images` (list) or `image` (single) column, or None."""
    if row.get("images") is not None:
        return list(row["images"])
    if row.get("image") is not None:
        return [row["image"]]
    return None


def with_prepared_images(row: dict[str, Any], budget: PixelBudget | None) -> dict[str, Any]:
    """The row with its images in 8-bit RGB at the pixel budget, so TRL's processor, vLLM and the views all see the
    same pixels and the same vision-token grid."""
    if row.get("images") is not None:
        return {**row, "images": [prepare_image(image, budget) for image in row["images"]]}
    if row.get("image") is not None:
        return {**row, "image": prepare_image(row["image"], budget)}
    return row


def prompt_text(row: dict[str, Any], processing_class, tools=None, **chat_template_kwargs) -> str:
    """The row's prompt rendered by the chat template exactly as TRL renders it for the original image."""
    prompt = prepare_multimodal_messages(row["prompt"], images=row_images(row))
    return apply_chat_template({"prompt": prompt}, processing_class, tools=tools or None, **chat_template_kwargs)[
        "prompt"
    ]


def process_view(
    processing_class,
    text: str,
    name: str,
    view_images: Sequence[PIL.Image.Image],
    images: Sequence[PIL.Image.Image],
    expected_ids: torch.Tensor,
    expected_layout: dict[str, torch.Tensor],
    index: int,
) -> dict[str, torch.Tensor]:
    """Vision tensors of one view of sample `index`, after checking it keeps the original's token layout.

    Same token count can still hide another layout (Qwen: a 224x56 view has the 112x112 image's 16 tokens but another
    `image_grid_thw`), so every view must first keep its image's size (paper §4.1).
    """
    for n, (view, image) in enumerate(zip(view_images, images, strict=True)):
        if view.size != image.size:
            raise ValueError(
                f"Sample {index}, image {n}: the {name} view is {view.size[0]}x{view.size[1]} but the image is "
                f"{image.size[0]}x{image.size[1]}; views must keep the original size so that the vision-token layout "
                f"does not change."
            )
    encoded = processing_class(images=[list(view_images)], text=[text], return_tensors="pt")
    ids = encoded["input_ids"][0]
    if ids.shape != expected_ids.shape or not torch.equal(ids, expected_ids):
        raise ValueError(
            f"Sample {index}: the processor gives {ids.numel()} prompt tokens for the {name} view but "
            f"{expected_ids.numel()} for the original image. Views need the same vision-token layout; this processor "
            f"({type(processing_class).__name__}) changes it under a view."
        )
    for key, original in expected_layout.items():
        if key in encoded and not torch.equal(encoded[key].cpu(), original):
            raise ValueError(f"Sample {index}: the {name} view's `{key}` differs from the original image's.")
    return {k: encoded[k] for k in VISION_KEYS if k in encoded}


def build_sample_views(
    inputs: list[dict[str, Any]],
    raw_inputs: list[dict[str, Any]],
    output: dict[str, Any],
    keep: Sequence[bool],
    make_view_images: MakeViewImages,
    processing_class,
    sample_key: Callable[[str, Sequence[PIL.Image.Image]], bytes],
    tools=None,
    **chat_template_kwargs,
) -> list[SampleViews | None]:
    """Per rollout: the processed views of its prompt, or None when `keep` is False or the prompt has no image.

    `inputs` are the rows TRL scored (images prepared), `raw_inputs` the same rows before preparation (PAPO masks the
    raw image). Rollouts of one prompt share one entry: views are drawn and processed once per distinct prompt
    (`sample_key` of its text and pixels) and must not depend on the rollout.
    """
    prompt_ids = output["prompt_ids"].cpu()
    prompt_mask = output["prompt_mask"].bool().cpu()
    layout = {k: torch.split(output[k].cpu(), output["num_images"]) for k in LAYOUT_KEYS if k in output}
    by_key: dict[bytes, SampleViews] = {}
    views: list[SampleViews | None] = []
    for i, (row, raw_row) in enumerate(zip(inputs, raw_inputs, strict=True)):
        images = row_images(row)
        if not keep[i] or not images:
            views.append(None)
            continue
        text = prompt_text(row, processing_class, tools=tools, **chat_template_kwargs)
        key = sample_key(text, images)
        if key not in by_key:
            drawn = make_view_images(row_images(raw_row), images, key)
            expected_layout = {k: per_row[i] for k, per_row in layout.items()}
            tensors = {
                name: process_view(
                    processing_class,
                    text,
                    name,
                    view_images,
                    images,
                    prompt_ids[i][prompt_mask[i]],
                    expected_layout,
                    i,
                )
                for name, view_images in drawn.images.items()
            }
            by_key[key] = SampleViews(tensors=tensors, transforms=drawn.transforms)
        views.append(by_key[key])
    return views


def stack_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-sample tensors on dim 0, zero-padding other dims when samples differ (e.g. Idefics3 pads
    `pixel_values` to the largest image count of the batch; zero rows are masked by `pixel_attention_mask`)."""
    if all(t.shape[1:] == tensors[0].shape[1:] for t in tensors):
        return torch.cat(tensors, dim=0)
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    padded = []
    for t in tensors:
        out = t.new_zeros((t.shape[0], *shape))
        out[(slice(None), *(slice(0, s) for s in t.shape[1:]))] = t
        padded.append(out)
    return torch.cat(padded, dim=0)


def view_forward_kwargs(
    views: Sequence[SampleViews], name: str, inputs: dict[str, Any], rows: torch.Tensor, device
) -> dict[str, Any]:
    """Keyword arguments of `_get_per_token_logps_and_entropies` for `rows` with view `name` in place of the images:
    the stacked vision tensors of the view, the rows' text-side tensors and their image counts."""
    per_sample = [views[i].tensors[name] for i in rows.tolist()]
    kwargs = {k: stack_padded([s[k] for s in per_sample]).to(device) for k in per_sample[0]}
    kwargs.update({k: inputs[k][rows] for k in TEXT_SIDE_KEYS if inputs.get(k) is not None})
    kwargs["num_images"] = [inputs["num_images"][i] for i in rows.tolist()]
    return kwargs
