"""PAPOTrainer on the tiny offline Qwen2.5-VL: training, γ = η = 0 equivalence with GRPO, the masked pass (once per
generation batch, no gradient, pre-update policy, rollout temperature), the loss terms against the pure functions,
seeded masks and their statistics, and TRL's `delta` as the authors' dual-clip."""

import math

import numpy as np
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
    rollout_of,
    textured_image,
)
from datasets import Dataset
from trl import GRPOTrainer

from cppo_trl import CPPOConfig, PAPOConfig, PAPOTrainer
from cppo_trl.core.masking import patch_mask
from cppo_trl.core.perception import aggregate_like_policy_loss, papo_token_terms
from cppo_trl.core.perturbations import view_seed
from cppo_trl.trainer.papo_trainer import HAS_MASKED_VIEW_KEY, MASKED, MASKED_LOGPS_KEY


PAPO_METRICS = ("papo/kl_prc", "papo/entropy", "papo/masked_logp", "papo/masked_fraction", "papo/loss")


def _papo(model, tmp_path, **overrides):
    return make_trainer(model, tmp_path, trainer_cls=PAPOTrainer, **overrides)


def _rows(images, text="What colour is the top left block?"):
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return Dataset.from_list([{"prompt": prompt, "images": [image]} for image in images])


def _policy_logps(trainer, inputs):
    """The policy's log-probs of the completion tokens with the original images, with gradient."""
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    logps, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(
        trainer,
        trainer.model,
        input_ids,
        attention_mask,
        inputs["completion_ids"].size(1),
        pixel_values=inputs["pixel_values"],
        image_grid_thw=inputs["image_grid_thw"],
        num_images=inputs["num_images"],
        mm_token_type_ids=inputs.get("mm_token_type_ids"),
    )
    return logps


def test_training_changes_parameters_and_logs_papo_metrics(tiny_qwen, tmp_path):
    trainer = _papo(tiny_qwen, tmp_path, perception_loss_weight=0.5, der_loss_weight1=0.1, max_steps=3)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p.detach())]
    assert len(changed) == len(before), f"unchanged: {set(before) - set(changed)}"
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    for key in PAPO_METRICS:
        assert all(key in h and math.isfinite(h[key]) for h in logs), key
    assert all(h["papo/kl_prc"] >= 0 and h["papo/entropy"] > 0 and h["papo/masked_logp"] < 0 for h in logs)
    assert any(h["papo/kl_prc"] > 0 for h in logs)
    assert all(h["papo/nonfinite_masked_tokens"] == 0 and h["papo/masked_view_rows"] == 4 for h in logs)


def test_zero_weights_equal_grpo_loss_and_gradients(tiny_qwen, tmp_path):
    grpo = make_trainer(tiny_qwen, tmp_path, trainer_cls=GRPOTrainer)
    papo = _papo(tiny_qwen, tmp_path, perception_loss_weight=0.0, der_loss_weight1=0.0)
    inputs = generation_batch(grpo)
    assert MASKED_LOGPS_KEY not in generation_batch(papo)  # γ = 0: no masked pass at all
    grpo_loss, grpo_grads = loss_and_grads(grpo, inputs)
    papo_loss, papo_grads = loss_and_grads(papo, inputs)
    assert torch.equal(grpo_loss, papo_loss)
    assert grpo_grads.keys() == papo_grads.keys()
    for name, grad in grpo_grads.items():
        assert torch.equal(grad, papo_grads[name]), name
    # Only the rails' own count; no PAPO term is computed or logged.
    assert {key for key in papo._metrics["train"] if key.startswith("papo/")} == {"papo/truncated_at_image_token"}


