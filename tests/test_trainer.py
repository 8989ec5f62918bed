"""CPPOTrainer on the tiny offline Qwen2.5-VL: training, λ = 0 equivalence with GRPO, gating, scaling, features."""

import copy

import pytest
import torch
from conftest import (
    COMMON,
    count_policy_passes,
    generation_batch,
    hashed_reward,
    loss_and_grads,
    make_dataset,
    make_trainer,
)
from trl import GRPOTrainer

from cppo_trl import CPPOConfig, CPPOTrainer
from cppo_trl.trainer.cppo_trainer import VIEWS_KEY


@pytest.mark.parametrize("divergence", ["full", "k3"])
def test_training_changes_parameters_and_logs_cpl(tiny_qwen, tmp_path, divergence):
    trainer = make_trainer(tiny_qwen, tmp_path, cpl_divergence=divergence, max_steps=3)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p.detach())]
    assert len(changed) == len(before), f"unchanged: {set(before) - set(changed)}"
    logs = [h for h in trainer.state.log_history if "cppo/cpl_loss" in h]
    assert len(logs) == 3
    for key in ("cppo/gated_fraction", "cppo/selected_token_fraction", "cppo/extra_pass_rows"):
        assert all(key in h for h in logs)
    assert any(h["cppo/cpl_loss"] > 0 for h in logs)
    assert any(h["cppo/selected_token_fraction"] > 0 for h in logs)
    assert all(0 <= h["cppo/gated_fraction"] <= 1 for h in logs)


def test_zero_weight_equals_grpo_loss_and_gradients(tiny_qwen, tmp_path):
    grpo = make_trainer(tiny_qwen, tmp_path, trainer_cls=GRPOTrainer)
    cppo = make_trainer(tiny_qwen, tmp_path, cpl_weight=0.0)
    inputs = generation_batch(grpo)
    assert VIEWS_KEY not in generation_batch(cppo)  # λ = 0 builds no views at all
    grpo_loss, grpo_grads = loss_and_grads(grpo, inputs)
    cppo_loss, cppo_grads = loss_and_grads(cppo, inputs)
    assert torch.equal(grpo_loss, cppo_loss)
    assert grpo_grads.keys() == cppo_grads.keys()
    for name, grad in grpo_grads.items():
        assert torch.equal(grad, cppo_grads[name]), name


def test_gate_closed_runs_no_extra_pass_and_adds_nothing(tiny_qwen, tmp_path, monkeypatch):
    cppo = make_trainer(tiny_qwen, tmp_path, cpl_weight=1.0)
    inputs = generation_batch(cppo)
    assert any(v is not None for v in inputs[VIEWS_KEY])
    closed = {**inputs, "advantages": -inputs["advantages"].abs()}
    reference, _ = loss_and_grads(cppo, {**closed, VIEWS_KEY: [None] * len(inputs[VIEWS_KEY])})
    passes = count_policy_passes(monkeypatch)
    loss, _ = loss_and_grads(cppo, closed)
    assert passes == [4]  # the policy pass only
    assert torch.equal(loss, reference)
    assert cppo._metrics["train"]["cppo/extra_pass_rows"][-1] == 0


def test_extra_passes_only_on_gated_rows(tiny_qwen, tmp_path, monkeypatch):
    cppo = make_trainer(tiny_qwen, tmp_path, cpl_weight=1.0)
    inputs = generation_batch(cppo)
    views = [next(v for v in inputs[VIEWS_KEY] if v is not None)] * 4
    gated = {**inputs, VIEWS_KEY: views, "advantages": torch.tensor([1.0, -1.0, 0.0, 2.0])}
    passes = count_policy_passes(monkeypatch)
    loss_and_grads(cppo, gated)
    assert passes[0] == 4  # policy pass on every row
    assert all(n == 2 for n in passes[1:]) and len(passes) in (2, 3)  # I⁻ (and I⁺ if a token was selected)
    assert cppo._metrics["train"]["cppo/extra_pass_rows"][-1] == 2
    assert cppo._metrics["train"]["cppo/gated_fraction"][-1] == 0.5


def test_cpl_is_added_with_weight_and_gradient_accumulation_scaling(tiny_qwen, tmp_path):
    off = make_trainer(tiny_qwen, tmp_path, cpl_weight=0.0)
    on = make_trainer(tiny_qwen, tmp_path, cpl_weight=0.5, perception_token_selection=False)
    inputs = generation_batch(on)
    base = off.compute_loss(off.model, inputs).item()
    total = on.compute_loss(on.model, inputs).item()
    cpl = on._metrics["train"]["cppo/cpl_loss"][-1]
    assert cpl > 0
    assert total - base == pytest.approx(0.5 * cpl, rel=1e-4)
    off.current_gradient_accumulation_steps = on.current_gradient_accumulation_steps = 2
    base2 = off.compute_loss(off.model, inputs).item()
    total2 = on.compute_loss(on.model, inputs).item()
    assert total2 - base2 == pytest.approx((total - base) / 2, rel=1e-4)  # both terms halve together


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"])
def test_every_loss_type_trains(tiny_qwen, tmp_path, loss_type):
    extra = {"importance_sampling_level": "sequence"} if loss_type == "luspo" else {}
    trainer = make_trainer(tiny_qwen, tmp_path, loss_type=loss_type, max_steps=1, **extra)
    trainer.train()
    assert torch.isfinite(torch.tensor(trainer.state.log_history[0]["loss"]))


