"""Pure tensor maths of CPPO (perception-token detection, the Contrastive Perception Loss) and of PAPO (the implicit
perception loss and the entropy term), and the aggregation both share.

No trainer state and no model here, so every formula can be checked by hand and with ``gradcheck``.
Equation numbers refer to the CPPO paper; "released" refers to the authors' verl code (docs/method.md, paper or released code); PAPO's formulas are
read from its authors' released EasyR1 code (docs/papo.md).

Precision: every function upcasts bf16/fp16/fp32 inputs to float32 (and keeps float64 as float64, so
``gradcheck`` works); log-probabilities come from ``log_softmax`` so logits like ±1e4 stay finite.
"""

from __future__ import annotations

from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import Tensor


__all__ = [
    "CPL_AGGREGATIONS",
    "CPL_DIVERGENCES",
    "PERCEPTION_SCORES",
    "PERCEPTION_K_RULES",
    "POLICY_LOSS_TYPES",
    "aggregate_like_policy_loss",
    "contrastive_loss_from_divergences",
    "contrastive_perception_loss",
    "entropy_from_logits",
    "full_kl",
    "k3_divergence",
    "papo_token_terms",
    "perception_token_count",
    "select_perception_tokens",
]

# Single source of truth for the enum-like options; the config module imports these for its `choices`.
PERCEPTION_SCORES = ("raw", "normalized")  # paper: ΔH; released: relu(ΔH) / (H(I⁻) + 1e-6)
# How k = K·n⁺ is rounded down. paper: the exact floor of K, read as the decimal it was written as, times n⁺;
# released: the authors' `(counts.float() * top_percent).long()`, a float32 product then truncation.
PERCEPTION_K_RULES = ("exact", "float32")
CPL_DIVERGENCES = ("full", "k3")  # paper: full-vocabulary KL; released: k3 on the sampled token
CPL_AGGREGATIONS = ("all_tokens", "selected_tokens")  # paper: like the policy loss (Eq. 9); released: / selected
# TRL 1.16's loss types, each with its own policy-loss normaliser that `aggregate_like_policy_loss` mirrors.
POLICY_LOSS_TYPES = ("grpo", "sapo", "bnpo", "dr_grpo", "luspo", "dapo", "cispo", "vespo")

_K3_LOG_RATIO_CLAMP = 20.0  # verl low_var_kl clamps the log-ratio to ±20 ...
_K3_MAX = 10.0  # ... and the estimate to [-10, 10]
_NORMALIZED_SCORE_EPS = 1e-6  # released code's epsilon in relu(ΔH) / (H(I⁻) + eps)


