"""The released recipes reproduce the authors' verl run (README "Released-run parity"), tested against their rules.

Every expected value here is derived from the authors' code (public repository vbdi/cppo, files named per test), written
out in the test, never by calling the implementation under test: the launch scripts' settings, verl's dual-clip policy
loss, `low_var_kl` and token-mean, their reward (mathruler + full-match format regex), their float32 top-K count,
their data preprocessing (one image per row, min side 28, prompt string) and `filter_overlong_prompts`.
"""

import logging
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_trainer
from PIL import Image
from transformers import AutoProcessor
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
from trl import GRPOTrainer

from cppo_trl.core.images import PixelBudget
from cppo_trl.core.perception import perception_token_count, select_perception_tokens
from cppo_trl.data import loaders
from cppo_trl.data.rewards import released_reward
from cppo_trl.data.script_args import CPPOScriptArguments
from cppo_trl.data.splits import filter_long_prompts, load_split
from cppo_trl.recipe import make_parser
from cppo_trl.trainer.cppo_config import CPPOConfig


ROOT = Path(__file__).resolve().parents[1]
GPUS = 8
# Authors' instruction (verl/examples/data_preprocess/virl39k.py), typed out here.
INSTRUCTION = (
    "You FIRST think about the reasoning process as an internal monologue and then provide the final answer. "
    "The reasoning process MUST BE enclosed within <think> </think> tags. "
    "The final answer MUST BE put in \\boxed{}."
)


def parse(path: Path):
    return make_parser().parse_args_and_config(args=["--config", str(path), "--use_cpu", "true"])


# ------------------------------------------------------------------------------------------------ recipe settings
# verl/examples/cppo/run_qwen2_5_vl-{3b,7b}_virl39k.sh: ppo_micro_batch_size_per_gpu 8 (3B) / 2 (7B), 8 GPUs,
# train_batch_size 512 prompts, ppo_mini_batch_size 64 prompts, rollout.n 5.
RELEASED = {"3B": 8, "7B": 2}


