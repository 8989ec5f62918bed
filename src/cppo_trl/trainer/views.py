"""Per-rollout image views that ride through TRL's generation batch: built, processed, checked and stacked.

A perception method (CPPO's preserving/removing views, PAPO's masked image) re-scores each rollout with the images its
policy saw replaced by views. "The images its policy saw" is every image TRL rendered for that rollout, in TRL's order:
the prompt's (the dataset's, then an environment's first observation) and, in a multi-turn rollout, those returned by
tools (`RolloutImages`). This module does what every such method needs, whatever the views are:

- process a view through the same processor path TRL used for the original (the full processor with the same prompt
  text; or, when tools returned images, TRL's image-processor-only path) and check that it keeps the original's
  prompt tokens and vision-token layout (`image_grid_thw`, `image_sizes`): a view that changed the layout would
  silently misalign every completion token, so it is an error naming the rollout;
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
from trl.data_utils import apply_chat_template

from cppo_trl.core.images import to_rgb
from cppo_trl.core.perturbations import sample_key
from cppo_trl.trainer.perception_grpo_config import VIEW_IMAGE_SCOPES


# Vision tensors TRL keeps from the processor and passes to `_get_per_token_logps_and_entropies` (TRL 1.16,
# `_generate_and_score_completions` output). Text-side tensors (`token_type_ids`, `mm_token_type_ids`) are shared by
# all views because the prompt tokens are checked to be identical.
VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "image_position_ids")
TEXT_SIDE_KEYS = ("token_type_ids", "mm_token_type_ids")
# Per-image layout tensors of the original batch that a view must reproduce exactly.
LAYOUT_KEYS = ("image_grid_thw", "image_sizes")
# Where an image the policy saw came from, and which of them a view replaces (`view_images` of the config).
DATASET, OBSERVATION, TOOL = "dataset", "observation", "tool"


@dataclass(frozen=True)
class RolloutImages:
    """Every image one rollout's policy saw, in the order TRL hands them to the processor, with where each came from,
    and the prompt as TRL rendered it (an environment's first observation included) with the tools it was rendered
    with."""

    images: tuple[PIL.Image.Image, ...]
    sources: tuple[str, ...]  # DATASET, OBSERVATION or TOOL, one per image
    prompt: list[dict[str, Any]]
    tools: list | None = None

    def perturbed(self, scope: str) -> tuple[bool, ...]:
        """Which images a view replaces: all of them, or only the prompt's (tool answers stay as the tool gave them)."""
        if scope not in VIEW_IMAGE_SCOPES:
            raise ValueError(f"view_images must be one of {VIEW_IMAGE_SCOPES}, got {scope!r}")
        return tuple(scope == "all" or source != TOOL for source in self.sources)

    @property
    def prompt_images(self) -> tuple[PIL.Image.Image, ...]:
        return tuple(image for image, source in zip(self.images, self.sources, strict=True) if source != TOOL)

    def image_key(self, index: int) -> int:
        """What seeds image `index`'s view besides the prompt: its position for the prompt's images (the same in every
        rollout of the prompt, so they share the view), its content for a tool's answer (which differs by rollout)."""
        if self.sources[index] != TOOL:
            return index
        return int.from_bytes(sample_key("", [self.images[index]])[:8], "big") >> 1


@dataclass(frozen=True)
class ViewImages:
    """The view images of one rollout, per view name (each list parallel to `RolloutImages.images`, unperturbed images
    left as they are), and per perturbed image the names of the transforms that drew it (for inspection and tests)."""

    images: dict[str, list[PIL.Image.Image]]
    transforms: list[tuple[str, ...]]


@dataclass(frozen=True)
class SampleViews:
    """What one rollout carries: per view name, the processed vision tensors of its view."""

    tensors: dict[str, dict[str, torch.Tensor]]
    transforms: list[tuple[str, ...]]


# Draws the views of one rollout; its second argument is the rollout's prompt key, which seeds them.
MakeViewImages = Callable[[RolloutImages, bytes], ViewImages]


def row_images(row: dict[str, Any]) -> list | None:
    """The row's images in the dataset's `images` (list) or `image` (single) column, or None."""
    if row.get("images") is not None:
        return list(row["images"])
    if row.get("image") is not None:
        return [row["image"]]
    return None


def with_rgb_images(row: dict[str, Any]) -> dict[str, Any]:
    """The row with its dataset images in 8-bit RGB (`to_rgb`); the processor does the resizing, as for GRPO."""
    if row.get("images") is not None:
        return {**row, "images": [to_rgb(image) for image in row["images"]]}
    if row.get("image") is not None:
        return {**row, "image": to_rgb(row["image"])}
    return row


def image_parts(prompt: list[dict[str, Any]]) -> list[Any]:
    """The images of a conversational prompt's `{"type": "image"}` parts, in order (TRL 1.16 `_tokenize_prompts`)."""
    return [
        part["image"]
        for message in prompt
        if isinstance(message.get("content"), list)
        for part in message["content"]
        if part.get("type") == "image"
    ]


def rollout_images(
    prompts: Sequence[list[dict[str, Any]]],
    images: Sequence[Sequence[PIL.Image.Image] | None] | None,
    tool_images: Sequence[Sequence[PIL.Image.Image]] | None,
    dataset_images: Sequence[Sequence[PIL.Image.Image] | None],
    tools: Sequence[list | None],
) -> list[RolloutImages]:
    """What each rollout saw, from TRL's own `_generate` inputs and outputs.

    `prompts` are the conversations TRL generated from (its image parts hold the dataset's image objects and any
    environment observation), `images` the image lists `_generate` returned for the forward pass (the prompt's, then
    the tools'), `dataset_images` the rows' own images: an image part that is one of them is the dataset's, any other
    an observation.
    """
    rollouts = []
    for i, prompt in enumerate(prompts):
        parts = image_parts(prompt)
        from_tools = list(tool_images[i]) if tool_images else []
        # No images back from `_generate` (a custom `rollout_func`): TRL's forward pass uses the prompt's own.
        seen = list(images[i] or []) if images is not None else list(parts)
        if len(seen) != len(parts) + len(from_tools):
            raise RuntimeError(
                f"Rollout {i}: TRL returned {len(seen)} images for a prompt with {len(parts)} image parts and "
                f"{len(from_tools)} tool images; the views would not match the forward pass (TRL version changed?)."
            )
        own = [id(image) for image in dataset_images[i] or []]
        sources = [DATASET if id(part) in own else OBSERVATION for part in parts] + [TOOL] * len(from_tools)
        rollouts.append(RolloutImages(images=tuple(seen), sources=tuple(sources), prompt=prompt, tools=tools[i]))
    return rollouts


def prompt_text(prompt: list[dict[str, Any]], processing_class, tools=None, **chat_template_kwargs) -> str:
    """A prompt rendered by the chat template exactly as TRL 1.16 renders it for the forward pass."""
    return apply_chat_template({"prompt": prompt}, processing_class, tools=tools or None, **chat_template_kwargs)[
        "prompt"
    ]


def _check_sizes(name: str, view_images, images, index: int) -> None:
    """Same token count can still hide another layout (Qwen: a 224x56 view has the 112x112 image's 16 tokens but
    another `image_grid_thw`), so every view must first keep its image's size (paper §4.1)."""
    for n, (view, image) in enumerate(zip(view_images, images, strict=True)):
        if view.size != image.size:
            raise ValueError(
                f"Rollout {index}, image {n}: the {name} view is {view.size[0]}x{view.size[1]} but the image is "
                f"{image.size[0]}x{image.size[1]}; views must keep the original size so that the vision-token layout "
                f"does not change."
            )


def _check_layout(name: str, encoded, expected_layout: dict[str, torch.Tensor], index: int) -> None:
    for key, original in expected_layout.items():
        if key in encoded and not torch.equal(encoded[key].cpu(), original):
            raise ValueError(f"Rollout {index}: the {name} view's `{key}` differs from the original images'.")


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
    """Vision tensors of one view through the full processor with the rollout's prompt text (TRL's path without tool
    images), after checking it keeps the original's prompt tokens and layout."""
    _check_sizes(name, view_images, images, index)
    encoded = processing_class(images=[list(view_images)], text=[text], return_tensors="pt")
    ids = encoded["input_ids"][0]
    if ids.shape != expected_ids.shape or not torch.equal(ids, expected_ids):
        raise ValueError(
            f"Rollout {index}: the processor gives {ids.numel()} prompt tokens for the {name} view but "
            f"{expected_ids.numel()} for the original images. Views need the same vision-token layout; this "
            f"processor ({type(processing_class).__name__}) changes it under a view."
        )
    _check_layout(name, encoded, expected_layout, index)
    return {k: encoded[k] for k in VISION_KEYS if k in encoded}


def process_image_view(
    image_processor,
    name: str,
    view_images: Sequence[PIL.Image.Image],
    images: Sequence[PIL.Image.Image],
    expected_layout: dict[str, torch.Tensor],
    index: int,
) -> dict[str, torch.Tensor]:
    """Vision tensors of one view through the image processor alone: TRL 1.16's path when tools returned images (the
    tokens are the rollout's own ids, so only the layout can differ)."""
    _check_sizes(name, view_images, images, index)
    encoded = image_processor(images=list(view_images), return_tensors="pt")
    _check_layout(name, encoded, expected_layout, index)
    return {k: encoded[k] for k in VISION_KEYS if k in encoded}


def build_sample_views(
    rollouts: Sequence[RolloutImages],
    output: dict[str, Any],
    keep: Sequence[bool],
    make_view_images: MakeViewImages,
    processing_class,
    image_processor_only: bool,
    scope: str,
    **chat_template_kwargs,
) -> list[SampleViews | None]:
    """Per rollout: the processed views of the images it saw, or None when `keep` is False or `scope` (the config's
    `view_images`) selects none of its images.

    `image_processor_only` says which processor path TRL took for this batch (see `process_view` and
    `process_image_view`). Views are seeded by the rollout's prompt key (its rendered text and prompt images), so the
    rollouts of one prompt share the views of its images; rollouts that saw the same images share one processed entry.
    """
    prompt_ids = output["prompt_ids"].cpu()
    prompt_mask = output["prompt_mask"].bool().cpu()
    counts = output.get("num_images")  # None for a batch without any image
    layout = {k: torch.split(output[k].cpu(), counts) for k in LAYOUT_KEYS if k in output and counts is not None}
    by_key: dict[bytes, SampleViews] = {}
    views: list[SampleViews | None] = []
    for i, rollout in enumerate(rollouts):
        if not keep[i] or not any(rollout.perturbed(scope)):
            views.append(None)
            continue
        text = prompt_text(rollout.prompt, processing_class, tools=rollout.tools, **chat_template_kwargs)
        key = sample_key(text, rollout.images)
        if key not in by_key:
            drawn = make_view_images(rollout, sample_key(text, rollout.prompt_images))
            expected_layout = {k: per_row[i] for k, per_row in layout.items()}
            tensors = {}
            for name, view_images in drawn.images.items():
                if image_processor_only:
                    tensors[name] = process_image_view(
                        processing_class.image_processor, name, view_images, rollout.images, expected_layout, i
                    )
                else:
                    expected_ids = prompt_ids[i][prompt_mask[i]]
                    tensors[name] = process_view(
                        processing_class, text, name, view_images, rollout.images, expected_ids, expected_layout, i
                    )
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