def _compute_dtype(tensor: Tensor) -> torch.dtype:
    """float32 for half/bf16/fp32 (precision of entropies/KLs over a 150k vocabulary), float64 kept."""
    return torch.promote_types(tensor.dtype, torch.float32)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"shapes must match, got {shapes}.")


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dim, (..., V) -> (...) (Eq. 3).

    Uses log_softmax so extreme logits are exact; terms with probability 0 (underflow or -inf logits)
    contribute exactly 0 in the forward and backward pass instead of 0 * -inf = NaN.
    """
    logp = torch.log_softmax(logits.to(_compute_dtype(logits)), dim=-1)  # (..., V)
    p = logp.exp()  # (..., V)
    # The inner where keeps the -inf of a -inf logit out of both the product and its gradient.
    return -(p * torch.where(p > 0, logp, 0.0)).sum(dim=-1)  # (...)


def perception_token_count(n_positive: Tensor, top_fraction: float, rule: str = "exact") -> Tensor:
    """floor(K · n⁺) per row, as an integer tensor shaped like `n_positive` (the caller applies max(1, ·)).

    ``"exact"`` (paper): K is read as the shortest decimal that round-trips its float (0.35 stays 35/100, not
    0.34999999999999997...), and the floor is taken in integer arithmetic, so 0.35 · 180 = 63 (a float64 product
    gives 62). ``"float32"`` (released): the authors' ``(counts.float() * top_percent).long()``: n⁺ and K in
    float32, the product rounded to float32, then truncated; e.g. 0.84 · 75 gives 62 there and 63 exactly. For
    K = 0.5 (both presets) the two agree for every n⁺ < 2^24.
    """
    _check_choice("rule", rule, PERCEPTION_K_RULES)
    n_positive = n_positive.long()
    if rule == "float32":
        return (n_positive.to(torch.float32) * float(top_fraction)).long()
    # A denominator below 2^31 keeps n⁺ · numerator inside int64; exact for any K written with up to 9 decimals.
    fraction = Fraction(repr(float(top_fraction))).limit_denominator(2**31 - 1)
    return torch.div(n_positive * fraction.numerator, fraction.denominator, rounding_mode="floor")


def select_perception_tokens(
    anchor_entropy: Tensor,
    removed_entropy: Tensor,
    completion_mask: Tensor,
    top_fraction: float,
    score: str = "raw",
    k_rule: str = "exact",
) -> Tensor:
    """Boolean mask (..., T) of perception tokens: the top fraction of positive-ΔH tokens per row (Eqs. 4-6).

    ΔH = H(I⁻) - H(I). Candidates are completion positions (``completion_mask != 0``) with finite ΔH > 0
    (NaN ΔH is never a candidate). Per row, with n⁺ candidates, k = max(1, floor(top_fraction · n⁺)), 0 when
    n⁺ = 0, rounded as ``k_rule`` says (see `perception_token_count`).
    Kept: candidates whose score is >= the k-th largest candidate score, so ties at the threshold are all
    kept and a row may keep more than k tokens (released code's behaviour, used for both scores).
    ``score="raw"`` ranks by ΔH (paper); ``"normalized"`` by relu(ΔH) / (H(I⁻) + 1e-6) (released code).
    ``top_fraction=1.0`` keeps every positive-ΔH completion token, not every token.
    The mask carries no gradient (paper Eqs. 3-6): inputs are detached.
    """
    top_fraction = float(top_fraction)
    if not 0.0 < top_fraction <= 1.0:  # also rejects NaN
        raise ValueError(f"`top_fraction` must be in (0, 1], got {top_fraction}.")
    _check_choice("score", score, PERCEPTION_SCORES)
    _check_choice("k_rule", k_rule, PERCEPTION_K_RULES)
    _check_same_shape(anchor_entropy=anchor_entropy, removed_entropy=removed_entropy, completion_mask=completion_mask)
    if anchor_entropy.dim() == 0:
        raise ValueError("entropies must have a token dimension (..., T), got a scalar.")

    if anchor_entropy.shape[-1] == 0:
        return torch.zeros(anchor_entropy.shape, dtype=torch.bool, device=anchor_entropy.device)

    with torch.no_grad():
        dtype = torch.promote_types(_compute_dtype(anchor_entropy), _compute_dtype(removed_entropy))
        anchor = anchor_entropy.detach().to(dtype)  # (B, T)
        removed = removed_entropy.detach().to(dtype)  # (B, T)
        delta = removed - anchor  # (B, T)
        if score == "raw":
            scores = delta
        else:
            scores = torch.relu(delta) / (removed + _NORMALIZED_SCORE_EPS)
        # NaN compares False, so NaN ΔH / NaN scores are never candidates.
        candidate = (completion_mask != 0) & (delta > 0) & torch.isfinite(delta) & torch.isfinite(scores)  # (B, T)
        scores = scores.masked_fill(~candidate, float("-inf"))  # (B, T)

        n_pos = candidate.sum(dim=-1)  # (B,)
        k = perception_token_count(n_pos, top_fraction, k_rule).clamp_min(1)  # (B,)
        # Threshold = k-th largest score; non-candidates (-inf) sort last and k <= n⁺ keeps them out
        # (a row with n⁺ = 0 gets some threshold but has no candidate to keep).
        sorted_scores = scores.sort(dim=-1, descending=True).values  # (B, T)
        threshold = sorted_scores.gather(-1, (k - 1).unsqueeze(-1))  # (B, 1)
        return candidate & (scores >= threshold)  # (B, T)


def full_kl(anchor_logits: Tensor, view_logits: Tensor) -> Tensor:
    """KL(softmax(anchor) || softmax(view)) over the last dim, (..., V) -> (...): the paper's -s(a, p) (Eq. 7).

    Where the anchor probability is 0 the term is exactly 0 (forward and backward), so -inf or ±1e4 anchor
    logits cannot produce 0 * inf = NaN. A view that puts probability 0 where the anchor does not gives inf,
    which is the true value.
    """
    _check_same_shape(anchor_logits=anchor_logits, view_logits=view_logits)
    dtype = torch.promote_types(_compute_dtype(anchor_logits), _compute_dtype(view_logits))
    log_a = torch.log_softmax(anchor_logits.to(dtype), dim=-1)  # (..., V)
    log_v = torch.log_softmax(view_logits.to(dtype), dim=-1)  # (..., V)
    p_a = log_a.exp()  # (..., V)
    return (p_a * torch.where(p_a > 0, log_a - log_v, 0.0)).sum(dim=-1)  # (...)


def k3_divergence(anchor_logprobs: Tensor, view_logprobs: Tensor) -> Tensor:
    """Released code's per-token divergence on the sampled token (verl ``low_var_kl``, "k3"), (...) -> (...).

    r = log π_view(o_t) - log π_anchor(o_t) clamped to [-20, 20]; D = exp(r) - r - 1 clamped to [-10, 10]
    (D >= 0, so effectively <= 10). As in the released code the clamps are ``torch.clamp``: outside the ranges
    (|r| > 20, or D > 10, i.e. r > ~2.53 or r < ~-11) the gradient is exactly zero.
    """
    _check_same_shape(anchor_logprobs=anchor_logprobs, view_logprobs=view_logprobs)
    dtype = torch.promote_types(_compute_dtype(anchor_logprobs), _compute_dtype(view_logprobs))
    log_ratio = view_logprobs.to(dtype) - anchor_logprobs.to(dtype)  # (...)
    log_ratio = torch.clamp(log_ratio, min=-_K3_LOG_RATIO_CLAMP, max=_K3_LOG_RATIO_CLAMP)
    divergence = log_ratio.exp() - log_ratio - 1.0  # (...)
    return torch.clamp(divergence, min=-_K3_MAX, max=_K3_MAX)  # (...)


def contrastive_perception_loss(
    anchor: Tensor,
    preserved: Tensor,
    removed: Tensor,
    temperature: float,
    divergence: str = "full",
) -> Tensor:
    """Per-token CPL, softplus((D(a, p⁺) - D(a, p⁻)) / τ), shape (...) (Eq. 7).

    Identical to the InfoNCE -log(exp(s⁺/τ) / (exp(s⁺/τ) + exp(s⁻/τ))) with s = -D, in its stable form.
    ``divergence="full"``: inputs are logits (..., V) of the original image (anchor), the information-
    preserving view (p⁺) and the information-removing view (p⁻); D = KL over the full vocabulary (paper).
    ``divergence="k3"``: inputs are log-probs (...) of the sampled tokens; D = k3 estimate (released code).
    Gradients flow into all three inputs; detach a view before calling to stop them.
    """
    temperature = float(temperature)
    if not temperature > 0.0:  # also rejects NaN
        raise ValueError(f"`temperature` must be > 0, got {temperature}.")
    _check_choice("divergence", divergence, CPL_DIVERGENCES)
    _check_same_shape(anchor=anchor, preserved=preserved, removed=removed)
    if divergence == "full":
        if anchor.dim() == 0:
            raise ValueError("`divergence='full'` needs logits with a vocabulary dimension (..., V).")
        d_pos = full_kl(anchor, preserved)  # (...)
        d_neg = full_kl(anchor, removed)  # (...)
    else:
        d_pos = k3_divergence(anchor, preserved)  # (...)
        d_neg = k3_divergence(anchor, removed)  # (...)
    return contrastive_loss_from_divergences(d_pos, d_neg, temperature)


def contrastive_loss_from_divergences(d_pos: Tensor, d_neg: Tensor, temperature: float) -> Tensor:
    """InfoNCE with one positive and one negative, from the divergences D(a, p⁺) and D(a, p⁻) (Eq. 7).

    -log(exp(-D⁺/τ) / (exp(-D⁺/τ) + exp(-D⁻/τ))) = softplus((D⁺ - D⁻)/τ), the stable form. Split out so a caller
    that computes the divergences itself (in chunks, from hidden states) applies the very same formula.
    """
    return F.softplus((d_pos - d_neg) / temperature)  # (...)


def papo_token_terms(policy_logps: Tensor, masked_logps: Tensor, loss_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """PAPO's per-token terms (docs/papo.md), each (B, T), as the authors' `dp_actor.update_policy` computes them:

    - ``kl_prc``: the implicit perception KL, verl ``low_var_kl(log_probs=l, ref_log_probs=a)`` =
      `k3_divergence(l, a)`: x = exp(clamp(a - l, ±20)), x - log x - 1 clamped to [-10, 10], with l the policy's
      log-prob of the sampled token with the original image (carries the gradient) and a the pre-update policy's
      log-prob with the masked image (a constant). PAPO *maximises* it: the loss subtracts γ times its mean;
    - ``nll``: -l, the sampled-token estimate of the policy's entropy that the authors' η term minimises;
    - ``kl_mask``: the loss tokens whose masked log-prob is finite. A non-finite a (NaN, ±inf from a degenerate masked
      pass) drops that token from the KL term (``kl_prc`` is exactly 0 there, with a zero gradient) rather than
      poisoning the loss; the caller counts them.

    Both terms are 0 off ``loss_mask``. Computed in float32 (float64 kept).
    """
    _check_same_shape(policy_logps=policy_logps, masked_logps=masked_logps, loss_mask=loss_mask)
    dtype = torch.promote_types(_compute_dtype(policy_logps), _compute_dtype(masked_logps))
    policy = policy_logps.to(dtype)  # (B, T)
    on_loss = loss_mask != 0  # (B, T)
    kl_mask = on_loss & torch.isfinite(masked_logps)  # (B, T)
    # A non-finite a would give NaN gradients through `where`; replace it by l itself (k3 = 0) before the maths.
    masked = torch.where(kl_mask, masked_logps.to(dtype), policy.detach())  # (B, T)
    kl_prc = torch.where(kl_mask, k3_divergence(policy, masked), 0.0)  # (B, T)
    nll = torch.where(on_loss, -policy, 0.0)  # (B, T)
    return kl_prc, nll, kl_mask


def aggregate_like_policy_loss(
    row_sums: Tensor,
    row_tokens: Tensor,
    loss_type: str,
    *,
    max_completion_length: int | None = None,
    tokens_per_micro_batch: Tensor | float | None = None,
) -> Tensor:
    """Batch value of an extra per-token loss term from per-rollout sums, normalised the way TRL normalises its policy
    loss; CPL's sums are Σ_t g_i m_it ℓ_it, PAPO's Σ_t of its terms over all completion tokens.

    `row_sums` (B,) is 0 for rollouts the gate drops; `row_tokens` (B,) counts each rollout's completion tokens |o_i|.
    For CPL with `"grpo"` (and `"sapo"`) this is Eq. 9 literally: (1/B) Σ_i (1/|o_i|) Σ_t m_it ℓ_it; the token-level types
    divide by completion tokens instead, as the paper's token-mean aggregation does (paper Eq. 9). Matching TRL's
    normaliser keeps λ's meaning whatever `loss_type` is. Not scaled for gradient accumulation (the caller does it).
    `"dapo"`, `"cispo"` and `"vespo"` need `tokens_per_micro_batch` (TRL: global tokens / processes / steps per
    generation); `"dr_grpo"` needs `max_completion_length`.
    """
    _check_choice("loss_type", loss_type, POLICY_LOSS_TYPES)
    _check_same_shape(row_sums=row_sums, row_tokens=row_tokens)
    if loss_type in ("grpo", "sapo"):
        return (row_sums / row_tokens.clamp(min=1)).mean()
    if loss_type == "bnpo":
        return row_sums.sum() / row_tokens.sum().clamp(min=1)
    if loss_type == "luspo":
        return row_sums.mean()
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("`max_completion_length` is required for loss_type='dr_grpo'.")
        return row_sums.sum() / (row_sums.numel() * max_completion_length)
    if tokens_per_micro_batch is None:
        raise ValueError(f"`tokens_per_micro_batch` is required for loss_type={loss_type!r}.")
    return row_sums.sum() / torch.as_tensor(tokens_per_micro_batch, device=row_sums.device).clamp(min=1.0)