@pytest.mark.parametrize("size", sorted(RELEASED))
def test_released_recipe_is_the_authors_run(size):
    script_args, args, model_args = parse(
        ROOT / f"recipes/Qwen2.5-VL-{size}-Instruct/cppo/config_virl39k_released.yaml"
    )
    micro = RELEASED[size]
    assert model_args.model_name_or_path == f"Qwen/Qwen2.5-VL-{size}-Instruct" and model_args.dtype == "bfloat16"
    # Batch geometry: micro-batch per GPU, verl's gradient accumulation (mini-batch per GPU / micro), 8 optimizer
    # steps per 512-prompt generation batch, each rollout used once.
    assert args.per_device_train_batch_size == micro
    assert args.gradient_accumulation_steps == 64 * 5 // GPUS // micro
    assert args.steps_per_generation == 512 * 5 // GPUS // micro
    assert args.num_generations == 5 and args.num_iterations == 1
    assert args.steps_per_generation // args.gradient_accumulation_steps == 512 // 64
    # Loss: per-micro-batch token-mean (bnpo), clip 0.2 both sides, dual-clip 3, k3 KL 0.01 without the ratio factor,
    # no rollout importance-sampling correction, no entropy bonus, truncated rollouts kept, group-std advantages.
    assert args.loss_type == "bnpo"
    assert args.epsilon == 0.2 and args.epsilon_high in (None, 0.2) and args.delta == 3.0
    assert args.beta == 0.01 and args.use_bias_correction_kl is False
    assert args.use_vllm and args.vllm_importance_sampling_correction is False
    assert args.entropy_coef == 0.0 and args.top_entropy_quantile == 1.0 and not args.mask_truncated_completions
    assert args.scale_rewards == "group" and args.importance_sampling_level == "token"
    # Optimizer: AdamW lr 1e-6, weight decay 0.01, constant schedule without warmup, grad clip 1.0.
    assert args.learning_rate == 1e-6 and args.weight_decay == 0.01 and args.max_grad_norm == 1.0
    assert args.lr_scheduler_type == "constant" and args.get_warmup_steps(1000) == 0
    assert (args.adam_beta1, args.adam_beta2, args.adam_epsilon) == (0.9, 0.999, 1e-8)
    # Rollouts and length: temperature 1, no top-p/top-k, 4096-token responses, 2 epochs.
    assert args.temperature == 1.0 and args.top_p == 1.0 and args.top_k in (0, None, -1)
    assert args.max_completion_length == 4096 and args.num_train_epochs == 2
    # CPL: λ 0.01, τ 0.1, top 50%% of positive-ΔH tokens by the normalised score, float32 k, advantage gating, k3.
    assert args.cppo_preset == "released" and args.cpl_weight == 0.01 and args.cpl_temperature == 0.1
    assert args.perception_top_fraction == 0.5 and args.perception_score == "normalized"
    assert args.perception_k_rule == "float32" and args.cpl_divergence == "k3"
    assert args.cpl_aggregation == "selected_tokens" and args.advantage_gating and args.perception_token_selection
    # Data and reward.
    assert script_args.dataset_name == "TIGER-Lab/ViRL39K"
    assert script_args.max_images_per_row == 1 and script_args.max_prompt_tokens == 512
    assert script_args.min_image_side == 28 and script_args.prompt_layout == "released"
    assert script_args.reward_funcs == ["cppo_released"] and args.reward_weights is None
    assert args.bf16 and args.gradient_checkpointing
    # Validation on Geometry3K test every `test_freq` generation batches (31 for 3B, 10 for 7B), like the launch script.
    assert (script_args.eval_dataset_name, script_args.eval_dataset_split) == ("hiyouga/geometry3k", "test")
    test_freq = {"3B": 31, "7B": 10}[size]
    assert args.eval_strategy == "steps" and args.eval_steps == test_freq * args.steps_per_generation // (
        args.gradient_accumulation_steps
    )
    assert args.save_steps == args.eval_steps  # verl save_freq = test_freq in both scripts


@pytest.mark.parametrize("size", ["3B", "7B"])
def test_paper_recipes_keep_multi_image_rows(size):
    path = ROOT / f"recipes/Qwen2.5-VL-{size}-Instruct/cppo/config_virl39k.yaml"
    script_args, _, _ = parse(path)
    assert script_args.max_images_per_row is None and script_args.max_prompt_tokens is None
    assert "Multi-image rows are kept (our choice" in path.read_text()


# ------------------------------------------------------------------------------------------------------- reward
# verl/recipe/cppo/reward.py: 0.9 * grade_answer(extract_boxed_content(s), gt) + 0.1 * fullmatch(FORMAT, s, DOTALL),
# FORMAT = r"<think>.*</think>.*\\boxed\{.*\}.*"; ground truth = extract_boxed_content(answer) (virl39k.py).
# extract_boxed_content takes the LAST "\boxed{" (exact spelling), balances braces, and returns "None" if unbalanced.
REWARD_CASES = [
    # (completion, solution, expected, why)
    (r"<think>a</think> \boxed{5}", "5", 1.0, "correct and formatted"),
    (r"  <think>a</think> \boxed{5}", "5", 0.9, "leading whitespace: fullmatch must start at <think>"),
    ("\n<think>a</think> \\boxed{5}", "5", 0.9, "leading newline, same"),
    (r"Sure. <think>a</think> \boxed{5}", "5", 0.9, "text before <think>"),
    (r"<think>a</think><think>b</think> \boxed{5}", "5", 1.0, "several think blocks match .*"),
    ("<think>\nline\n</think>\n\\boxed{5}\nDone.", "5", 1.0, "DOTALL: newlines anywhere"),
    (r"<think>a</think> \boxed{\frac{1}{2}}", r"\frac{1}{2}", 1.0, "nested braces extracted whole"),
    (r"<think>a</think> \boxed{\frac{1}{2}}", r"\boxed{\frac{1}{2}}", 1.0, "boxed ground truth is unboxed first"),
    (r"<think>a</think> \boxed{2/4}", r"\frac{1}{2}", 0.1, "mathruler refuses unreduced fractions"),
    (r"<think>a</think> \boxed{0.5}", r"\frac{1}{2}", 1.0, "sympy: 1/2 - 0.5 simplifies to 0"),
    (r"<think>a</think> 5", "5", 0.0, "no box: extracts 'None', no format"),
    (r"<think>a</think> \boxed{}", "5", 0.1, "empty box: wrong, but the regex matches"),
    (r"<think>\boxed{5}</think> so", "5", 0.9, "box only inside think: correct, format needs it after </think>"),
    (r"<think>a</think> \boxed{3} no, \boxed{5}", "5", 1.0, "the last box wins"),
    (r"<think>a</think> \boxed{5} and \boxed{6", "5", 0.1, "unbalanced last box: 'None', though \\boxed{5} exists"),
    (r"<think>a</think> \boxed {5}", "5", 0.0, "'\\boxed {' with a space is not a box for either rule"),
    (r"<think> \boxed{5}", "5", 0.9, "unclosed think"),
    (r"\boxed{5}", "5", 0.9, "no think at all"),
]


