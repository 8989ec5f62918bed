"""Hand-computed checks of the pure CPPO maths in `cppo_trl.core.perception` (docs/method.md)."""

import math

import pytest
import torch

from cppo_trl.core.perception import (
    CPL_AGGREGATIONS,
    CPL_DIVERGENCES,
    PERCEPTION_SCORES,
    POLICY_LOSS_TYPES,
    aggregate_like_policy_loss,
    contrastive_loss_from_divergences,
    contrastive_perception_loss,
    entropy_from_logits,
    full_kl,
    k3_divergence,
    select_perception_tokens,
)


def _naive_kl64(anchor_logits, view_logits):
    """KL(softmax(a) || softmax(v)) written out in float64, the reference for the implementation."""
    p = torch.softmax(anchor_logits.double(), dim=-1)
    q = torch.softmax(view_logits.double(), dim=-1)
    return (p * (p.log() - q.log())).sum(-1)


def _naive_infonce64(d_pos, d_neg, tau):
    """Eq. 7 literally: -log(exp(s⁺/τ) / (exp(s⁺/τ) + exp(s⁻/τ))) with s = -D."""
    e_pos, e_neg = torch.exp(-d_pos / tau), torch.exp(-d_neg / tau)
    return -torch.log(e_pos / (e_pos + e_neg))


def _select(delta, mask=None, top_fraction=0.5, score="raw"):
    """Selection from a ΔH row/matrix, with anchor entropy 1 so removed entropy = 1 + ΔH."""
    delta = torch.as_tensor(delta, dtype=torch.float32)
    if delta.dim() == 1:
        delta = delta.unsqueeze(0)
    anchor = torch.ones_like(delta)
    mask = torch.ones_like(delta, dtype=torch.long) if mask is None else torch.as_tensor(mask).reshape(delta.shape)
    return select_perception_tokens(anchor, anchor + delta, mask, top_fraction, score=score)


def test_choice_constants():
    assert PERCEPTION_SCORES == ("raw", "normalized")
    assert CPL_DIVERGENCES == ("full", "k3")
    assert CPL_AGGREGATIONS == ("all_tokens", "selected_tokens")


# --- entropy ---------------------------------------------------------------------------------------------


def test_entropy_uniform_is_log_v():
    for v in (2, 7, 1000):
        h = entropy_from_logits(torch.zeros(3, v))
        torch.testing.assert_close(h, torch.full((3,), math.log(v)))


def test_entropy_hand_value():
    # softmax([0, ln 3]) = [1/4, 3/4]
    h = entropy_from_logits(torch.tensor([0.0, math.log(3.0)]))
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert h.shape == ()
    assert h.item() == pytest.approx(expected, rel=1e-6)


def test_entropy_extreme_logits_finite_and_gradient_finite():
    logits = torch.full((2, 5), -1e4)
    logits[:, 0] = 1e4
    logits[1, 3] = float("-inf")  # a masked vocabulary entry
    logits.requires_grad_(True)
    h = entropy_from_logits(logits)
    assert torch.isfinite(h).all()
    torch.testing.assert_close(h, torch.zeros(2), atol=1e-6, rtol=0)
    h.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_entropy_bf16_returns_float32():
    logits = (torch.randn(4, 3, 11, generator=torch.Generator().manual_seed(0)) * 1e3).to(torch.bfloat16)
    h = entropy_from_logits(logits)
    assert h.dtype == torch.float32
    assert h.shape == (4, 3)
    assert torch.isfinite(h).all()
    torch.testing.assert_close(h, entropy_from_logits(logits.float()))


# --- perception-token selection --------------------------------------------------------------------------

# ΔH row 0 = [2, .5, -.5, 1, 0, 3] with the 3 at a masked position; row 1 = [.5, 1, -1, 2, .25, -2].
_ANCHOR = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0, 2.0, 2.0]])
_REMOVED = torch.tensor([[3.0, 1.5, 0.5, 2.0, 1.0, 4.0], [2.5, 3.0, 1.0, 4.0, 2.25, 0.0]])
_MASK = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])