def test_masked_pass_runs_once_per_generation_batch_and_is_reused(tiny_qwen, tmp_path, monkeypatch):
    """μ = 2 iterations x 2 steps per generation: 8 micro-batches from 2 generation batches of 8 rows. The masked pass
    runs at rollout time only, in chunks of the micro-batch size, without gradient; the loss runs only the policy pass."""
    trainer = _papo(
        tiny_qwen,
        tmp_path,
        perception_loss_weight=0.5,
        num_iterations=2,
        steps_per_generation=2,
        gradient_accumulation_steps=2,
        max_steps=4,
    )
    events, phase = [], ["rollout"]
    original_view, original_loss = PAPOTrainer._view_forward, PAPOTrainer._compute_loss
    original_generate, original_pass = (
        PAPOTrainer._generate_and_score_completions,
        GRPOTrainer._get_per_token_logps_and_entropies,
    )

    def view_forward(self, model, inputs, views, rows, name, *args, **kwargs):
        events.append(("masked", rows.numel(), torch.is_grad_enabled(), name))
        return original_view(self, model, inputs, views, rows, name, *args, **kwargs)

    def generate(self, inputs):
        events.append(("generate",))
        return original_generate(self, inputs)

    def compute_loss(self, model, inputs):
        events.append(("loss", inputs[MASKED_LOGPS_KEY].shape[0]))
        phase[0] = "loss"
        try:
            return original_loss(self, model, inputs)
        finally:
            phase[0] = "rollout"

    def forward_pass(self, model, input_ids, *args, **kwargs):
        if phase[0] == "loss":
            events.append(("loss pass", input_ids.size(0)))
        return original_pass(self, model, input_ids, *args, **kwargs)

    monkeypatch.setattr(PAPOTrainer, "_view_forward", view_forward)
    monkeypatch.setattr(PAPOTrainer, "_generate_and_score_completions", generate)
    monkeypatch.setattr(PAPOTrainer, "_compute_loss", compute_loss)
    monkeypatch.setattr(GRPOTrainer, "_get_per_token_logps_and_entropies", forward_pass)
    trainer.train()
    masked = [e for e in events if e[0] == "masked"]
    assert len(masked) == 4  # two chunks of 4 rows per generation batch of 8, two generation batches
    assert all(rows == 4 and not grad and name == MASKED for _, rows, grad, name in masked)
    # Each generation batch: its masked passes, then 4 losses (2 micro-batches x 2 iterations), each with the policy
    # pass alone.
    per_generation = [("generate",), *masked[:2], *[("loss", 4), ("loss pass", 4)] * 4]
    assert [e[0] for e in events] == [e[0] for e in per_generation] * 2