@pytest.mark.parametrize(("completion", "solution", "expected", "why"), REWARD_CASES, ids=[c[3] for c in REWARD_CASES])
def test_released_reward_scores_like_the_authors(completion, solution, expected, why):
    chat = [{"role": "assistant", "content": completion}]
    assert released_reward([completion, chat], solution=[solution, solution]) == pytest.approx([expected] * 2)


def test_released_reward_times_out_instead_of_hanging(monkeypatch):
    import sympy

    from cppo_trl.data import rewards

    def slow_simplify(expression):
        import time

        time.sleep(5)
        return expression

    monkeypatch.setattr(sympy, "simplify", slow_simplify)
    monkeypatch.setattr(rewards, "RELEASED_GRADE_TIMEOUT_S", 0.2)
    import time

    start = time.perf_counter()
    # x + x vs 2*x goes to sympy.simplify (not equal as strings); with the hang it scores accuracy 0, format 0.1.
    assert released_reward([r"<think>a</think> \boxed{x + x}"], solution=["2*x"]) == [pytest.approx(0.1)]
    assert time.perf_counter() - start < 3


# ---------------------------------------------------------------------------------------------------------- k rule
# verl/recipe/cppo/cppo_dp_actor.py: ks = (counts.float() * top_percent).clamp(min=1).long(): a float32 product.
# Paper: k = max(1, floor(K * n+)) with K the decimal written in the config.
def authors_k(n: int, k_fraction: float) -> int:
    return max(1, int(np.float32(n) * np.float32(k_fraction)))  # numpy float32 product: rounded to float32


def exact_k(n: int, k_fraction: str) -> int:
    return max(1, math.floor(n * Fraction(k_fraction)))


K_CASES = [
    # (n+, K, exact, float32)
    (75, "0.84", 63, 62),  # 75 * 0.84 = 63 exactly; float32(0.84) * 75 rounds to 62.99999...
    (100, "0.53", 53, 52),
    (150, "0.42", 63, 62),
    (180, "0.65", 117, 116),
    (50, "0.58", 29, 29),  # agree (a float64 product would give 28)
    (180, "0.35", 63, 63),  # agree (float64: 62)
    (10, "0.7", 7, 7),  # agree: float32(0.7) * 10 rounds up to exactly 7.0
    (1000, "0.5", 500, 500),  # K = 0.5, the recipes' value: always equal
    (3, "0.5", 1, 1),
    (1, "0.3", 1, 1),  # floor 0, clamped to 1
]


