"""Hand-computed checks of PAPO's pure pieces: the per-token terms (`perception.papo_token_terms`) against the authors'
verl `low_var_kl` and entropy estimator, and the seeded patch mask (`masking`) against the authors' masking rule."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from cppo_trl.core.masking import blacken_patches, patch_mask
from cppo_trl.core.perception import aggregate_like_policy_loss, papo_token_terms


def _authors_low_var_kl(log_probs, ref_log_probs):
    """verl `compute_kl(log_probs, ref_log_probs, "low_var_kl")` as the PAPO actor calls it (ref = masked log-probs)."""
    kl = (ref_log_probs.double() - log_probs.double()).clamp(-20.0, 20.0)
    return torch.clamp(kl.exp() - kl - 1, min=-10.0, max=10.0)


# --- the per-token terms -----------------------------------------------------------------------------------------
def test_kl_prc_hand_value():
    """l = log 0.5, a = log 0.25: x = 0.5, k3 = 0.5 - log 0.5 - 1 = log 2 - 0.5."""
    policy = torch.tensor([[math.log(0.5)]])
    masked = torch.tensor([[math.log(0.25)]])
    kl, nll, kl_mask = papo_token_terms(policy, masked, torch.ones(1, 1))
    assert kl.item() == pytest.approx(math.log(2) - 0.5, abs=1e-6)
    assert nll.item() == pytest.approx(math.log(2), abs=1e-6)
    assert kl_mask.tolist() == [[True]]


def test_kl_prc_equals_authors_low_var_kl_including_clamps():
    """Interior values, |a - l| > 20 (log-ratio clamp) and k3 > 10 (estimate clamp) on both sides."""
    policy = torch.tensor([[-1.0, -0.1, -30.0, -1.0, -2.0, -3.0]])
    masked = torch.tensor([[-1.5, -3.0, -1.0, -40.0, 1.0, -3.0]])
    kl, _, _ = papo_token_terms(policy, masked, torch.ones_like(policy))
    expected = _authors_low_var_kl(policy, masked).float()
    torch.testing.assert_close(kl, expected)
    assert kl[0, 2].item() == 10.0 and kl[0, 3].item() == pytest.approx(10.0)  # clamped both ways
    assert kl[0, 5].item() == 0.0  # identical log-probs: no divergence


def test_kl_prc_gradient_only_reaches_the_policy_and_dies_at_the_clamps():
    policy = torch.tensor([[-1.0, -30.0, -0.5]], dtype=torch.float64, requires_grad=True)
    masked = torch.tensor([[-2.0, -1.0, -0.25]], dtype=torch.float64, requires_grad=True)
    kl, _, _ = papo_token_terms(policy, masked, torch.ones(1, 3))
    kl.sum().backward()
    r = (masked - policy).detach()
    # d/dl (e^r - r - 1) with r = a - l: -(e^r - 1); position 1 is clamped (r = 29 > 20), so 0.
    assert policy.grad[0, 0].item() == pytest.approx(-(math.exp(r[0, 0].item()) - 1))
    assert policy.grad[0, 1].item() == 0.0
    assert policy.grad[0, 2].item() == pytest.approx(-(math.exp(0.25) - 1))
    # The masked log-probs come from a no-grad pass in the trainer; the function itself would differentiate them too.
    assert masked.grad is not None


def test_terms_are_zero_off_the_loss_mask():
    policy = torch.tensor([[-1.0, -2.0, -3.0]])
    masked = torch.tensor([[-2.0, -2.5, -0.5]])
    mask = torch.tensor([[1, 0, 1]])
    kl, nll, kl_mask = papo_token_terms(policy, masked, mask)
    assert kl[0, 1].item() == 0.0 and nll[0, 1].item() == 0.0 and not kl_mask[0, 1]
    assert nll[0].tolist() == [1.0, 0.0, 3.0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_masked_logp_is_dropped_with_finite_gradients(bad):
    policy = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    masked = torch.tensor([[bad, -2.5]])
    kl, nll, kl_mask = papo_token_terms(policy, masked, torch.ones(1, 2))
    assert kl_mask.tolist() == [[False, True]]
    assert kl[0, 0].item() == 0.0 and torch.isfinite(kl).all()
    (-(kl.sum()) + nll.sum()).backward()
    assert torch.isfinite(policy.grad).all()
    assert policy.grad[0, 0].item() == -1.0  # only the nll term reaches the dropped token


def test_terms_bf16_in_float32_out():
    policy = torch.tensor([[-1.0, -2.0]], dtype=torch.bfloat16)
    kl, nll, _ = papo_token_terms(policy, policy - 0.5, torch.ones(1, 2))
    assert kl.dtype == torch.float32 and nll.dtype == torch.float32


def test_terms_gradcheck():
    policy = torch.tensor([[-0.7, -1.3, -0.2]], dtype=torch.float64, requires_grad=True)
    masked = torch.tensor([[-1.1, -0.9, -2.0]], dtype=torch.float64)
    mask = torch.ones(1, 3)
    assert torch.autograd.gradcheck(lambda p: papo_token_terms(p, masked, mask)[0], (policy,))
    assert torch.autograd.gradcheck(lambda p: papo_token_terms(p, masked, mask)[1], (policy,))


def test_terms_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes must match"):
        papo_token_terms(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))


def test_papo_loss_by_hand_with_token_mean():
    """−γ·M[k3] + η·M[−l] with M the token mean (TRL "bnpo", verl loss_avg_mode "token"), two rows of 2 and 1 tokens."""
    policy = torch.tensor([[math.log(0.5), math.log(0.25)], [math.log(0.5), 0.0]])
    masked = torch.tensor([[math.log(0.25), math.log(0.25)], [math.log(1.0), 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    kl, nll, _ = papo_token_terms(policy, masked, mask)
    gamma, eta = 0.02, 0.05
    loss = aggregate_like_policy_loss(-gamma * kl.sum(-1) + eta * nll.sum(-1), mask.sum(-1), "bnpo")
    k3_a = math.log(2) - 0.5  # x = 0.5
    k3_c = 2 - math.log(2) - 1  # x = 2
    mean_k3 = (k3_a + 0 + k3_c) / 3
    mean_nll = (math.log(2) + math.log(4) + math.log(2)) / 3
    assert loss.item() == pytest.approx(-gamma * mean_k3 + eta * mean_nll, abs=1e-6)


# --- the mask ----------------------------------------------------------------------------------------------------
def test_patch_mask_grid_covers_partial_cells():
    mask = patch_mask(30, 15, 14, 0.6, seed=0)
    assert mask.shape == (2, 3)  # ceil(15/14) rows, ceil(30/14) columns
    assert mask.dtype == bool


def test_patch_mask_is_seeded():
    a, b = patch_mask(224, 224, 14, 0.6, seed=7), patch_mask(224, 224, 14, 0.6, seed=7)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, patch_mask(224, 224, 14, 0.6, seed=8))


def test_patch_mask_fraction_matches_probability():
    """256 cells per draw x 40 seeds: the blackened fraction is 0.6 within 4 standard errors (0.0039 each)."""
    fractions = [patch_mask(224, 224, 14, 0.6, seed=s).mean() for s in range(40)]
    assert abs(np.mean(fractions) - 0.6) < 4 * math.sqrt(0.6 * 0.4 / (256 * 40))
    assert patch_mask(224, 224, 14, 0.0, seed=1).sum() == 0 and patch_mask(224, 224, 14, 1.0, seed=1).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"patch_size": 0}, "patch_size"),
        ({"probability": 1.5}, "probability"),
        ({"probability": float("nan")}, "probability"),
        ({"width": 0}, "empty image"),
    ],
)
def test_patch_mask_validation(kwargs, message):
    args = {"width": 28, "height": 28, "patch_size": 14, "probability": 0.6, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        patch_mask(**args)


def test_blacken_patches_blackens_exactly_the_masked_cells():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(1, 256, (20, 30, 3), dtype=np.uint8))  # no black pixel to begin with
    mask = np.array([[True, False, True], [False, True, False]])
    out = np.asarray(blacken_patches(image, mask, 14))
    original = np.asarray(image)
    for row in range(2):
        for column in range(3):
            cell = (slice(row * 14, (row + 1) * 14), slice(column * 14, (column + 1) * 14))
            if mask[row, column]:
                assert (out[cell] == 0).all()
            else:
                assert np.array_equal(out[cell], original[cell])
    assert np.asarray(image).min() > 0  # the input is untouched


def test_blacken_patches_refuses_wrong_mode_and_shape():
    with pytest.raises(ValueError, match="RGB"):
        blacken_patches(Image.new("L", (28, 28)), np.zeros((2, 2), dtype=bool), 14)
    with pytest.raises(ValueError, match="does not match"):
        blacken_patches(Image.new("RGB", (28, 28)), np.zeros((3, 2), dtype=bool), 14)
