"""The pieces that make every rank run the same passes (`cppo_trl.trainer.rank_sync`), in one process: the agreement,
the zero-weighted keep-alive term, the dummy row, and CPPO / PAPO running the agreed number of passes. A pass this rank
has no rows for runs on the dummy and changes neither the loss nor any gradient. The two-process runs under DDP and
DeepSpeed are in `tests/test_multiprocess.py`."""

import pytest
import torch
from conftest import count_policy_passes, generation_batch, loss_and_grads, make_dataset, make_trainer

from cppo_trl import PAPOTrainer
from cppo_trl.core.images import PixelBudget
from cppo_trl.trainer import papo_trainer
from cppo_trl.trainer.rank_sync import PASS_PLAN_KEY, DummyVisionPass, agree_on_counts, dummy_row, zero_weighted
from cppo_trl.trainer.views import TEXT_SIDE_KEYS, VISION_KEYS


class _TwoRanks:
    """An accelerator stand-in whose other rank reported `other` (gather concatenates along dim 0, as accelerate)."""

    device = torch.device("cpu")
    num_processes = 2

    def __init__(self, other):
        self.other = torch.tensor([other])

    def gather(self, tensor):
        return torch.cat([tensor, self.other])


def test_agreement_is_the_maximum_per_entry():
    assert agree_on_counts([0, 3, 1], _TwoRanks([2, 1, 1])) == [2, 3, 1]


def test_zero_weighted_adds_nothing_and_no_nan():
    finite = torch.tensor([1.0, -2.0], requires_grad=True)
    broken = torch.tensor([float("nan"), float("inf"), 3.0], requires_grad=True)
    term = zero_weighted([finite, None, broken])
    assert term.item() == 0.0
    term.backward()
    assert torch.equal(finite.grad, torch.zeros(2)) and torch.equal(broken.grad, torch.zeros(3))
    assert zero_weighted([None]) is None


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "gemma3", "idefics3", "llava_next"])
def test_dummy_row_forwards_for_every_family(family, tiny_vlm, tmp_path):
    trainer = make_trainer(tiny_vlm(family), tmp_path)
    logps, entropies = trainer._dummy_forward(trainer.model, compute_entropy=True)
    assert logps.shape == entropies.shape == (1, 1) and torch.isfinite(logps).all()
    assert trainer._dummy["num_images"] == [1] and "pixel_values" in trainer._dummy


def test_dummy_row_uses_the_smallest_image_of_the_grid(tiny_qwen):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_qwen)
    row = dummy_row(processor, PixelBudget(28, 784, 12544), eos_token_id=0)
    assert row["image_grid_thw"].tolist() == [[1, 2, 2]]  # one merged token
    assert row["input_ids"][0, -1].item() == 0 and row["attention_mask"].shape == row["input_ids"].shape


def _twin(tiny_qwen, tmp_path, **overrides):
    trainer = make_trainer(tiny_qwen, tmp_path, advantage_gating=False, cpl_divergence="k3", **overrides)
    return trainer, generation_batch(trainer)


def test_extra_agreed_passes_change_nothing(tiny_qwen, tmp_path, monkeypatch):
    """The other rank runs 3 passes per view where this one needs 1: 2 more dummy passes per view run here, and the
    loss and every gradient equal those of the run without agreement, bit for bit."""
    trainer, inputs = _twin(tiny_qwen, tmp_path)
    assert trainer._view_passes(inputs) == 1
    reference_loss, reference_grads = loss_and_grads(trainer, dict(inputs))
    rows = count_policy_passes(monkeypatch)
    loss, grads = loss_and_grads(trainer, {**inputs, PASS_PLAN_KEY: 3})
    assert rows == [4, 4, 1, 1, 4, 1, 1]  # policy; removed + 2 dummies; preserved + 2 dummies
    assert torch.equal(loss, reference_loss)
    assert reference_grads.keys() == grads.keys() and all(torch.equal(grads[n], g) for n, g in reference_grads.items())


def test_a_rank_without_gated_rows_runs_the_agreed_passes_on_the_dummy(tiny_qwen, tmp_path, monkeypatch):
    trainer, inputs = _twin(tiny_qwen, tmp_path)
    ungated = {**inputs, "advantages": torch.zeros_like(inputs["advantages"])}
    trainer.args.advantage_gating = True
    reference_loss, reference_grads = loss_and_grads(trainer, dict(ungated))
    rows = count_policy_passes(monkeypatch)
    loss, grads = loss_and_grads(trainer, {**ungated, PASS_PLAN_KEY: 2})
    assert rows == [4, 1, 1, 1, 1]  # policy; 2 dummy passes per view
    assert torch.equal(loss, reference_loss)
    assert all(torch.equal(grads[n], g) for n, g in reference_grads.items())
    assert trainer._metrics["train"]["cppo/extra_pass_rows"][-1] == 0