@pytest.mark.parametrize(("n", "fraction", "exact", "float32"), K_CASES)
def test_k_rule(n, fraction, exact, float32):
    assert (exact_k(n, fraction), authors_k(n, float(fraction))) == (exact, float32)  # the table is right
    counts = torch.tensor([n])
    assert max(1, int(perception_token_count(counts, float(fraction), "exact"))) == exact
    assert max(1, int(perception_token_count(counts, float(fraction), "float32"))) == float32
    # Through the selection: n+ distinct positive ΔH among negatives and masked positions.
    delta = torch.cat([torch.linspace(1.0, 2.0, n), -torch.ones(5), torch.full((3,), 5.0)])
    mask = torch.cat([torch.ones(n + 5), torch.zeros(3)])
    anchor = torch.ones_like(delta)
    for rule, expected in (("exact", exact), ("float32", float32)):
        kept = select_perception_tokens(anchor[None], (anchor + delta)[None], mask[None], float(fraction), "raw", rule)
        assert int(kept.sum()) == expected


def test_k_rule_is_preset_governed():
    common = {"output_dir": "unused", "use_cpu": True}
    assert CPPOConfig(**common).perception_k_rule == "exact"
    assert CPPOConfig(cppo_preset="released", **common).perception_k_rule == "float32"
    assert CPPOConfig(cppo_preset="released", perception_k_rule="exact", **common).perception_k_rule == "exact"
    with pytest.raises(ValueError, match="perception_k_rule"):
        CPPOConfig(perception_k_rule="float64", **common)


# ------------------------------------------------------------------------------- policy loss, dual-clip, KL, bnpo
def verl_policy_loss(logp, old, ref, advantages, mask, clip=0.2, clip_c=3.0, kl_coef=0.0, accumulation=1):
    """verl compute_policy_loss_vanilla (core_algos.py) + kl_penalty('low_var_kl') as cppo_dp_actor.py adds them:
    token-mean over the micro-batch (agg_loss with an empty global_batch_info), times 1/gradient_accumulation."""
    advantages = advantages[:, None]
    ratio = torch.exp(torch.clamp(logp - old, -20.0, 20.0))
    losses1 = -advantages * ratio
    losses2 = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    clipped1 = torch.maximum(losses1, losses2)
    clipped2 = torch.minimum(-advantages * clip_c, clipped1)
    pg = torch.where(advantages < 0, clipped2, clipped1)
    pg_loss = (pg * mask).sum() / mask.sum()
    kl = torch.clamp(ref - logp, -20, 20)
    kld = torch.clamp(torch.exp(kl) - kl - 1, -10, 10)
    kl_loss = (kld * mask).sum() / (mask.sum() + 1e-8)
    return (pg_loss + kl_coef * kl_loss) / accumulation


@pytest.fixture(scope="module")
def grpo(tiny_vlm, tmp_path_factory):
    """A real TRL 1.16 GRPOTrainer with the released loss settings; its log-prob pass is replaced per call."""
    trainer = make_trainer(
        tiny_vlm("qwen2_5_vl"),
        tmp_path_factory.mktemp("grpo"),
        trainer_cls=GRPOTrainer,
        loss_type="bnpo",
        delta=3.0,
        beta=0.01,
        use_bias_correction_kl=False,
    )
    trainer.model.train()
    return trainer


# Ratios covering every branch: < 0.8, 0.8..1.2, 1.2..3, > 3, for A < 0 (row 0) and A > 0 (row 1).
RATIOS = torch.tensor([0.3, 0.7, 0.9, 1.0, 1.1, 1.5, 2.5, 2.99, 3.5, 8.0], dtype=torch.float64)