def test_masked_logps_are_the_rollout_policy_at_the_rollout_temperature(tiny_qwen, tmp_path):
    """An independent forward: the processor on the masked image, the model's own logits, divided by T = 0.7."""
    trainer = _papo(tiny_qwen, tmp_path, temperature=0.7, perception_loss_weight=0.5)
    inputs = generation_batch(trainer)
    stored = inputs[MASKED_LOGPS_KEY]
    assert not stored.requires_grad and inputs[HAS_MASKED_VIEW_KEY].all()
    from cppo_trl.core.perturbations import sample_key
    from cppo_trl.trainer.views import prompt_text

    rollout = rollout_of(trainer.train_dataset[0])
    text = prompt_text(rollout.prompt, trainer.processing_class)
    masked = trainer._make_masked_images(rollout, sample_key(text, rollout.images)).images[MASKED]
    encoded = trainer.processing_class(images=[masked], text=[text], return_tensors="pt")
    completion = inputs["completion_ids"][0][inputs["completion_mask"][0].bool()]
    ids = torch.cat([encoded["input_ids"][0], completion]).unsqueeze(0)
    token_types = torch.cat([encoded["mm_token_type_ids"][0], torch.zeros_like(completion)]).unsqueeze(0)
    with torch.no_grad():
        logits = trainer.model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=encoded["pixel_values"],
            image_grid_thw=encoded["image_grid_thw"],
            mm_token_type_ids=token_types,  # Qwen2.5-VL's rope positions of the image tokens
        ).logits
    logps = torch.log_softmax(logits[0, -completion.numel() - 1 : -1] / 0.7, dim=-1)
    expected = logps.gather(-1, completion.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(stored[0, : completion.numel()], expected, atol=1e-5, rtol=1e-5)
    # The mask changed what the model sees: the masked log-probs are not the original image's.
    assert not torch.allclose(stored[0, : completion.numel()], _policy_logps(trainer, inputs)[0, : completion.numel()])


@pytest.mark.parametrize(("loss_type", "accumulation"), [("dapo", 1), ("bnpo", 2), ("grpo", 1)])
def test_added_term_and_its_gradient_match_the_pure_functions(tiny_qwen, tmp_path, loss_type, accumulation):
    gamma, eta = 0.5, 0.3
    common = {"loss_type": loss_type, "gradient_accumulation_steps": accumulation, "steps_per_generation": 1}
    on = _papo(tiny_qwen, tmp_path / "on", perception_loss_weight=gamma, der_loss_weight1=eta, **common)
    off = _papo(tiny_qwen, tmp_path / "off", perception_loss_weight=0.0, der_loss_weight1=0.0, **common)
    inputs = generation_batch(on)
    off.model.train()  # training mode: both scale for gradient accumulation
    total, grads_on = loss_and_grads(on, inputs)
    base, grads_off = loss_and_grads(off, inputs)

    on.model.zero_grad()
    mask = inputs["completion_mask"]
    kl, nll, kl_mask = papo_token_terms(_policy_logps(on, inputs), inputs[MASKED_LOGPS_KEY], mask)
    tokens = inputs["num_items_in_batch"] if loss_type == "dapo" else None
    expected = aggregate_like_policy_loss(
        -gamma * kl.sum(-1) + eta * nll.sum(-1), mask.sum(-1), loss_type, tokens_per_micro_batch=tokens
    )
    expected = expected / accumulation
    expected.backward()
    assert (total - base).item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    for name, param in on.model.named_parameters():
        if param.grad is not None:
            difference = grads_on[name] - grads_off[name]
            torch.testing.assert_close(difference, param.grad, atol=2e-6, rtol=1e-4, msg=name)
    metrics = on._metrics["train"]
    assert metrics["papo/kl_prc"][-1] == pytest.approx((kl.sum() / kl_mask.sum()).item(), rel=1e-5)
    assert metrics["papo/entropy"][-1] == pytest.approx((nll.sum() / mask.sum()).item(), rel=1e-5)
    assert metrics["papo/loss"][-1] == pytest.approx(expected.item() * accumulation, rel=1e-5)


def test_eta_alone_runs_no_masked_pass(tiny_qwen, tmp_path, monkeypatch):
    trainer = _papo(tiny_qwen, tmp_path, perception_loss_weight=0.0, der_loss_weight1=0.2, loss_type="bnpo")
    inputs = generation_batch(trainer)
    assert MASKED_LOGPS_KEY not in inputs
    passes = count_policy_passes(monkeypatch)
    loss, _ = loss_and_grads(trainer, inputs)
    assert passes == [4]
    mask = inputs["completion_mask"]
    nll = -(_policy_logps(trainer, inputs) * mask).sum() / mask.sum()
    assert trainer._metrics["train"]["papo/loss"][-1] == pytest.approx(0.2 * nll.item(), rel=1e-5)
    assert "papo/kl_prc" not in trainer._metrics["train"]


def test_one_seeded_mask_per_prompt_shared_by_its_rollouts(tiny_qwen, tmp_path, monkeypatch):
    trainer = _papo(tiny_qwen, tmp_path)
    drawn = []
    original = PAPOTrainer._make_masked_images

    def recording(self, rollout, key):
        out = original(self, rollout, key)
        drawn.append((key, [np.asarray(im) for im in out.images[MASKED]]))
        return out

    monkeypatch.setattr(PAPOTrainer, "_make_masked_images", recording)
    generation_batch(trainer, num_rows=8)  # two prompts, four rollouts each
    assert len(drawn) == 2 and drawn[0][0] != drawn[1][0]  # drawn once per prompt, not per rollout
    key, first = drawn[0]
    rollout = rollout_of(trainer.train_dataset[0])
    again = trainer._make_masked_images(rollout, key).images[MASKED]
    assert np.array_equal(np.asarray(again[0]), first[0])  # a pure function of (seed, step, prompt): resume-safe
    trainer.state.global_step += 1
    later = trainer._make_masked_images(rollout, key).images[MASKED]
    assert not np.array_equal(np.asarray(later[0]), first[0])  # redrawn when the prompt comes back


def test_each_image_gets_its_own_mask_on_the_raw_pixels(tiny_qwen, tmp_path):
    """Two identical 112x112 images: each is blackened on its own seeded cells, exactly the cells `patch_mask` draws
    for (seed, step, key, image index)."""
    trainer = _papo(tiny_qwen, tmp_path)
    image = textured_image(4)
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]
    row = {"prompt": [{"role": "user", "content": content}], "images": [image, image.copy()]}
    out = trainer._make_masked_images(rollout_of(row), b"key")
    prompt_seed = view_seed(trainer.args.seed, trainer.state.global_step, b"key")
    masks = []
    for index, masked in enumerate(out.images[MASKED]):
        cells = patch_mask(112, 112, 14, 0.6, view_seed(prompt_seed, index, b"papo-mask"))
        pixels, original = np.asarray(masked), np.asarray(image)
        for y in range(8):
            for x in range(8):
                cell = pixels[y * 14 : (y + 1) * 14, x * 14 : (x + 1) * 14]
                if cells[y, x]:
                    assert (cell == 0).all()
                else:
                    assert np.array_equal(cell, original[y * 14 : (y + 1) * 14, x * 14 : (x + 1) * 14])
        masks.append(cells)
    assert not np.array_equal(masks[0], masks[1])