def test_no_selected_token_keeps_both_views_in_the_graph(tiny_qwen, tmp_path, monkeypatch):
    """With an agreement, a micro-batch where no token is selected still runs the preserved view (other ranks may
    select some) and backpropagates through both with weight zero; alone, it skips the preserved view."""
    trainer, inputs = _twin(tiny_qwen, tmp_path)
    monkeypatch.setattr(
        "cppo_trl.trainer.cppo_trainer.select_perception_tokens",
        lambda anchor, removed, mask, *a, **k: mask.bool() & False,
    )
    rows = count_policy_passes(monkeypatch)
    alone_loss, alone_grads = loss_and_grads(trainer, dict(inputs))
    assert rows == [4, 4]
    rows.clear()
    loss, grads = loss_and_grads(trainer, {**inputs, PASS_PLAN_KEY: 1})
    assert rows == [4, 4, 4]
    assert torch.equal(loss, alone_loss) and all(torch.equal(grads[n], g) for n, g in alone_grads.items())


def test_nonfinite_view_with_agreement_keeps_weights_finite(tiny_qwen, tmp_path, monkeypatch):
    trainer, inputs = _twin(tiny_qwen, tmp_path)
    from cppo_trl import CPPOTrainer

    original = CPPOTrainer._view_pass

    def poisoned(self, *args, **kwargs):
        out, dummies = original(self, *args, **kwargs)
        out.logps = out.logps * float("nan")
        return out, dummies

    monkeypatch.setattr(CPPOTrainer, "_view_pass", poisoned)
    loss, grads = loss_and_grads(trainer, {**inputs, PASS_PLAN_KEY: 2})
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
    assert trainer._metrics["train"]["cppo/nonfinite_skipped"][-1] == 1


def test_papo_masked_pass_runs_the_agreed_chunks(tiny_qwen, tmp_path, monkeypatch):
    """Another rank has two more chunks of image rows: this one runs two dummy passes after its own masked pass."""
    trainer = make_trainer(tiny_qwen, tmp_path, trainer_cls=PAPOTrainer, perception_loss_weight=0.5)
    trainer._agreed_passes = lambda local: local + 2
    rows = count_policy_passes(monkeypatch)
    inputs = generation_batch(trainer)
    assert rows[-3:] == [4, 1, 1]  # the masked pass of the 4 image rows, then 2 dummy passes
    assert torch.isfinite(inputs[papo_trainer.MASKED_LOGPS_KEY]).all()


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "gemma3", "idefics3", "llava_next"])
def test_dummy_vision_pass_touches_what_an_image_forward_touches(family, tiny_vlm, tmp_path):
    """A text-only forward with the dummy vision pass gives the same log-probs and gradients, and now gives a (zero)
    gradient to exactly the parameters an image forward trains: a text-only rank then reduces and gathers the same
    parameters as an image rank (ZeRO-2 buckets, ZeRO-3 gathers)."""
    trainer = make_trainer(tiny_vlm(family), tmp_path, dataset=make_dataset(2, with_text_only_row=True))
    inputs = generation_batch(trainer, num_rows=8)
    length = inputs["completion_ids"].size(1)

    def forward(rows, **vision):
        trainer.model.zero_grad()
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)[rows]
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)[rows]
        text_side = {k: inputs[k][rows] for k in TEXT_SIDE_KEYS if inputs.get(k) is not None}
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, mask, length, **vision, **text_side
        )
        logps.sum().backward()
        return logps.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}

    image_rows, text_rows = torch.arange(0, 4), torch.arange(4, 8)  # the images all belong to rows 0-3
    images = {k: inputs[k] for k in VISION_KEYS if inputs.get(k) is not None}
    _, image_grads = forward(image_rows, num_images=inputs["num_images"][:4], **images)
    reference, reference_grads = forward(text_rows)
    vision = DummyVisionPass(trainer._policy_lm(trainer.model).base_model, trainer._dummy_row())
    trainer._vision_passes.append(vision)  # the trainer activates it for its own forwards
    logps, grads = forward(text_rows)
    assert vision.calls == 1 and torch.equal(logps, reference)
    assert set(reference_grads) < set(image_grads) and set(grads) == set(image_grads)
    assert all(torch.equal(grads[n], g) for n, g in reference_grads.items())
    assert all(not grads[n].any() for n in set(grads) - set(reference_grads))
    with torch.no_grad():  # outside the trainer's own forwards (e.g. in `generate`) it stays off
        trainer.model(input_ids=inputs["prompt_ids"][text_rows], attention_mask=inputs["prompt_mask"][text_rows])
    assert vision.calls == 1