def test_unknown_loss_type_rejected(tiny_qwen, tmp_path, monkeypatch):
    monkeypatch.setattr("cppo_trl.trainer.cppo_trainer.POLICY_LOSS_TYPES", ("dapo",))
    with pytest.raises(ValueError, match="loss_type='grpo' is not supported"):
        make_trainer(tiny_qwen, tmp_path, loss_type="grpo")


def test_full_mode_logits_match_trl_fused_head(tiny_qwen, tmp_path):
    """The logits CPPO builds at selected positions give exactly TRL's anchor log-probs (same head transform)."""
    trainer = make_trainer(tiny_qwen, tmp_path, temperature=0.7)
    inputs = generation_batch(trainer)
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    T = inputs["completion_ids"].size(1)
    with trainer.anchor_capture(need_hidden=True) as capture:
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model,
            input_ids,
            attention_mask,
            T,
            compute_entropy=True,
            pixel_values=inputs["pixel_values"],
            image_grid_thw=inputs["image_grid_thw"],
            num_images=inputs["num_images"],
            mm_token_type_ids=inputs.get("mm_token_type_ids"),
        )
    hidden = capture.hidden
    head = trainer.model.get_output_embeddings()
    logits = trainer._project(hidden[:, -T - 1 : -1], head.weight, head.bias)
    mine = torch.log_softmax(logits, -1).gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)
    mask = inputs["completion_mask"].bool()
    torch.testing.assert_close(mine[mask], logps[mask], atol=1e-5, rtol=1e-5)


def test_views_are_per_prompt_deterministic_and_survive_shuffle(tiny_qwen, tmp_path):
    trainer = make_trainer(tiny_qwen, tmp_path, advantage_gating=False)
    inputs = generation_batch(trainer, num_rows=8)  # two prompts, four rollouts each
    views = inputs[VIEWS_KEY]
    assert views[0] is views[3] and views[4] is views[7] and views[0] is not views[4]
    again = trainer._build_views(trainer._rollouts, inputs)
    for a, b in zip(views, again, strict=True):
        assert torch.equal(a.tensors["removed"]["pixel_values"], b.tensors["removed"]["pixel_values"])
    assert not torch.equal(views[0].tensors["removed"]["pixel_values"], views[0].tensors["preserved"]["pixel_values"])
    from trl.trainer.utils import shuffle_sequence_dict, split_pixel_values_by_grid, split_tensor_dict

    torch.manual_seed(3)
    shuffled = shuffle_sequence_dict(split_pixel_values_by_grid({**inputs, "row": torch.arange(8)}))
    for part in split_tensor_dict(shuffled, 2):
        for row, view in zip(part["row"].tolist(), part[VIEWS_KEY], strict=True):
            assert view is views[row]


def test_training_features_together(tiny_qwen, tmp_path):
    """β > 0 (reference model reloaded from the folder), μ = 2, gradient accumulation, checkpointing, released."""
    trainer = make_trainer(
        tiny_qwen,
        tmp_path,
        beta=0.04,
        num_iterations=2,
        gradient_accumulation_steps=2,
        steps_per_generation=2,
        gradient_checkpointing=True,
        cppo_preset="released",
        max_steps=2,
    )
    assert trainer.args.cpl_divergence == "k3"
    trainer.train()
    logs = [h for h in trainer.state.log_history if "kl" in h]
    assert logs and all("cppo/cpl_loss" in h for h in logs)