def test_mask_statistics_and_raw_resolution(tiny_qwen, tmp_path):
    """448x448 raw images (1024 cells of 14 px each) above the tiny budget: masked at raw resolution, then fitted to
    112x112 like the original. The logged blackened fraction is 0.6 within 4 standard errors."""
    images = [textured_image(i, 448) for i in range(2)]
    trainer = _papo(tiny_qwen, tmp_path, dataset=_rows(images), mask_ratio=0.6)
    inputs = generation_batch(trainer, num_rows=8)
    assert inputs["papo_total_cells"].item() == 2 * 32 * 32
    assert torch.isfinite(inputs[MASKED_LOGPS_KEY][inputs["completion_mask"].bool()]).all()
    loss_and_grads(trainer, inputs)
    fraction = trainer._metrics["train"]["papo/masked_fraction"][-1]
    assert abs(fraction - 0.6) < 4 * math.sqrt(0.6 * 0.4 / 2048)
    assert fraction == inputs["papo_masked_cells"].item() / 2048


def test_text_only_rows_get_no_masked_pass_and_keep_the_entropy_term(tiny_qwen, tmp_path):
    trainer = _papo(
        tiny_qwen, tmp_path, dataset=make_dataset(2, with_text_only_row=True), der_loss_weight1=0.1, loss_type="bnpo"
    )
    inputs = generation_batch(trainer, num_rows=8)
    assert inputs[HAS_MASKED_VIEW_KEY].tolist() == [True] * 4 + [False] * 4
    assert torch.isnan(inputs[MASKED_LOGPS_KEY][4:]).all()
    loss, grads = loss_and_grads(trainer, inputs)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
    metrics = trainer._metrics["train"]
    assert metrics["papo/nonfinite_masked_tokens"][-1] == 0 and metrics["papo/masked_view_rows"][-1] == 4
    assert math.isfinite(metrics["papo/kl_prc"][-1])