def test_selection_hand_example_half():
    # row 0: n⁺ = 3 (positions 0, 1, 3) -> k = floor(1.5) = 1 -> position 0 (ΔH 2); the masked ΔH 3 never counts.
    # row 1: n⁺ = 4 (positions 0, 1, 3, 4) -> k = 2 -> positions 3 (ΔH 2) and 1 (ΔH 1).
    sel = select_perception_tokens(_ANCHOR, _REMOVED, _MASK, 0.5)
    expected = torch.tensor([[1, 0, 0, 0, 0, 0], [0, 1, 0, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(sel, expected)


def test_selection_hand_example_full_keeps_only_positive_delta():
    sel = select_perception_tokens(_ANCHOR, _REMOVED, _MASK, 1.0)
    expected = torch.tensor([[1, 1, 0, 1, 0, 0], [1, 1, 0, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(sel, expected)


def test_selection_floor_rule():
    # n⁺ = 3, K = 0.5 -> floor(1.5) = 1
    assert _select([3.0, 1.0, 2.0], top_fraction=0.5).sum().item() == 1
    # n⁺ = 1, K = 0.1 -> floor(0.1) = 0 -> max(1, 0) = 1
    assert torch.equal(_select([-1.0, 0.5, 0.0], top_fraction=0.1), torch.tensor([[False, True, False]]))
    # n⁺ = 10, K = 0.25 -> floor(2.5) = 2
    assert _select(torch.arange(1.0, 11.0), top_fraction=0.25).sum().item() == 2


def test_selection_row_without_positive_delta_keeps_none():
    sel = _select([[-1.0, 0.0, -0.5], [1.0, -1.0, 2.0]], top_fraction=1.0)
    assert torch.equal(sel, torch.tensor([[False, False, False], [True, False, True]]))


@pytest.mark.parametrize("score", PERCEPTION_SCORES)
def test_selection_ties_at_threshold_are_kept(score):
    # ΔH = [3, 2, 2, 2, 1] (equal H(I⁻) offsets keep the ties for the normalized score too), K = 0.4:
    # n⁺ = 5 -> k = 2 -> threshold = second largest = 2 -> keeps 3, 2, 2, 2 (4 > k tokens).
    sel = _select([3.0, 2.0, 2.0, 2.0, 1.0], top_fraction=0.4, score=score)
    assert torch.equal(sel, torch.tensor([[True, True, True, True, False]]))


def test_selection_masked_position_never_selected():
    sel = _select([100.0, 1.0, 2.0], mask=[0, 1, 1], top_fraction=0.5)  # n⁺ = 2 -> k = 1
    assert torch.equal(sel, torch.tensor([[False, False, True]]))
    sel = _select([100.0, 1.0, 2.0], mask=[0, 1, 1], top_fraction=1.0)
    assert torch.equal(sel, torch.tensor([[False, True, True]]))


def test_selection_normalized_score_changes_ranking():
    # H(I) = [0, 4], H(I⁻) = [1, 6]: ΔH = [1, 2] (raw picks position 1);
    # relu(ΔH) / H(I⁻) = [1, 1/3] (normalized picks position 0). n⁺ = 2, K = 0.5 -> k = 1.
    anchor, removed, mask = torch.tensor([[0.0, 4.0]]), torch.tensor([[1.0, 6.0]]), torch.ones(1, 2)
    raw = select_perception_tokens(anchor, removed, mask, 0.5, score="raw")
    normalized = select_perception_tokens(anchor, removed, mask, 0.5, score="normalized")
    assert torch.equal(raw, torch.tensor([[False, True]]))
    assert torch.equal(normalized, torch.tensor([[True, False]]))


@pytest.mark.parametrize("score", PERCEPTION_SCORES)
def test_selection_nan_delta_ignored(score):
    anchor = torch.tensor([[float("nan"), 1.0, 1.0, 1.0]])
    removed = torch.tensor([[5.0, 2.0, 3.0, float("nan")]])
    mask = torch.ones(1, 4)
    # candidates: positions 1 (ΔH 1) and 2 (ΔH 2) only
    assert torch.equal(
        select_perception_tokens(anchor, removed, mask, 1.0, score=score), torch.tensor([[False, True, True, False]])
    )
    assert torch.equal(
        select_perception_tokens(anchor, removed, mask, 0.5, score=score), torch.tensor([[False, False, True, False]])
    )


def test_selection_is_bool_without_grad():
    anchor = torch.rand(2, 5, requires_grad=True)
    removed = (anchor.detach() + torch.randn(2, 5)).requires_grad_(True)
    sel = select_perception_tokens(anchor, removed, torch.ones(2, 5), 0.5, score="normalized")
    assert sel.dtype == torch.bool
    assert not sel.requires_grad
    assert sel.shape == (2, 5)


def test_selection_empty_completion():
    sel = select_perception_tokens(torch.zeros(3, 0), torch.zeros(3, 0), torch.zeros(3, 0), 0.5)
    assert sel.shape == (3, 0) and sel.dtype == torch.bool


@pytest.mark.parametrize("bad", [0.0, 1.5, -1.0, float("nan")])
def test_selection_bad_top_fraction(bad):
    with pytest.raises(ValueError, match="top_fraction"):
        _select([1.0, 2.0], top_fraction=bad)


def test_selection_bad_score_and_shapes():
    with pytest.raises(ValueError, match="score"):
        _select([1.0, 2.0], score="mutual_information")
    with pytest.raises(ValueError, match="shapes"):
        select_perception_tokens(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3), 0.5)


# --- divergences ------------------------------------------------------------------------------------------


def test_full_kl_matches_float64_reference():
    g = torch.Generator().manual_seed(1)
    a, v = torch.randn(3, 4, 9, generator=g) * 3, torch.randn(3, 4, 9, generator=g) * 3
    kl = full_kl(a, v)
    assert kl.dtype == torch.float32 and kl.shape == (3, 4)
    torch.testing.assert_close(kl.double(), _naive_kl64(a, v), rtol=1e-5, atol=1e-6)
    assert (kl >= -1e-6).all()
    torch.testing.assert_close(full_kl(a, a), torch.zeros(3, 4), atol=1e-6, rtol=0)


def test_full_kl_hand_value():
    # p = [1/2, 1/2], q = softmax([0, ln 3]) = [1/4, 3/4]: KL = 1/2 ln 2 + 1/2 ln(2/3)
    kl = full_kl(torch.zeros(2), torch.tensor([0.0, math.log(3.0)]))
    assert kl.item() == pytest.approx(0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0), rel=1e-6)


def test_full_kl_zero_probability_anchor_terms():
    anchor = torch.tensor([[0.0, float("-inf"), 1e4], [1e4, -1e4, -1e4]], requires_grad=True)
    view = torch.tensor([[0.0, 1.0, 1e4], [1e4, -1e4, 0.0]], requires_grad=True)
    kl = full_kl(anchor, view)
    assert torch.isfinite(kl).all()
    kl.sum().backward()
    assert torch.isfinite(anchor.grad).all() and torch.isfinite(view.grad).all()


def test_k3_hand_values():
    anchor = torch.zeros(4)
    view = torch.tensor([0.0, math.log(2.0), 50.0, -50.0])
    d = k3_divergence(anchor, view)
    # r = 0 -> 0; r = ln 2 -> 2 - ln 2 - 1; r = 50 -> r clamped to 20 -> e^20 - 21 -> D clamped to 10;
    # r = -50 -> r clamped to -20 -> e^-20 + 19 -> D clamped to 10.
    expected = torch.tensor([0.0, 1.0 - math.log(2.0), 10.0, 10.0])
    torch.testing.assert_close(d, expected)
    assert d.dtype == torch.float32


def test_k3_clamps_kill_gradient():
    view = torch.tensor([50.0, 3.0, 0.5], requires_grad=True)
    k3_divergence(torch.zeros(3), view).sum().backward()
    # r = 50 (outside ±20) and r = 3 (D = e^3 - 4 > 10): zero gradient; r = 0.5: dD/dr = e^r - 1.
    torch.testing.assert_close(view.grad, torch.tensor([0.0, 0.0, math.exp(0.5) - 1.0]))


# --- contrastive perception loss --------------------------------------------------------------------------


def test_cpl_full_equals_naive_infonce():
    g = torch.Generator().manual_seed(2)
    a, p, n = (torch.randn(2, 3, 8, generator=g) for _ in range(3))
    tau = 0.1
    loss = contrastive_perception_loss(a, p, n, tau, divergence="full")
    expected = _naive_infonce64(_naive_kl64(a, p), _naive_kl64(a, n), tau)
    assert loss.dtype == torch.float32 and loss.shape == (2, 3)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)


def test_cpl_k3_equals_naive_infonce():
    g = torch.Generator().manual_seed(3)
    a = -torch.rand(5, generator=g) * 3
    p = a + torch.randn(5, generator=g) * 0.5
    n = a + torch.randn(5, generator=g) * 0.5
    tau = 0.1
    loss = contrastive_perception_loss(a, p, n, tau, divergence="k3")

    def k3_64(r):
        return torch.exp(r) - r - 1

    expected = _naive_infonce64(k3_64((p - a).double()), k3_64((n - a).double()), tau)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("divergence", CPL_DIVERGENCES)
def test_cpl_equal_divergences_is_log2(divergence):
    g = torch.Generator().manual_seed(4)
    shape = (3, 6) if divergence == "full" else (3,)
    a, v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    loss = contrastive_perception_loss(a, v, v.clone(), 0.1, divergence=divergence)
    torch.testing.assert_close(loss, torch.full(loss.shape, math.log(2.0)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpl_extreme_logits_finite(dtype):
    def one_hot_logits(index):
        x = torch.full((2, 6), -1e4)
        x[:, index] = 1e4
        return x.to(dtype).requires_grad_(True)

    a, p, n = one_hot_logits(0), one_hot_logits(1), one_hot_logits(0)
    loss = contrastive_perception_loss(a, p, n, 0.1, divergence="full")
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss).all()
    assert (loss > 1e4).all()  # the positive view disagrees completely: KL ≈ 2e4, divided by τ
    loss.sum().backward()
    for t in (a, p, n):
        assert torch.isfinite(t.grad.float()).all()


def test_cpl_gradcheck_full():
    g = torch.Generator().manual_seed(5)
    inputs = tuple(torch.randn(2, 3, 5, generator=g, dtype=torch.float64).requires_grad_(True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, p, n: contrastive_perception_loss(a, p, n, 0.5, "full"), inputs)


def test_cpl_gradcheck_k3():
    g = torch.Generator().manual_seed(6)
    a = -torch.rand(2, 4, generator=g, dtype=torch.float64) * 3 - 0.5
    p = a + torch.randn(2, 4, generator=g, dtype=torch.float64) * 0.4  # |r| well inside the clamps
    n = a + torch.randn(2, 4, generator=g, dtype=torch.float64) * 0.4
    inputs = tuple(t.clone().requires_grad_(True) for t in (a, p, n))
    assert torch.autograd.gradcheck(lambda a, p, n: contrastive_perception_loss(a, p, n, 0.5, "k3"), inputs)


def test_cpl_empty_inputs():
    empty_logits = torch.zeros(2, 0, 7)
    assert contrastive_perception_loss(empty_logits, empty_logits, empty_logits, 0.1, "full").shape == (2, 0)
    empty = torch.zeros(0)
    assert contrastive_perception_loss(empty, empty, empty, 0.1, "k3").shape == (0,)


def test_cpl_validation():
    x = torch.zeros(2, 3)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            contrastive_perception_loss(x, x, x, bad)
    with pytest.raises(ValueError, match="divergence"):
        contrastive_perception_loss(x, x, x, 0.1, divergence="js")
    with pytest.raises(ValueError, match="shapes"):
        contrastive_perception_loss(x, x, torch.zeros(2, 4), 0.1)


# --- aggregation ------------------------------------------------------------------------------------------

# Two rollouts: the first gated in with selected-token losses 1 and 3 (sum 4) over 3 completion tokens, the second
# dropped by the gate (sum 0) with 2 completion tokens.
_ROW_SUMS = torch.tensor([4.0, 0.0])
_ROW_TOKENS = torch.tensor([3.0, 2.0])


@pytest.mark.parametrize(
    ("loss_type", "expected", "extra"),
    [
        ("grpo", (4.0 / 3.0 + 0.0) / 2, {}),  # Eq. 9: per-trajectory mean, then mean over the batch
        ("sapo", (4.0 / 3.0 + 0.0) / 2, {}),
        ("bnpo", 4.0 / 5.0, {}),  # token-mean over all completion tokens (paper Eq. 9)
        ("luspo", 4.0 / 2, {}),
        ("dr_grpo", 4.0 / (2 * 10), {"max_completion_length": 10}),
        ("dapo", 4.0 / 8.0, {"tokens_per_micro_batch": 8.0}),
        ("cispo", 4.0 / 8.0, {"tokens_per_micro_batch": torch.tensor(8.0)}),
        ("vespo", 4.0 / 8.0, {"tokens_per_micro_batch": 8.0}),
    ],
)
def test_aggregate_hand_values(loss_type, expected, extra):
    row_sums = _ROW_SUMS.clone().requires_grad_(True)
    value = aggregate_like_policy_loss(row_sums, _ROW_TOKENS, loss_type, **extra)
    assert value.shape == ()
    assert value.item() == pytest.approx(expected)
    value.backward()
    assert row_sums.grad[0].item() == pytest.approx(expected / 4.0)  # linear in the gated row's sum


def test_aggregate_all_loss_types_covered():
    assert set(POLICY_LOSS_TYPES) == {"grpo", "sapo", "bnpo", "dr_grpo", "luspo", "dapo", "cispo", "vespo"}


def test_aggregate_empty_rows_give_zero_not_nan():
    for loss_type in ("grpo", "bnpo"):
        value = aggregate_like_policy_loss(torch.zeros(2), torch.zeros(2), loss_type)
        assert value.item() == 0.0


def test_aggregate_validation():
    with pytest.raises(ValueError, match="loss_type"):
        aggregate_like_policy_loss(_ROW_SUMS, _ROW_TOKENS, "ppo")
    with pytest.raises(ValueError, match="max_completion_length"):
        aggregate_like_policy_loss(_ROW_SUMS, _ROW_TOKENS, "dr_grpo")
    with pytest.raises(ValueError, match="tokens_per_micro_batch"):
        aggregate_like_policy_loss(_ROW_SUMS, _ROW_TOKENS, "dapo")
    with pytest.raises(ValueError, match="shapes"):
        aggregate_like_policy_loss(_ROW_SUMS, torch.ones(3), "grpo")


def test_contrastive_loss_from_divergences_matches_full_loss():
    g = torch.Generator().manual_seed(3)
    a, p, n = (torch.randn(4, 7, generator=g) for _ in range(3))
    expected = contrastive_perception_loss(a, p, n, 0.1)
    torch.testing.assert_close(contrastive_loss_from_divergences(full_kl(a, p), full_kl(a, n), 0.1), expected)