def trl_loss(trainer, logp, old, ref, advantages, mask, accumulation):
    """TRL's own `_compute_loss` on given log-probs: returns the loss and its gradient w.r.t. the log-probs."""
    logp = logp.clone().requires_grad_(True)
    rows, length = logp.shape
    trainer._get_per_token_logps_and_entropies = lambda *a, **kw: (logp, torch.zeros_like(logp), None)
    trainer.current_gradient_accumulation_steps = accumulation
    inputs = {
        "prompt_ids": torch.ones(rows, 1, dtype=torch.long),
        "prompt_mask": torch.ones(rows, 1, dtype=torch.long),
        "completion_ids": torch.ones(rows, length, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": advantages,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
    }
    try:
        loss = trainer._compute_loss(trainer.model, inputs)
    finally:
        del trainer._get_per_token_logps_and_entropies
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.detach(), grad


def _batch():
    old = torch.log(torch.linspace(0.05, 0.6, RATIOS.numel(), dtype=torch.float64)).repeat(2, 1)
    logp = old + torch.log(RATIOS)
    advantages = torch.tensor([-1.5, 0.8], dtype=torch.float64)
    mask = torch.ones(2, RATIOS.numel(), dtype=torch.float64)
    mask[1, -1] = 0  # a padded position
    return logp, old, advantages, mask


def test_trl_delta_is_verl_dual_clip(grpo):
    """delta=3 + bnpo reproduce verl's dual-clip loss and gradient on every branch; without delta they differ."""
    logp, old, advantages, mask = _batch()
    ref = logp.detach().clone()  # KL term and its gradient are exactly 0 here
    loss, grad = trl_loss(grpo, logp, old, ref, advantages, mask, accumulation=4)
    expected_logp = logp.clone().requires_grad_(True)
    expected = verl_policy_loss(expected_logp, old, ref, advantages, mask, kl_coef=0.01, accumulation=4)
    (expected_grad,) = torch.autograd.grad(expected, expected_logp)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)
    # The dual-clip branch (A < 0, r > 3) is flat: zero gradient in both.
    assert torch.all(grad[0, RATIOS > 3] == 0) and torch.all(grad[0, (RATIOS > 1.2) & (RATIOS < 3)] != 0)

    grpo.args.delta = None
    try:
        loss_without, _ = trl_loss(grpo, logp, old, ref, advantages, mask, accumulation=4)
    finally:
        grpo.args.delta = 3.0
    assert loss_without > loss + 1e-3  # plain clipping charges -A*r for r > 3: the test can fail


def test_trl_kl_without_bias_correction_is_verl_low_var_kl(grpo):
    """With use_bias_correction_kl=False TRL's KL term is verl's low_var_kl inside its clamps; beyond them verl caps
    the per-token KL at 10 (README: not expressible in TRL 1.16)."""
    logp, old, advantages, mask = _batch()
    ref = logp.detach() + torch.linspace(-1.0, 1.5, RATIOS.numel(), dtype=torch.float64)  # k3 <= 2.0 < 10
    loss, grad = trl_loss(grpo, logp, old, ref, advantages, mask, accumulation=2)
    expected_logp = logp.clone().requires_grad_(True)
    expected = verl_policy_loss(expected_logp, old, ref, advantages, mask, kl_coef=0.01, accumulation=2)
    (expected_grad,) = torch.autograd.grad(expected, expected_logp)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-7, atol=1e-10)  # verl's +1e-8 in the token count
    torch.testing.assert_close(grad, expected_grad, rtol=1e-7, atol=1e-10)

    far = logp.detach() + 3.0  # exp(3) - 3 - 1 = 16.09: verl clamps to 10
    loss_far, _ = trl_loss(grpo, logp, old, far, advantages, mask, accumulation=1)
    verl_far = verl_policy_loss(logp, old, far, advantages, mask, kl_coef=0.01)
    assert float(loss_far - verl_far) == pytest.approx(0.01 * (math.exp(3) - 4 - 10), rel=1e-6)

    grpo.args.use_bias_correction_kl = True
    try:
        loss_biased, _ = trl_loss(grpo, logp, old, ref, advantages, mask, accumulation=2)
    finally:
        grpo.args.use_bias_correction_kl = False
    assert abs(float(loss_biased - loss)) > 1e-4  # TRL's default multiplies the KL by the ratio: not verl's


