"""Every rank runs the same forward passes: the pass counts ranks agree on, the one-row dummy that fills the passes a
rank has no rows for, and the zero-weighted term that keeps every pass that ran in the backward graph.

Why: every forward through a wrapped model is a collective. DDP broadcasts buffers at each forward (`broadcast_buffers`,
on by default); DeepSpeed ZeRO-3 gathers each module's parameters in forward and again in backward and checks step ids
across ranks; FSDP does the same by construction. A perception method runs extra passes on only some rows (CPPO's gated
rows, PAPO's rows with images), so ranks holding different rows would run different numbers of forwards: they wait for
each other forever, or worse, pair one rank's pass with another's next one when the byte sizes happen to match and
exchange wrong data before they hang. So the ranks agree on how many passes each pass site runs (the maximum), a rank
with fewer rows runs the rest on a dummy row, and every pass that ran enters the loss, multiplied by zero when it is not
used, so that backward gathers as often on every rank. With one process nothing of this runs.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import PIL.Image
import torch
from trl.data_utils import prepare_multimodal_messages

from cppo_trl.core.images import PixelBudget
from cppo_trl.trainer.views import TEXT_SIDE_KEYS, VISION_KEYS, prompt_text


PASS_PLAN_KEY = "perception_view_passes"
"""Key of a micro-batch's agreed number of view passes per view (an int), set by the rails once the generation batch
is split (`PerceptionGRPOTrainer._prepare_inputs`); absent with one process."""


def agree_on_counts(counts: Sequence[int], accelerator) -> list[int]:
    """Per entry, the largest of `counts` over all ranks, in ONE collective (an all-gather of a small int tensor).

    Every rank must pass the same number of entries (one per micro-batch of the generation batch, say)."""
    local = torch.tensor(list(counts), dtype=torch.long, device=accelerator.device)
    gathered = accelerator.gather(local.unsqueeze(0))  # (processes, entries)
    return gathered.view(accelerator.num_processes, len(counts)).max(dim=0).values.tolist()


def zero_weighted(tensors: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """0 × the sum of the finite entries of `tensors`: adds exactly nothing to the loss or to any gradient, but keeps
    the passes that produced them in the backward graph. Non-finite entries are left out (`torch.where`), so a NaN
    of a dropped pass never reaches a gradient through this term. None when there is nothing to keep."""
    parts = [torch.where(torch.isfinite(t), t, torch.zeros_like(t)).sum() for t in tensors if t is not None]
    return None if not parts else torch.stack(parts).sum() * 0.0


def dummy_row(processing_class, budget: PixelBudget | None, eos_token_id: int) -> dict[str, Any]:
    """Forward inputs of one row holding one minimal plain image (the smallest the processor's grid allows; not black,
    which Idefics3 takes for padding and drops) and a one-token completion, built with the trainer's own processor and
    chat template, on CPU.

    Keys: `input_ids`, `attention_mask` (1, L), `completion_length` (1), the processor's vision tensors, the text-side
    tensors extended over the completion, and `num_images` ([1])."""
    side = budget.factor if budget is not None else 28
    image = PIL.Image.new("RGB", (side, side), (200, 120, 40))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "."}]}]
    text = prompt_text(prepare_multimodal_messages(messages, images=[image]), processing_class)
    encoded = processing_class(images=[[image]], text=[text], return_tensors="pt")
    eos = torch.tensor([[eos_token_id]], dtype=encoded["input_ids"].dtype)
    row = {
        "input_ids": torch.cat([encoded["input_ids"], eos], dim=1),
        "attention_mask": torch.cat([encoded["attention_mask"], torch.ones_like(eos)], dim=1),
        "completion_length": 1,
        "num_images": [1],
    }
    row.update({k: encoded[k] for k in VISION_KEYS if k in encoded})
    for key in TEXT_SIDE_KEYS:
        if key in encoded:
            row[key] = torch.cat([encoded[key], torch.zeros_like(encoded[key][:, :1])], dim=1)
    return row


# The fields of `get_image_features`' output an image forward feeds the language model (transformers 5): the merged
# image embeddings, and Qwen3-VL's deepstack features. Only these: ZeRO-3 hooks every output a module returns, and a
# field the image forward leaves unused would add a backward hook (and a gather) that the image ranks never run.
_USED_IMAGE_FEATURES = ("pooler_output", "deepstack_features")


def _tensor_sum(value) -> torch.Tensor:
    """Sum of every tensor in `value` (a tensor, or nested lists/tuples of them), in float32."""
    if torch.is_tensor(value):
        return value.float().sum()
    return torch.stack([_tensor_sum(item) for item in value]).sum()


def _used_features_sum(output) -> torch.Tensor:
    """Sum of what an image forward takes from `get_image_features` (see `_USED_IMAGE_FEATURES`)."""
    if torch.is_tensor(output) or isinstance(output, list | tuple):  # an older, tensor-only return value
        return _tensor_sum(output)
    # Attributes, not keys: some releases set `pooler_output` on an output class that has no such field (Idefics3 on
    # transformers 5.17), where it is an attribute only.
    used = [getattr(output, name, None) for name in _USED_IMAGE_FEATURES]
    return torch.stack([_tensor_sum(value) for value in used if value is not None]).sum()


class DummyVisionPass:
    """Under sharded multi-process training (DeepSpeed ZeRO-2/3, FSDP), a forward without images must still run the
    vision tower, where an image forward runs it.

    ZeRO-3 (and FSDP) gather each module's parameters as it runs, so a rank whose micro-batch is text-only skips the
    vision tower's gathers while a rank with images posts them: gloo aborts ("Received data size doesn't match") or,
    when sizes happen to match, the ranks exchange wrong data. ZeRO-2 reduces gradients in buckets of the parameters
    that received one, so a text-only rank's buckets are smaller by the whole vision tower. Here a forward of the VLM
    without `pixel_values` runs the tower on the dummy row's minimal image right after the token embeddings (where
    `get_image_features` runs for an image batch, so the gathers come in the same order) and adds 0 x its output to the
    embeddings: the loss and every gradient are unchanged, and every rank touches the same parameters in the same
    order, in forward and backward. Active only inside the trainer's own forwards (`active()`), not in `generate`.

    The hooks are installed for each such forward and removed after it, so that they always run after the engine's own
    hooks, however often the engine (re)installs them: ZeRO-3's hook on the embeddings must attach its backward gather
    to the embeddings themselves, as in an image forward, not to their sum with the dummy's output (which gathers in
    another order in backward; a permanently installed hook ends up before the engine's and breaks the second step)."""

    def __init__(self, vlm, dummy: dict[str, Any]):
        self._vlm = vlm
        accepted = inspect.signature(vlm.get_image_features).parameters
        self._inputs = {k: dummy[k] for k in VISION_KEYS if k in dummy and (k == "pixel_values" or k in accepted)}
        self.calls = 0  # forwards that ran the dummy (tests, metrics)
        self._pending = False

    @contextmanager
    def active(self) -> Iterator[None]:
        handles = [
            self._vlm.register_forward_pre_hook(self._before, with_kwargs=True),
            self._vlm.get_input_embeddings().register_forward_hook(self._after_embeddings),
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._pending = False

    def _before(self, module, args, kwargs):
        self._pending = kwargs.get("pixel_values") is None

    def _after_embeddings(self, module, args, output):
        if not self._pending:
            return None
        self._pending = False
        self.calls += 1
        inputs = {k: v.to(output.device) for k, v in self._inputs.items()}
        features = self._vlm.get_image_features(**inputs, return_dict=True)
        return output + 0.0 * _used_features_sum(features).to(output.dtype)
