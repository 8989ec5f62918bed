"""GPU acceptance check (`make gpu-check`): GRPO vs CPPO (paper and released presets), full fine-tune and LoRA.

What it runs, offline, on one GPU: a Qwen2.5-VL-3B-shaped model with random weights (real text and vision shapes,
vocabulary 151936; the tiny tokenizer and processor of `cppo_trl.testing`), bf16, gradient checkpointing, sdpa
attention, completions forced to `--completion-length` tokens (EOS suppressed by `min_new_tokens`, so every variant
pays for the same number of tokens). For each mode (full fine-tune, LoRA) and variant (TRL's `GRPOTrainer`, CPPO
paper preset, CPPO released preset) it trains `--warmup + --steps` real optimizer steps through `Trainer.train()` and
reports, over the measured steps:

* whole step (generation, scoring, views, loss, backward, optimizer) and loss phase (`training_step` minus
  `_prepare_inputs`: forward + backward of the loss, CPPO's extra passes included), as medians and ratios to GRPO;
* the gated fraction (`cppo/gated_fraction`), the completion length, the gradient norm;
* the peak memory (`torch.cuda.max_memory_allocated` over training) and its ratio to GRPO;
* the prompt/vision-token check of every generated batch: image-pad tokens in each row's prompt ids against its
  images' `image_grid_thw` (t·h·w / merge²), and `pixel_values` rows against the grids.

Then the engines (`--engines`), each reported as passed, failed or skipped with its reason, never as passed when it did
not run:

* `vllm_colocate`: CPPO trains 2 steps with vLLM colocated (tiny Qwen2.5-VL, head_dim 32, the processor at a smaller
  pixel budget than the checkpoint's), the guard checking every prompt's ids; passed when every prompt was checked and
  vLLM's sampling log-probs match the trainer's (TRL's `sampling/sampling_logp_difference/max` < 1e-2 in bf16);
* `zero3_uneven_gating`: 2 GPUs, DeepSpeed ZeRO-3 with every parameter sharded, the two-process cases of
  `tests/scripts/rank_cases.py` where one rank is gated and the other not, or runs fewer view passes.

It writes `gpu_check.json` and `gpu_check.md` to `--out`; the JSON says `"complete": false` (and the exit code is 1)
if a variant or an engine that ran failed, a variant was skipped for the time budget, or a vision-token mismatch was
found. `--device cpu --tiny` is
the few-second smoke mode the test suite runs. Needs PyTorch and cppo_trl's wheels (`make gpu-wheels`), no network.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any


os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built locally; never wait on the Hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402


logger = logging.getLogger("cppo_gpu_check")

MODES = ("full", "lora")
VARIANTS = ("grpo", "cppo_paper", "cppo_released")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ----------------------------------------------------------------------------------------------- vision-token check
def vision_token_mismatches(batch: dict[str, Any], image_token_id: int, merge_size: int) -> tuple[int, list[str]]:
    """(rows checked, problems) for one generated batch: each row's image-pad tokens must equal the vision tokens its
    images produce (t·h·w / merge² per `image_grid_thw` row), and `pixel_values` must hold t·h·w patches in total."""
    grids = batch.get("image_grid_thw")
    if grids is None:
        return 0, []
    prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"]
    counts = ((prompt_ids == image_token_id) & (prompt_mask != 0)).sum(dim=1).tolist()  # (B,)
    per_image = (grids.prod(dim=-1) // (merge_size * merge_size)).tolist()
    num_images = batch.get("num_images")
    if num_images is None:
        num_images = [1 if count else 0 for count in counts]
    num_images = [int(n) for n in (num_images.tolist() if torch.is_tensor(num_images) else num_images)]
    problems = []
    if sum(num_images) != len(per_image):
        problems.append(f"{len(per_image)} image grids for {sum(num_images)} images")
        return len(counts), problems
    start = 0
    for row, (count, n) in enumerate(zip(counts, num_images, strict=True)):
        expected = sum(per_image[start : start + n])
        start += n
        if count != expected:
            problems.append(f"row {row}: {count} image tokens in the prompt ids, {expected} from image_grid_thw")
    pixel_values = batch.get("pixel_values")
    if pixel_values is not None and pixel_values.size(0) != int(grids.prod(dim=-1).sum()):
        problems.append(f"pixel_values has {pixel_values.size(0)} patches, image_grid_thw {int(grids.prod(-1).sum())}")
    return len(counts), problems


# ---------------------------------------------------------------------------------------------------------- model
def build_model(args) -> Path:
    from cppo_trl.testing import build_tiny_vlm

    if args.tiny:
        return build_tiny_vlm("qwen2_5_vl", Path(args.model_cache) / "tiny", image_size=args.image_size)
    device, dtype = ("cuda", "bfloat16") if args.device == "cuda" else ("cpu", "float32")
    folder = Path(args.model_cache) / f"qwen2_5_vl-3b-{dtype}-px{args.image_size}"
    return build_tiny_vlm("qwen2_5_vl", folder, image_size=args.image_size, size="3b", dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------------------- data
def textured_image(seed: int, width: int, height: int) -> PIL.Image.Image:
    """Random 8-px blocks: a zoom crop or an occlusion changes it, unlike a flat colour."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(-(-height // 8), -(-width // 8), 3), dtype=np.uint8)
    pixels = np.kron(blocks, np.ones((8, 8, 1), dtype=np.uint8))[:height, :width]
    return PIL.Image.fromarray(pixels)