def test_nonfinite_masked_logps_are_dropped_and_counted(tiny_qwen, tmp_path):
    trainer = _papo(tiny_qwen, tmp_path, perception_loss_weight=1.0)
    inputs = generation_batch(trainer)
    mask = inputs["completion_mask"].bool()
    poisoned = inputs[MASKED_LOGPS_KEY].clone()
    first = mask[0].nonzero()[:2, 0]
    poisoned[0, first[0]], poisoned[0, first[1]] = float("nan"), float("inf")
    clean_rows = {**inputs, MASKED_LOGPS_KEY: poisoned}
    loss, grads = loss_and_grads(trainer, clean_rows)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
    assert trainer._metrics["train"]["papo/nonfinite_masked_tokens"][-1] == 2
    kl, _, kl_mask = papo_token_terms(_policy_logps(trainer, inputs), poisoned, inputs["completion_mask"])
    assert kl_mask.sum() == mask.sum() - 2
    assert trainer._metrics["train"]["papo/kl_prc"][-1] == pytest.approx((kl.sum() / kl_mask.sum()).item(), rel=1e-5)


def test_trl_delta_is_the_authors_dual_clip(tiny_qwen, tmp_path):
    """The authors' PPO loss (verl `compute_policy_loss`, token mean) with clip 0.2/0.3 and dual-clip 3 equals TRL's
    loss with epsilon 0.2, epsilon_high 0.3, delta 3 and loss_type "bnpo", on ratios from 0.05 to 20 and both signs."""
    trainer = _papo(
        tiny_qwen,
        tmp_path,
        perception_loss_weight=0.0,
        epsilon=0.2,
        epsilon_high=0.3,
        delta=3.0,
        loss_type="bnpo",
    )
    inputs = generation_batch(trainer)
    logps = _policy_logps(trainer, inputs).detach()
    mask = inputs["completion_mask"].float()
    log_ratio = torch.linspace(math.log(0.05), math.log(20.0), logps.numel()).reshape(logps.shape)
    advantages = torch.tensor([1.5, -2.0, 0.7, -0.4])
    batch = {**inputs, "old_per_token_logps": logps - log_ratio, "advantages": advantages}
    loss = trainer.compute_loss(trainer.model, batch)

    ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))
    clipped = torch.exp(log_ratio.clamp(math.log(0.8), math.log(1.3)))
    a = advantages.unsqueeze(1)
    higher = torch.max(-a * ratio, -a * clipped)
    lower = torch.min(higher, -a * 3.0)
    authors = torch.where(a < 0, lower, higher)
    expected = (authors * mask).sum() / (mask.sum() + 1e-8)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert (ratio * (a < 0) > 3.0).any()  # the dual clip is exercised


def test_config_validation():
    common = {"output_dir": "/tmp/papo-config-test", "use_cpu": True, "report_to": "none"}
    for field, value, message in [
        ("perception_loss_weight", -0.1, "perception_loss_weight must be"),
        ("der_loss_weight1", float("nan"), "der_loss_weight1 must be"),
        ("mask_ratio", 1.5, "mask_ratio must be in"),
        ("mask_patch_size", 0, "mask_patch_size must be"),
    ]:
        with pytest.raises(ValueError, match=message):
            PAPOConfig(**common, **{field: value})
    args = PAPOConfig(**common)
    assert (args.perception_loss_weight, args.der_loss_weight1, args.mask_ratio, args.mask_patch_size) == (
        0.02,
        0.0,
        0.6,
        14,
    )
    assert (args.beta, args.num_generations, args.per_device_train_batch_size) == (0.01, 5, 10)
    shared = {"beta", "num_generations", "per_device_train_batch_size"}
    cppo = CPPOConfig(**common)
    assert {name: getattr(cppo, name) for name in shared} == {name: getattr(args, name) for name in shared}