# ------------------------------------------------------------------------------------------------ data and prompts
def test_released_prompt_layout_is_the_authors_string():
    """virl39k.py: problem = question, with "<image>\\n" prepended when absent; prompt = problem + " " + instruction;
    cppo_dataset.py splits it at "<image>" keeping every non-empty segment."""

    def rendered(question, images=1):
        messages = loaders.build_prompt(question, images, layout="released")
        return "".join("<image>" if p["type"] == "image" else p["text"] for p in messages[0]["content"])

    for question in ("What is x?", "<image>\nWhat is x?", "Look: <image>", "A <image> B", "  spaced  "):
        authors = (question if "<image>" in question else "<image>\n" + question) + " " + INSTRUCTION
        assert rendered(question) == authors
    content = loaders.build_prompt("Look: <image>", 1, layout="released")[0]["content"]
    assert [p["type"] for p in content] == ["text", "image", "text"]  # the instruction stays after the image
    assert loaders.build_prompt("Look: <image>", 1)[0]["content"][-1] == {"type": "image"}  # ours: suffix before it
    with pytest.raises(ValueError, match="placeholder"):
        loaders.build_prompt("<image> and <image>", 1, layout="released")


@pytest.mark.parametrize(("size", "expected"), [((10, 40), (28, 112)), ((20, 100), (28, 140)), ((40, 7), (160, 28))])
def test_min_side_upscale_is_the_authors(size, expected):
    """virl39k.py resize_min_side: scale = max(28/w, 28/h), sides int(round(side * scale)), LANCZOS."""
    image = Image.new("RGB", size, (200, 10, 10))
    assert loaders.upscale_short_side(image, 28).size == expected
    assert loaders.upscale_short_side(Image.new("RGB", (28, 500)), 28).size == (28, 500)


def _rows(tmp_path, sizes_per_row):
    rows = []
    for index, sizes in enumerate(sizes_per_row):
        paths = []
        for position, size in enumerate(sizes):
            path = tmp_path / f"row{index}-{position}.png"
            Image.new("RGB", size, (index * 40 % 255, 90, 160)).save(path)
            paths.append(path.name)
        rows.append({"question": "<image>" * len(sizes) + "What is shown?", "answer": "\\boxed{4}", "image": paths})
    return rows


def test_script_passes_the_released_data_options(tmp_path):
    import json

    rows = _rows(tmp_path, [[(60, 50)], [(60, 50), (50, 60)], [(10, 40)], [(64, 64)]])
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    script_args = CPPOScriptArguments(
        dataset_name=str(tmp_path / "rows.jsonl"), max_images_per_row=1, min_image_side=28, prompt_layout="released"
    )
    dataset = load_split(script_args, "train", seed=0)
    assert len(dataset) == 3  # the two-image row is dropped
    assert [image.size for row in dataset["images"] for image in row] == [(60, 50), (28, 112), (64, 64)]
    assert dataset[0]["prompt"][0]["content"][1]["text"] == "What is shown? " + INSTRUCTION
    kept_all = load_split(CPPOScriptArguments(dataset_name=str(tmp_path / "rows.jsonl")), "train", seed=0)
    assert len(kept_all) == 4 and kept_all[2]["images"][0].size == (10, 40)  # defaults keep everything as is
    with pytest.raises(ValueError, match="max_images_per_row"):
        CPPOScriptArguments(max_images_per_row=0)


# ------------------------------------------------------------------------------------------- prompt-length filter
@pytest.fixture(scope="module")
def processor(tiny_vlm):
    return AutoProcessor.from_pretrained(tiny_vlm("qwen2_5_vl"), padding_side="left")