def make_dataset(args):
    """Prompts whose images differ in size; the first is larger than the processor's cap, so it gets resized."""
    from datasets import Dataset

    side = args.image_size
    sizes = [(2 * side, 3 * side // 2), (side, side), (3 * side // 4, side // 2), (side + 60, side - 40)]
    rows = []
    for index in range(args.prompts):
        width, height = sizes[index % len(sizes)]
        content = [{"type": "image"}, {"type": "text", "text": "How many circles are in the image? Think first."}]
        rows.append(
            {"prompt": [{"role": "user", "content": content}], "images": [textured_image(index, width, height)]}
        )
    return Dataset.from_list(rows)


def hashed_reward(completions, **kwargs) -> list[float]:
    """Deterministic reward with variance inside each group (a random model's text says nothing), so about half the
    rollouts have a positive advantage and CPPO's gate opens as it would in training."""
    texts = [c if isinstance(c, str) else json.dumps(c, default=str) for c in completions]
    return [int.from_bytes(hashlib.sha256(t.encode()).digest()[:4], "little") / 2**32 for t in texts]


# -------------------------------------------------------------------------------------------------------- trainers
def make_trainer(variant: str, mode: str, model_dir: Path, dataset, args, out_dir: Path, warmup: int):
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from cppo_trl import CPPOConfig, CPPOTrainer

    cuda = args.device == "cuda"
    common = {
        "output_dir": str(out_dir / f"{mode}-{variant}"),
        "per_device_train_batch_size": args.prompts * args.generations,
        "num_generations": args.generations,
        "max_completion_length": args.completion_length,
        "generation_kwargs": {"min_new_tokens": args.completion_length},
        "max_steps": warmup + args.steps,
        "learning_rate": 1e-5 if mode == "lora" else 1e-6,
        "beta": 0.0,
        "temperature": 1.0,
        "gradient_checkpointing": True,
        "bf16": cuda,
        "use_cpu": not cuda,
        "logging_steps": 1,
        "report_to": "none",
        "save_strategy": "no",
        "seed": args.seed,
        "model_init_kwargs": {"dtype": "bfloat16" if cuda else "float32", "attn_implementation": "sdpa"},
    }
    if variant == "grpo":
        config, trainer_cls = GRPOConfig(**common), GRPOTrainer
    else:
        preset = variant.removeprefix("cppo_")
        extra = {"loss_type": "bnpo", "delta": 3.0, "use_bias_correction_kl": False} if preset == "released" else {}
        config, trainer_cls = CPPOConfig(cppo_preset=preset, **extra, **common), CPPOTrainer
    peft_config = None
    if mode == "lora":
        peft_config = LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    return trainer_cls(
        model=str(model_dir), reward_funcs=hashed_reward, args=config, train_dataset=dataset, peft_config=peft_config
    )


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@contextmanager
def _timed(obj, name: str, sink: list[float], device: str, inspect=None):
    """Time every call of `obj.name` (instance attribute, removed afterwards); `inspect(result)` sees each result."""
    original = getattr(obj, name)

    def wrapper(*a, **kw):
        _sync(device)
        start = time.perf_counter()
        result = original(*a, **kw)
        _sync(device)
        sink.append(time.perf_counter() - start)
        if inspect is not None:
            inspect(result)
        return result

    setattr(obj, name, wrapper)
    try:
        yield
    finally:
        delattr(obj, name)


def _median(values: list[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def _logged(history: list[dict], key: str, skip: int) -> list[float]:
    values = [entry[key] for entry in history if key in entry and "train_runtime" not in entry]
    return [float(v) for v in values[skip:]]


def run_variant(variant: str, mode: str, model_dir: Path, dataset, args, out_dir: Path, warmup: int) -> dict[str, Any]:
    """Train `warmup + args.steps` real steps of one variant and measure the last `args.steps`."""
    from transformers import TrainerCallback

    trainer = make_trainer(variant, mode, model_dir, dataset, args, out_dir, warmup)
    config = trainer.model.config
    merge = trainer.processing_class.image_processor.merge_size
    steps: list[float] = []
    prepare: list[float] = []
    training_step: list[float] = []
    checks = {"rows": 0, "problems": []}

    def check(batch):
        rows, problems = vision_token_mismatches(batch, config.image_token_id, merge)
        checks["rows"] += rows
        checks["problems"] += problems

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            _sync(args.device)
            self.start = time.perf_counter()

        def on_step_end(self, *a, **kw):
            _sync(args.device)
            steps.append(time.perf_counter() - self.start)

    trainer.add_callback(StepTimer())
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with (
        _timed(trainer, "_prepare_inputs", prepare, args.device),
        _timed(trainer, "training_step", training_step, args.device),
        _timed(trainer, "_generate_and_score_completions", [], args.device, inspect=check),
    ):
        trainer.train()
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else None
    history = trainer.state.log_history
    skip = warmup
    loss_phase = [total - prep for total, prep in zip(training_step, prepare, strict=True)][skip:]
    result = {
        "mode": mode,
        "variant": variant,
        "params": sum(p.numel() for p in trainer.model.parameters()),
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "step_s": _median(steps[skip:]),
        "loss_phase_s": _median(loss_phase),
        "generation_and_scoring_s": _median(prepare[skip:]),
        "peak_memory_bytes": peak,
        "gated_fraction": _median(_logged(history, "cppo/gated_fraction", skip)),
        "completion_length": _median(_logged(history, "completions/mean_length", skip)),
        "grad_norm": _median(_logged(history, "grad_norm", skip)),
        "vision_token_rows_checked": checks["rows"],
        "vision_token_mismatches": checks["problems"],
        "measured_steps": len(steps[skip:]),
    }
    trainer.accelerator.free_memory()  # drops the accelerator's references to the model and optimizer
    del trainer
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
        # Whatever is still allocated would inflate the next run's peak: make a leak visible in the report.
        result["allocated_after_run_bytes"] = torch.cuda.memory_allocated()
    return result


# --------------------------------------------------------------------------------------------------------- report
def add_ratios(runs: list[dict[str, Any]]) -> None:
    """Whole-step, loss-phase and peak-memory ratios of each run to the GRPO run of the same mode."""
    baselines = {run["mode"]: run for run in runs if run["variant"] == "grpo"}
    for run in runs:
        base = baselines.get(run["mode"])
        for key, ratio in (
            ("step_s", "step_ratio"),
            ("loss_phase_s", "loss_phase_ratio"),
            ("peak_memory_bytes", "memory_ratio"),
        ):
            value, reference = run.get(key), base.get(key) if base else None
            run[ratio] = value / reference if value is not None and reference else None


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def markdown(payload: dict[str, Any]) -> str:
    lines = [
        f"GPU check on {payload['device_name']} (torch {payload['torch']}), model {payload['model']}, "
        f"{payload['config']['prompts']} prompts x G {payload['config']['generations']}, "
        f"{payload['config']['completion_length']}-token completions, {payload['config']['steps']} measured steps"
        + ("" if payload["complete"] else " — INCOMPLETE: " + "; ".join(payload["incomplete_reasons"])),
        "",
        "| mode | variant | step s | step / GRPO | loss phase s | loss / GRPO | gated f | completion tokens "
        "| peak GiB | memory / GRPO | vision-token mismatches |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in payload["runs"]:
        peak = run["peak_memory_bytes"] / 2**30 if run["peak_memory_bytes"] is not None else None
        lines.append(
            f"| {run['mode']} | {run['variant']} | {_fmt(run['step_s'], '.2f')} | {_fmt(run['step_ratio'], '.2f')} "
            f"| {_fmt(run['loss_phase_s'], '.2f')} | {_fmt(run['loss_phase_ratio'], '.2f')} "
            f"| {_fmt(run['gated_fraction'], '.2f')} | {_fmt(run['completion_length'], '.0f')} | {_fmt(peak, '.1f')} "
            f"| {_fmt(run['memory_ratio'], '.2f')} | {len(run['vision_token_mismatches'])} of "
            f"{run['vision_token_rows_checked']} rows |"
        )
    if payload["engines"]:
        lines += ["", "| engine | status | details |", "|---|---|---|"]
        for name, result in payload["engines"].items():
            details = ", ".join(f"{k} {v}" for k, v in result.items() if k != "status")
            lines.append(f"| {name} | {result['status']} | {details} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------- engines
ENGINES = ("vllm_colocate", "zero3_uneven_gating")
ROOT = Path(__file__).resolve().parents[1]


def _length_reward(completions, **kwargs) -> list[float]:
    return [float(len(str(c)) % 5) for c in completions]


def vllm_colocate(args, out_dir: Path) -> dict[str, Any]:
    """CPPO with vLLM colocated, 2 steps: the prompt-id guard and TRL's sampling-log-prob gap."""
    if args.device != "cuda":
        return {"status": "skipped", "reason": "needs a GPU (vLLM's GPU build)"}
    try:
        import vllm  # noqa: F401
    except ImportError:
        return {"status": "skipped", "reason": "vllm is not installed (pip install 'cppo_trl[vllm]')"}
    from cppo_trl import CPPOConfig, CPPOTrainer
    from cppo_trl.core.images import load_processor
    from cppo_trl.testing import build_tiny_vlm

    model = build_tiny_vlm("qwen2_5_vl", Path(args.model_cache) / "tiny-hd32", head_dim=32)
    config = CPPOConfig(
        output_dir=str(out_dir / "vllm"),
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=16,
        max_steps=2,
        beta=0.0,
        use_vllm=True,
        vllm_mode="colocate",
        vllm_gpu_memory_utilization=0.2,
        vllm_max_model_length=2048,
        advantage_gating=False,
        bf16=True,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
    )
    processor = load_processor(str(model), min_pixels=784, max_pixels=56 * 56 * 2)
    dataset = make_dataset(argparse.Namespace(image_size=112, prompts=2))
    trainer = CPPOTrainer(
        model=str(model), reward_funcs=_length_reward, args=config, train_dataset=dataset, processing_class=processor
    )
    trainer.train()
    history = trainer.state.log_history
    checked = sum(h.get("cppo/vllm_prompts_checked", 0) for h in history)
    gap = max(
        (h["sampling/sampling_logp_difference/max"] for h in history if "sampling/sampling_logp_difference/max" in h),
        default=None,
    )
    passed = checked == 8 and gap is not None and gap < 1e-2
    return {"status": "passed" if passed else "failed", "prompts_checked": checked, "max_logp_gap": gap}


def zero3_uneven_gating(args, out_dir: Path) -> dict[str, Any]:
    """`tests/scripts/rank_cases.py` on 2 GPUs under ZeRO-3: every rank finishes with the same logged metrics."""
    if args.device != "cuda" or torch.cuda.device_count() < 2:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return {"status": "skipped", "reason": f"needs 2 GPUs, this machine has {count}"}
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return {"status": "skipped", "reason": "deepspeed is not installed (pip install 'cppo_trl[deepspeed]')"}
    import importlib

    if str(ROOT / "tests") not in sys.path:  # the two-process launcher of the test suite, imported by name
        sys.path.insert(0, str(ROOT / "tests"))
    two_processes = importlib.import_module("two_processes")
    from cppo_trl.testing import build_tiny_vlm

    model = build_tiny_vlm("qwen2_5_vl", Path(args.model_cache) / "tiny")
    cases = ["gated_vs_none", "uneven_chunks", "no_token_selected"]
    script = ROOT / "tests" / "scripts" / "rank_cases.py"
    job = two_processes.launch(
        "zero3", script, [str(model), str(out_dir / "zero3"), "deepspeed-cuda", *cases], out_dir, 540, device="cuda"
    )
    if job.timed_out or job.returncode != 0:
        return {"status": "failed", "reason": ("timed out" if job.timed_out else "exit code") + job.output[-2000:]}
    ranks = {c: [json.loads((out_dir / "zero3" / c / f"rank{r}.json").read_text()) for r in (0, 1)] for c in cases}
    agree = all(r[0]["logs"] == r[1]["logs"] for r in ranks.values())
    dummies = {c: [x["dummy_passes"] for x in r] for c, r in ranks.items()}
    return {"status": "passed" if agree else "failed", "seconds": job.seconds, "dummy_passes": dummies}


def run_engines(args, out_dir: Path) -> dict[str, dict[str, Any]]:
    results = {}
    for name in ENGINES:
        try:
            results[name] = globals()[name](args, out_dir)
        except Exception as error:  # a failed engine must not hide the other
            logger.exception("engine check %s failed", name)
            results[name] = {"status": "failed", "reason": f"{type(error).__name__}: {error}"[:500]}
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny random model instead of the 3B shapes (smoke test)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma list of {MODES}")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {VARIANTS}")
    parser.add_argument("--steps", type=int, default=2, help="measured optimizer steps per run (after --warmup)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=0,
        help="unmeasured steps before each run's measured ones (on cuda the very first run always gets one, for "
        "CUDA and kernel initialisation; generation, the bulk of a step, has no other warm-up cost)",
    )
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step")
    parser.add_argument("--generations", type=int, default=4, help="rollouts per prompt (G)")
    parser.add_argument("--completion-length", type=int, default=1024, help="completion tokens, forced")
    parser.add_argument("--image-size", type=int, default=448, help="processor cap: one square of this side")
    parser.add_argument("--time-budget-s", type=float, default=570.0, help="no run starts that would end after this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-cache", default="~/.cache/cppo_trl/gpu_check")
    parser.add_argument("--out", default="outputs/gpu_check")
    parser.add_argument(
        "--engines",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"also check {', '.join(ENGINES)} (each reported as passed, failed or skipped)",
    )
    args = parser.parse_args(argv)
    args.model_cache = str(Path(args.model_cache).expanduser())
    for name, allowed in (("modes", MODES), ("variants", VARIANTS)):
        chosen = [item for item in getattr(args, name).split(",") if item]
        unknown = sorted(set(chosen) - set(allowed))
        if unknown or not chosen:
            parser.error(f"--{name}: unknown or empty {unknown or chosen}; choose from {allowed}")
        setattr(args, name, chosen)
    if "grpo" not in args.variants:
        parser.error("--variants must include grpo: every ratio is relative to it")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no GPU (use --device cpu --tiny for the smoke test)")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the check; returns the payload also written to --out/gpu_check.json (and .md). Exit code 1 if not clean."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    model_dir = build_model(args)
    dataset = make_dataset(args)
    runs, reasons = [], []
    durations: list[float] = []
    with tempfile.TemporaryDirectory(prefix="cppo-gpu-check-") as tmp:
        for mode in args.modes:
            for variant in args.variants:
                elapsed = time.perf_counter() - started
                if durations and elapsed + max(durations) > args.time_budget_s:
                    reasons.append(
                        f"{mode}/{variant} skipped: {elapsed:.0f} s spent, budget {args.time_budget_s:.0f} s"
                    )
                    continue
                begin = time.perf_counter()
                warmup = max(args.warmup, 1) if args.device == "cuda" and not durations else args.warmup
                try:
                    runs.append(run_variant(variant, mode, model_dir, dataset, args, Path(tmp), warmup))
                except Exception as error:  # one failed variant (e.g. out of memory) must not hide the others
                    logger.exception("%s/%s failed", mode, variant)
                    reasons.append(f"{mode}/{variant} failed: {type(error).__name__}: {error}"[:500])
                    gc.collect()
                    if args.device == "cuda":
                        torch.cuda.empty_cache()
                durations.append(time.perf_counter() - begin)
        engines = run_engines(args, Path(tmp)) if args.engines else {}
    add_ratios(runs)
    for run in runs:
        if run["vision_token_mismatches"]:
            reasons.append(
                f"{run['mode']}/{run['variant']}: {len(run['vision_token_mismatches'])} vision-token mismatches"
            )
        if run["vision_token_rows_checked"] == 0:
            reasons.append(f"{run['mode']}/{run['variant']}: no generated batch was checked")
        if run["measured_steps"] < args.steps:
            reasons.append(f"{run['mode']}/{run['variant']}: {run['measured_steps']} of {args.steps} steps measured")
        if run["grad_norm"] is None or not math.isfinite(run["grad_norm"]):
            reasons.append(f"{run['mode']}/{run['variant']}: gradient norm {run['grad_norm']}")
    reasons += [
        f"engine {name} failed: {r.get('reason', r)}"[:500] for name, r in engines.items() if r["status"] == "failed"
    ]
    payload = {
        "complete": not reasons,
        "incomplete_reasons": reasons,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "model": "tiny Qwen2.5-VL" if args.tiny else "Qwen2.5-VL-3B shapes, random weights",
        "wall_s": time.perf_counter() - started,
        "config": {k: v for k, v in vars(args).items() if k != "model_cache"},
        "runs": runs,
        "engines": engines,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    table = markdown(payload)
    (out / "gpu_check.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    return payload


if __name__ == "__main__":
    sys.exit(0 if main(sys.argv[1:])["complete"] else 1)