def test_lora_trains_adapters_only(tiny_qwen, tmp_path):
    from peft import LoraConfig

    args = CPPOConfig(output_dir=str(tmp_path), beta=0.0, max_steps=2, **COMMON)
    trainer = CPPOTrainer(
        model=str(tiny_qwen),
        reward_funcs=hashed_reward,
        args=args,
        train_dataset=make_dataset(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    lora = [n for n in before if "lora_" in n]
    assert lora
    assert all(torch.equal(before[n], after[n]) for n in before if "lora_" not in n)
    assert any(not torch.equal(before[n], after[n]) for n in lora if "lora_B" in n)
    assert any(h.get("cppo/extra_pass_rows", 0) > 0 for h in trainer.state.log_history)


def test_eval_logs_cpl(tiny_qwen, tmp_path):
    trainer = make_trainer(
        tiny_qwen,
        tmp_path,
        eval_dataset=make_dataset(4),
        eval_strategy="steps",
        eval_steps=1,
        per_device_eval_batch_size=4,
        max_steps=1,
    )
    metrics = trainer.evaluate()
    assert "eval_cppo/cpl_loss" in metrics and "eval_cppo/gated_fraction" in metrics


def test_text_only_prompt_in_batch_gets_no_cpl(tiny_qwen, tmp_path):
    trainer = make_trainer(tiny_qwen, tmp_path, dataset=make_dataset(2, with_text_only_row=True))
    inputs = generation_batch(trainer, num_rows=8)
    assert inputs[VIEWS_KEY][4:] == [None] * 4  # the text-only prompt's rollouts
    loss, _ = loss_and_grads(trainer, copy.copy(inputs))
    assert torch.isfinite(loss)


@pytest.mark.parametrize("divergence", ["full", "k3"])
def test_nonfinite_view_skips_cpl_and_keeps_weights_finite(tiny_qwen, tmp_path, monkeypatch, divergence):
    trainer = make_trainer(tiny_qwen, tmp_path, cpl_divergence=divergence, advantage_gating=False)
    inputs = generation_batch(trainer)
    original = CPPOTrainer._view_pass

    def poisoned(self, *args, **kwargs):
        out, dummies = original(self, *args, **kwargs)
        out.logps = out.logps * float("nan")
        if out.hidden is not None:
            out.hidden = out.hidden * float("inf")
        return out, dummies

    monkeypatch.setattr(CPPOTrainer, "_view_pass", poisoned)
    loss, grads = loss_and_grads(trainer, inputs)
    metrics = trainer._metrics["train"]
    assert torch.isfinite(loss)
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert metrics["cppo/nonfinite_skipped"][-1] == 1
    assert metrics["cppo/cpl_loss"][-1] == 0


def test_same_seed_same_losses(tiny_qwen, tmp_path):
    runs = []
    for name in ("a", "b"):
        trainer = make_trainer(tiny_qwen, tmp_path / name, max_steps=2)
        trainer.train()
        runs.append([(h["loss"], h["cppo/cpl_loss"]) for h in trainer.state.log_history if "loss" in h])
    assert runs[0] == runs[1]


@pytest.mark.parametrize("through_views", [True, False])
def test_grad_through_views_switch(tiny_qwen, tmp_path, monkeypatch, through_views):
    trainer = make_trainer(
        tiny_qwen, tmp_path, cpl_grad_through_views=through_views, advantage_gating=False, cpl_divergence="k3"
    )
    inputs = generation_batch(trainer)
    seen = []
    original = CPPOTrainer._view_pass

    def recording(self, *args, **kwargs):
        out, dummies = original(self, *args, **kwargs)
        seen.append(out.logps.requires_grad)
        return out, dummies

    monkeypatch.setattr(CPPOTrainer, "_view_pass", recording)
    loss, grads = loss_and_grads(trainer, inputs)
    assert seen and all(flag == through_views for flag in seen)
    assert torch.isfinite(loss) and grads


def _saved_tensor_bytes(trainer, inputs) -> int:
    """Bytes autograd keeps for backward during the forward (activation memory; parameters excluded)."""
    params = {p.data_ptr() for p in trainer.model.parameters()}
    seen, total = set(), 0

    def pack(tensor):
        nonlocal total
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen.add(ptr)
            total += tensor.untyped_storage().nbytes()
        return tensor.detach()  # not the tensor itself: that forms a cycle with its grad_fn and leaks the graph

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer.compute_loss(trainer.model, inputs)
    return total


@pytest.mark.parametrize("divergence", ["full", "k3"])
def test_view_checkpointing_same_gradients_less_activation_memory(tiny_qwen, tmp_path, divergence):
    common = {
        "cpl_divergence": divergence,
        "advantage_gating": False,
        "cpl_weight": 1.0,
        "gradient_checkpointing": True,
    }
    plain = make_trainer(tiny_qwen, tmp_path / "plain", **common)
    lean = make_trainer(
        tiny_qwen, tmp_path / "lean", cpl_view_checkpointing=True, cpl_view_micro_batch_size=1, **common
    )
    inputs = generation_batch(plain)
    plain_loss, plain_grads = loss_and_grads(plain, inputs)
    lean_loss, lean_grads = loss_and_grads(lean, inputs)
    assert plain._metrics["train"]["cppo/cpl_loss"][-1] > 0
    torch.testing.assert_close(lean_loss, plain_loss)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(lean_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    assert _saved_tensor_bytes(lean, inputs) < 0.7 * _saved_tensor_bytes(plain, inputs)