def test_trainer_needs_a_papo_config(tiny_qwen):
    with pytest.raises(TypeError, match="PAPOTrainer needs a PAPOConfig, got CPPOConfig"):
        PAPOTrainer(
            model=str(tiny_qwen),
            reward_funcs=hashed_reward,
            args=CPPOConfig(output_dir="/tmp/papo-type-test", use_cpu=True, report_to="none"),
            train_dataset=make_dataset(),
        )


def test_eval_logs_papo_metrics(tiny_qwen, tmp_path):
    trainer = _papo(
        tiny_qwen,
        tmp_path,
        eval_dataset=make_dataset(4),
        eval_strategy="steps",
        eval_steps=1,
        per_device_eval_batch_size=4,
        max_steps=1,
    )
    metrics = trainer.evaluate()
    assert "eval_papo/kl_prc" in metrics and "eval_papo/masked_fraction" in metrics


def test_model_card_names_papo(tiny_qwen, tmp_path):
    trainer = _papo(tiny_qwen, tmp_path)
    trainer.create_model_card(dataset_name="synthetic", tags=["papo"])
    card = (tmp_path / "PAPOTrainer" / "README.md").read_text()
    assert "PAPO" in card and "Perception-Aware Policy Optimization for Multimodal Reasoning" in card


def test_training_script_runs_the_papo_recipe(tiny_qwen, tmp_path):
    """`cppo-train --config recipes/tiny/papo/...` in process: the recipe's `method: papo` builds a PAPOTrainer, which
    trains, logs its metrics, saves, and writes a model card naming PAPO and the recipe."""
    import json
    from pathlib import Path

    from cppo_trl.recipe import parse_args
    from cppo_trl.scripts import train

    recipe = Path(__file__).resolve().parents[1] / "recipes/tiny/papo/config_synthetic_cpu.yaml"
    out = tmp_path / "run"
    argv = ["--config", str(recipe), "--model_name_or_path", str(tiny_qwen), "--output_dir", str(out)]
    argv += ["--max_steps", "2", "--save_steps", "2", "--max_completion_length", "8", "--synthetic_num_train", "8"]
    script_args, args, model_args = parse_args(argv)
    assert isinstance(args, PAPOConfig) and script_args.method == "papo"
    train.main(script_args, args, model_args, recipe=str(recipe))
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history if "papo/kl_prc" in h] == [1, 2]
    card = (out / "README.md").read_text()
    assert "PAPO" in card and "2507.06448" in card and str(recipe) in card


def test_training_features_together(tiny_qwen, tmp_path):
    """β > 0 (reference model), μ = 2, gradient accumulation, gradient checkpointing (off for the masked pass, as TRL
    turns it off for its own no-grad pass), η on, the authors' dual-clip and token-mean loss."""
    trainer = _papo(
        tiny_qwen,
        tmp_path,
        beta=0.04,
        num_iterations=2,
        gradient_accumulation_steps=2,
        steps_per_generation=2,
        gradient_checkpointing=True,
        der_loss_weight1=0.05,
        delta=3.0,
        loss_type="bnpo",
        max_steps=2,
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "kl" in h]
    assert logs and all(math.isfinite(h["papo/kl_prc"]) and math.isfinite(h["loss"]) for h in logs)


def test_lora_trains_adapters_only(tiny_qwen, tmp_path):
    from peft import LoraConfig

    args = PAPOConfig(output_dir=str(tmp_path), beta=0.0, max_steps=2, perception_loss_weight=0.5, **COMMON)
    trainer = PAPOTrainer(
        model=str(tiny_qwen),
        reward_funcs=hashed_reward,
        args=args,
        train_dataset=make_dataset(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before if "lora_" not in n)
    assert any(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n)
    assert all(h["papo/masked_view_rows"] == 4 for h in trainer.state.log_history if "loss" in h)
