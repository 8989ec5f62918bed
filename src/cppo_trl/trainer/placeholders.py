"""Image placeholder tokens in completions: the model's own, which must go, and a tool's, which must stay.

A VLM replaces each run of image placeholder tokens with one image's features, so every placeholder in a sequence must
belong to an image of the batch. A placeholder the policy *sampled* (vLLM, a custom `rollout_func`, or
`generation_kwargs` overriding TRL's `suppress_tokens` can produce one) belongs to none: every later forward would fail
on it. The placeholders TRL inserts for an image a tool returned (`tool_mask` = 0 there) are the image's own and must
stay, with their turn and their pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def placeholder_token_ids(config) -> frozenset[int]:
    """Token ids the model replaces with image features (`image_token_id` / `image_token_index`).

    Only image placeholders: a sampled video placeholder with no video in the batch is read as an ordinary token (TRL
    1.16 trains on it), so cutting there would make the rails differ from GRPO for nothing. TRL's own `generate` path
    suppresses the image token, so the cut only ever acts where GRPO itself would fail.
    """
    names = ("image_token_id", "image_token_index")
    return frozenset(getattr(config, n) for n in names if isinstance(getattr(config, n, None), int))


def placeholder_runs(ids: Sequence[int], placeholder_ids: frozenset[int]) -> int:
    """How many runs of consecutive placeholder tokens `ids` holds: one per image."""
    runs, inside = 0, False
    for token in ids:
        if token in placeholder_ids and not inside:
            runs += 1
        inside = token in placeholder_ids
    return runs


def first_sampled_placeholder(
    ids: Sequence[int], tool_mask: Sequence[int] | None, placeholder_ids: frozenset[int]
) -> int | None:
    """Position of the first placeholder the policy sampled itself (`tool_mask` 1, or no tool mask), or None."""
    return next(
        (t for t, token in enumerate(ids) if token in placeholder_ids and (tool_mask is None or tool_mask[t] == 1)),
        None,
    )


@dataclass(frozen=True)
class Cut:
    """A completion cut just before the first placeholder the policy sampled."""

    completion_ids: list[int]
    logprobs: list[float | None] | None
    tool_mask: list[int] | None
    tool_images_kept: int  # a tool image survives only if all its placeholders lie before the cut


def cut_sampled_placeholder(
    ids: Sequence[int],
    logprobs: Sequence[float | None] | None,
    tool_mask: Sequence[int] | None,
    placeholder_ids: frozenset[int],
    eos_token_id: int,
) -> Cut | None:
    """The completion cut before its first sampled placeholder, or None when it has none.

    A completion that would become empty keeps one EOS token (its sampling log-prob is unknown: None, which TRL turns
    into a NaN it neutralises). Tool images whose placeholders come before the cut are kept, later ones are dropped.
    """
    cut = first_sampled_placeholder(ids, tool_mask, placeholder_ids)
    if cut is None:
        return None
    if cut == 0:
        return Cut([eos_token_id], None if logprobs is None else [None], None if tool_mask is None else [1], 0)
    return Cut(
        completion_ids=list(ids[:cut]),
        logprobs=None if logprobs is None else list(logprobs[:cut]),
        tool_mask=None if tool_mask is None else list(tool_mask[:cut]),
        tool_images_kept=placeholder_runs(ids[:cut], placeholder_ids),
    )