def expected_prompt_tokens(processor, row) -> int:
    """Independent count: the chat-template text tokenized with one pad per image, plus each image's merged tokens
    from transformers' smart_resize at the processor's own pixel limits."""
    image_processor = processor.image_processor
    factor = image_processor.patch_size * image_processor.merge_size
    low, high = image_processor.size["shortest_edge"], image_processor.size["longest_edge"]
    text = processor.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
    text_tokens = len(processor.tokenizer(text)["input_ids"])
    image_tokens = 0
    for image in row["images"]:
        height, width = smart_resize(image.height, image.width, factor=factor, min_pixels=low, max_pixels=high)
        image_tokens += (height // factor) * (width // factor)
    return text_tokens - len(row["images"]) + image_tokens


def test_prompt_filter_counts_like_the_processor(tmp_path, processor, caplog):
    # The tiny processor caps an image at 112 x 112 px (16 tokens): 300 x 200 is resized, 30 x 30 rounds up to 28.
    rows = loaders.convert_rows(
        _rows(tmp_path, [[(56, 56)], [(300, 200)], [(30, 30)], [(112, 56)]]), image_root=tmp_path
    )
    counts = loaders.prompt_token_counts(rows, processor)
    assert counts == [expected_prompt_tokens(processor, row) for row in rows]
    assert len(set(counts)) == 4  # four different lengths, so the threshold below is meaningful
    limit = sorted(counts)[1]  # keep the two shortest (verl keeps length <= max_prompt_length)
    with caplog.at_level(logging.WARNING, logger="cppo_trl.data.loaders"):
        kept = loaders.drop_long_prompts(rows, counts, limit)
    assert len(kept) == 2 and all(count <= limit for count in loaders.prompt_token_counts(kept, processor))
    assert f"dropped 2 of 4 rows whose processed prompt exceeds {limit} tokens" in caplog.text
    with pytest.raises(ValueError, match=f"max_prompt_tokens={min(counts) - 1} leaves no row.*{min(counts)} tokens"):
        loaders.drop_long_prompts(rows, counts, min(counts) - 1)

    # The script's glue gives the same rows (one process: counts on the main process, nothing to broadcast).
    script_args = CPPOScriptArguments(max_prompt_tokens=limit)
    training_args = CPPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True)
    assert (
        filter_long_prompts(rows, processor, script_args, "train", training_args.chat_template_kwargs)["images"]
        == kept["images"]
    )


def test_recipe_pixel_cap_never_binds_on_a_kept_row():
    """The authors count prompts at Qwen's default budget (qwen_vl_utils fetch_image: 4 to 16384 tokens of 28 x 28);
    the recipes cap images at 1280 tokens. Wherever the two budgets give different grids, the recipe's grid still has
    more than 512 image tokens, so such a row exceeds max_prompt_tokens 512 under both: the same rows are kept."""
    recipe = PixelBudget(factor=28, min_pixels=3136, max_pixels=1003520)
    authors = PixelBudget(factor=28, min_pixels=3136, max_pixels=16384 * 28 * 28)
    assert 512 * 28 * 28 == 401408 < recipe.max_pixels  # a kept row has < 512 image tokens = < 401,408 px
    sides = sorted({int(28 * 1.13**i) for i in range(60)} | {56, 57, 1000, 1003, 1004, 1416, 2000, 5000})
    differing = 0
    fewest = math.inf
    for width in sides:
        for height in sides:
            if max(width, height) / min(width, height) > 150:
                continue  # Qwen refuses aspect ratios above 200 under both budgets
            if recipe.token_grid(width, height) != authors.token_grid(width, height):
                differing += 1
                columns, rows = recipe.token_grid(width, height)
                fewest = min(fewest, columns * rows)
    assert differing > 100 and fewest > 512, (differing, fewest)


# ------------------------------------------------------------------------------------------------- flash-attention
def test_flash_attention_falls_back_to_sdpa(caplog):
    from transformers.utils import is_flash_attn_2_available

    from cppo_trl.scripts.train import resolve_attn_implementation

    if is_flash_attn_2_available():
        pytest.skip("flash-attn is installed here")
    with caplog.at_level(logging.WARNING, logger="cppo_trl.scripts.train"):
        assert resolve_attn_implementation("flash_attention_2") == "sdpa"
    assert "flash-attn package is not installed" in caplog.text
    assert resolve_attn_implementation("eager") == "eager" and resolve_attn_implementation(None) is None
