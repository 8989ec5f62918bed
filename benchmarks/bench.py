"""GRPO vs CPPO (gated) vs naive CPPO (ungated) vs PAPO cost benchmark on identical batches.

Why this design: CPPO's overhead claims (SPEC: "only gated rows pay the two extra passes") are only meaningful if the
variants see the *same* rollouts, so one `CPPOTrainer` generates and scores each batch once and the same tensors
are fed to every variant's `compute_loss` + `backward`, alternating the order every step to cancel warm-up/thermal
drift. Two phases are reported separately:

* **loss phase**: `compute_loss` forward + backward on the prepared inputs (this is where CPPO's extra passes live);
  its floor is ``1 + 2f`` with ``f`` the fraction of rows that took the two extra view passes;
* **whole step**: generation + scoring (shared, measured once) + view building (CPPO/naive only) + PAPO's masked pass
  (PAPO only) + loss phase.

PAPO pays at rollout time instead: its masked pass (mask, process, one no-grad forward of every row with the masked
image) runs on the same scored batch through `PAPOTrainer._attach_views`, timed on its own and split into building
the masked views and the forward; the forward is also compared with a no-grad forward of the same rows with the
original images (the issue's expectation: about one extra no-grad forward per rollout). PAPO's loss phase is GRPO's
plus two per-token terms on log-probs the policy pass already computes.

Memory: on CUDA the true peak (`torch.cuda.max_memory_allocated`) over forward + backward; on CPU the bytes of the
tensors autograd saves for backward during the forward (`torch.autograd.graph.saved_tensors_hooks`, unique storages,
parameters excluded), i.e. the activation memory that dominates a training step's peak.

The naive variant is the authors' released code's pass count: `advantage_gating=False`, so every row with an image
gets both view passes (and views are built for every prompt).

Run: ``python benchmarks/bench.py --sizes tiny,small --steps 6 --out outputs/bench``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch


logger = logging.getLogger("cppo_bench")

VARIANTS = ("grpo", "cppo", "lean", "naive", "papo")
RESULT_KEYS = (
    "size",
    "device",
    "params",
    "rows",
    "steps",
    "gated_fraction",
    "loss_phase_s",
    "loss_phase_ratio",
    "naive_loss_phase_ratio",
    "floor_1_plus_2f",
    "loss_phase_vs_floor",
    "whole_step_s",
    "whole_step_ratio",
    "naive_whole_step_ratio",
    "generation_s",
    "view_build_s",
    "view_build_share",
    "memory_kind",
    "memory_bytes",
    "memory_ratio",
    "naive_memory_ratio",
    "papo_loss_phase_ratio",
    "papo_whole_step_ratio",
    "papo_memory_ratio",
    "masked_pass_s",
    "masked_build_s",
    "masked_forward_s",
    "masked_forward_vs_plain_forward",
    "masked_pass_share",
)


# ----------------------------------------------------------------------------------------------------------- models
def build_model(size: str, cache_dir: Path, image_size: int) -> Path:
    """Folder with model + processor: the tiny test model, or a bigger random Qwen2.5-VL (`cppo_trl.testing` sizes:
    "small" ~45M parameters, "3b" Qwen2.5-VL-3B shapes) with the tiny model's tokenizer and processor."""
    from cppo_trl.testing import build_tiny_vlm

    if size == "tiny":
        return build_tiny_vlm("qwen2_5_vl", image_size=image_size)
    folder = build_tiny_vlm(
        "qwen2_5_vl", cache_dir / f"qwen2_5_vl-{size}-s0-px{image_size}", image_size=image_size, size=size
    )
    logger.info("%s model in %s", size, folder)
    return folder


# ------------------------------------------------------------------------------------------------------------- data
def make_rows(num: int, image_size: int, seed: int) -> list[dict[str, Any]]:
    """Conversational image prompts of the synthetic perception task."""
    from cppo_trl.data.synthetic import make_synthetic_perception_dataset

    dataset = make_synthetic_perception_dataset(num, seed=seed, image_size=image_size)
    return [dict(dataset[i]) for i in range(num)]


def hashed_reward(completions, **kwargs) -> list[float]:
    """Deterministic pseudo-random reward per completion text: gives within-group variance, so ~half the rollouts
    have a positive advantage (are gated in) and the result does not depend on what a random model writes."""
    out = []
    for completion in completions:
        text = completion if isinstance(completion, str) else json.dumps(completion, default=str)
        out.append(int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") / 2**32)
    return out


# --------------------------------------------------------------------------------------------------------- trainers
def make_trainers(model_dir: Path, args, out_dir: Path) -> dict[str, Any]:
    """One trainer per variant, each with its own copy of the same weights."""
    from trl import GRPOConfig, GRPOTrainer

    from cppo_trl.trainer.cppo_config import CPPOConfig
    from cppo_trl.trainer.cppo_trainer import CPPOTrainer
    from cppo_trl.trainer.papo_config import PAPOConfig
    from cppo_trl.trainer.papo_trainer import PAPOTrainer

    common = {
        "per_device_train_batch_size": args.prompts * args.generations,
        "num_generations": args.generations,
        "max_completion_length": args.completion_length,
        "beta": 0.0,
        "report_to": "none",
        "seed": args.seed,
        "use_cpu": args.device == "cpu",
        "bf16": args.device == "cuda",
        "gradient_checkpointing": args.gradient_checkpointing,
        "logging_steps": 1,
    }
    dataset_rows = make_rows(args.prompts, args.image_size, args.seed)
    from datasets import Dataset

    dataset = Dataset.from_list([{k: v for k, v in r.items() if k in ("prompt", "images")} for r in dataset_rows])
    trainers = {
        "grpo": GRPOTrainer(
            str(model_dir),
            hashed_reward,
            args=GRPOConfig(output_dir=str(out_dir / "grpo"), **common),
            train_dataset=dataset,
        )
    }
    # "lean": gated CPPO whose perturbed passes are recomputed in backward, one row at a time (same gradients).
    variants = {
        "cppo": {},
        "lean": {"cpl_view_checkpointing": True, "cpl_view_micro_batch_size": 1},
        "naive": {"advantage_gating": False},
    }
    for name, extra in variants.items():
        config = CPPOConfig(output_dir=str(out_dir / name), cppo_preset=args.preset, **extra, **common)
        trainers[name] = CPPOTrainer(str(model_dir), hashed_reward, args=config, train_dataset=dataset)
    # PAPO as its authors' PAPO-G: γ 0.02 on the masked image, η off (PAPOConfig defaults).
    papo_config = PAPOConfig(output_dir=str(out_dir / "papo"), **common)
    trainers["papo"] = PAPOTrainer(str(model_dir), hashed_reward, args=papo_config, train_dataset=dataset)
    for trainer in trainers.values():
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
    return trainers


@contextmanager
def _timed_method(obj, name: str, sink: list[float], clock=time.perf_counter):
    """Time every call of `obj.name` (instance-level patch, removed afterwards)."""
    original = getattr(obj, name)

    def wrapper(*a, **kw):
        start = clock()
        try:
            return original(*a, **kw)
        finally:
            sink.append(clock() - start)

    setattr(obj, name, wrapper)
    try:
        yield
    finally:
        delattr(obj, name)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _variant_inputs(inputs: dict, name: str, naive_views: list, papo_inputs: dict) -> dict:
    if name == "grpo":
        return {k: v for k, v in inputs.items() if k != "cppo_views"}
    if name == "naive":
        return {**inputs, "cppo_views": naive_views}
    if name == "papo":
        return papo_inputs
    return inputs


_CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def _loss_phase(trainer, inputs: dict, device: str, clock=time.perf_counter) -> float:
    trainer.model.zero_grad(set_to_none=True)
    _sync(device)
    start = clock()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    _sync(device)
    elapsed = clock() - start
    trainer.model.zero_grad(set_to_none=True)
    return elapsed


def _activation_bytes(trainer, inputs: dict) -> int:
    """Bytes of unique non-parameter storages autograd saves for backward during the loss forward (CPU proxy).

    `pack` hands autograd a detached alias, not the tensor itself: a saved output that packs to itself forms a cycle
    with its own `grad_fn` that outlives `del loss` (torch 2.x), which leaked ~5 GB per step on the "small" size."""
    params = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr not in seen:
            seen[ptr] = storage.nbytes()
        return tensor.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = trainer.compute_loss(trainer.model, inputs)
    del loss
    return sum(seen.values())


def _cuda_peak(trainer, inputs: dict) -> int:
    trainer.model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    trainer.compute_loss(trainer.model, inputs).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    trainer.model.zero_grad(set_to_none=True)
    return peak


def _plain_forward(trainer, inputs: dict) -> None:
    """A no-grad policy forward of every row with the original images, in TRL's micro-batches: the unit PAPO's masked
    pass is measured against."""
    from trl import GRPOTrainer

    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    keys = ("pixel_values", "image_grid_thw", "num_images", "mm_token_type_ids", "pixel_attention_mask", "image_sizes")
    with torch.no_grad():
        GRPOTrainer._get_per_token_logps_and_entropies(
            trainer,
            trainer.model,
            input_ids,
            attention_mask,
            inputs["completion_ids"].size(1),
            batch_size=trainer.args.per_device_train_batch_size,
            **{k: inputs[k] for k in keys if inputs.get(k) is not None},
        )


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def bench_size(size: str, args, work_dir: Path) -> dict[str, Any]:
    model_dir = build_model(size, Path(args.model_cache).expanduser(), args.image_size)
    trainers = make_trainers(model_dir, args, work_dir / f"run-{size}")
    cppo, naive, papo = trainers["cppo"], trainers["naive"], trainers["papo"]
    rows = make_rows(args.prompts, args.image_size, args.seed)
    n_params = sum(p.numel() for p in cppo.model.parameters())
    logger.info("%s: %d params, %d rollouts per step", size, n_params, len(rows) * args.generations)

    loss_t: dict[str, list[float]] = {v: [] for v in VARIANTS}
    memory: dict[str, list[float]] = {v: [] for v in VARIANTS}
    gen_t, view_t, naive_view_t, gated = [], [], [], []
    masked_t, masked_forward_t, plain_forward_t = [], [], []
    clock = _CLOCKS[args.clock]
    for step in range(args.steps + args.warmup):
        batch = [dict(r) for r in rows for _ in range(args.generations)]  # TRL's sampler repeats each prompt G times
        for trainer in trainers.values():
            trainer.state.global_step = step
        views_sink: list[float] = []
        _sync(args.device)
        start = clock()
        with _timed_method(cppo, "_build_views", views_sink, clock), torch.no_grad():
            inputs = cppo._generate_and_score_completions(batch)
        _sync(args.device)
        generation = clock() - start
        # Naive views for every row, built from the same rollouts, timed on their own.
        start = clock()
        naive_views = naive._build_views(cppo._rollouts, inputs)
        naive_build = clock() - start
        f = cppo._cpl_rows(inputs).numel() / inputs["completion_ids"].size(0)
        # PAPO's masked pass on the same scored batch, as `PAPOTrainer._generate_and_score_completions` runs it.
        papo_inputs = {k: v for k, v in inputs.items() if k != "cppo_views"}
        forward_sink: list[float] = []
        _sync(args.device)
        start = clock()
        with _timed_method(papo, "_view_forward", forward_sink, clock):
            papo._attach_views(cppo._rollouts, papo_inputs)
        _sync(args.device)
        masked_pass = clock() - start
        start = clock()
        _plain_forward(papo, papo_inputs)
        _sync(args.device)
        plain_forward = clock() - start

        turn = step % len(VARIANTS)
        order = VARIANTS[turn:] + VARIANTS[:turn]  # rotate so no variant always runs first
        step_loss = {
            name: _loss_phase(
                trainers[name], _variant_inputs(inputs, name, naive_views, papo_inputs), args.device, clock
            )
            for name in order
        }
        step_mem = {}
        for name in order:
            variant_inputs = _variant_inputs(inputs, name, naive_views, papo_inputs)
            if args.device == "cuda":
                step_mem[name] = _cuda_peak(trainers[name], variant_inputs)
            else:
                step_mem[name] = _activation_bytes(trainers[name], variant_inputs)
        logger.info(
            "step %d: f=%.2f loss %s views %.3fs gen %.3fs",
            step,
            f,
            {k: round(v, 3) for k, v in step_loss.items()},
            sum(views_sink),
            generation,
        )
        if step < args.warmup:
            continue
        gen_t.append(generation - sum(views_sink))
        view_t.append(sum(views_sink))
        naive_view_t.append(naive_build)
        masked_t.append(masked_pass)
        masked_forward_t.append(sum(forward_sink))
        plain_forward_t.append(plain_forward)
        gated.append(f)
        for name in VARIANTS:
            loss_t[name].append(step_loss[name])
            memory[name].append(step_mem[name])

    f = _median(gated)
    loss = {k: _median(v) for k, v in loss_t.items()}
    # Whole step per variant, per step (generation shared), then the median of the per-step values.
    whole = {
        "grpo": _median([g + lg for g, lg in zip(gen_t, loss_t["grpo"], strict=True)]),
        "cppo": _median([g + v + lc for g, v, lc in zip(gen_t, view_t, loss_t["cppo"], strict=True)]),
        "lean": _median([g + v + lc for g, v, lc in zip(gen_t, view_t, loss_t["lean"], strict=True)]),
        "naive": _median([g + v + ln for g, v, ln in zip(gen_t, naive_view_t, loss_t["naive"], strict=True)]),
        "papo": _median([g + m + lp for g, m, lp in zip(gen_t, masked_t, loss_t["papo"], strict=True)]),
    }
    mem = {k: _median(v) for k, v in memory.items()}
    floor = 1 + 2 * f
    result = {
        "size": size,
        "device": args.device,
        "clock": args.clock,
        "params": n_params,
        "rows": len(rows) * args.generations,
        "steps": args.steps,
        "gated_fraction": f,
        "loss_phase_s": loss,
        "loss_phase_ratio": loss["cppo"] / loss["grpo"],
        "naive_loss_phase_ratio": loss["naive"] / loss["grpo"],
        "lean_loss_phase_ratio": loss["lean"] / loss["grpo"],
        "floor_1_plus_2f": floor,
        # Per step (f varies between batches), then the median.
        "loss_phase_vs_floor": _median(
            [c / g / (1 + 2 * fs) for c, g, fs in zip(loss_t["cppo"], loss_t["grpo"], gated, strict=True)]
        ),
        "whole_step_s": whole,
        "whole_step_ratio": whole["cppo"] / whole["grpo"],
        "naive_whole_step_ratio": whole["naive"] / whole["grpo"],
        "lean_whole_step_ratio": whole["lean"] / whole["grpo"],
        "generation_s": _median(gen_t),
        "view_build_s": {"cppo": _median(view_t), "naive": _median(naive_view_t)},
        "view_build_share": _median(view_t) / whole["cppo"],
        "memory_kind": "cuda_peak_bytes" if args.device == "cuda" else "autograd_saved_activation_bytes",
        "memory_bytes": mem,
        "memory_ratio": mem["cppo"] / mem["grpo"],
        "naive_memory_ratio": mem["naive"] / mem["grpo"],
        "lean_memory_ratio": mem["lean"] / mem["grpo"],
        "papo_loss_phase_ratio": loss["papo"] / loss["grpo"],
        "papo_whole_step_ratio": whole["papo"] / whole["grpo"],
        "papo_memory_ratio": mem["papo"] / mem["grpo"],
        "masked_pass_s": _median(masked_t),
        "masked_build_s": _median([m - fw for m, fw in zip(masked_t, masked_forward_t, strict=True)]),
        "masked_forward_s": _median(masked_forward_t),
        "plain_forward_s": _median(plain_forward_t),
        # Per step, then the median: the masked forward against the same rows' forward with the original images.
        "masked_forward_vs_plain_forward": _median(
            [m / p for m, p in zip(masked_forward_t, plain_forward_t, strict=True)]
        ),
        "masked_pass_share": _median(masked_t) / whole["papo"],
        # The lean variant saves almost nothing for its views during the forward, but rebuilds one view row at a
        # time in backward: its peak adds one row of one view's activations, (cppo - grpo) / (2 f rows).
        "lean_peak_memory_ratio": (
            mem["lean"] + (mem["cppo"] - mem["grpo"]) / max(2 * f * len(rows) * args.generations, 1)
        )
        / mem["grpo"],
    }
    del trainers
    return result


def markdown_table(results: list[dict[str, Any]]) -> str:
    header = (
        "| size | params | rows | f (gated) | loss-phase GRPO s | CPPO/GRPO loss | floor 1+2f | naive/GRPO loss "
        "| whole-step CPPO/GRPO | naive whole | view-build share | mem CPPO/GRPO | naive mem "
        "| lean loss | lean whole | lean peak mem | PAPO/GRPO loss | PAPO whole | masked pass share "
        "| masked fwd / plain fwd | PAPO mem |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in results:
        lines.append(
            f"| {r['size']} | {r['params'] / 1e6:.1f}M | {r['rows']} | {r['gated_fraction']:.2f} "
            f"| {r['loss_phase_s']['grpo']:.3f} | {r['loss_phase_ratio']:.2f} | {r['floor_1_plus_2f']:.2f} "
            f"| {r['naive_loss_phase_ratio']:.2f} | {r['whole_step_ratio']:.3f} | {r['naive_whole_step_ratio']:.3f} "
            f"| {r['view_build_share']:.1%} | {r['memory_ratio']:.2f} | {r['naive_memory_ratio']:.2f} "
            f"| {r['lean_loss_phase_ratio']:.2f} | {r['lean_whole_step_ratio']:.3f} | {r['lean_peak_memory_ratio']:.2f} "
            f"| {r['papo_loss_phase_ratio']:.2f} | {r['papo_whole_step_ratio']:.3f} | {r['masked_pass_share']:.1%} "
            f"| {r['masked_forward_vs_plain_forward']:.2f} | {r['papo_memory_ratio']:.2f} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- two processes that disagree
TWO_PROCESS_CASES = ("gated_vs_none", "uneven_chunks", "cppo_text_rank", "papo_text_rank")


def import_test_module(name: str):
    """A module of `tests/` (the two-process launcher), imported by name so that its dataclasses resolve."""
    import importlib

    tests = str(Path(__file__).resolve().parents[1] / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    return importlib.import_module(name)


def bench_two_processes(args, scratch: Path) -> list[dict[str, Any]]:
    """What it costs that ranks holding different work run the same passes: the cases of
    `tests/scripts/rank_cases.py` on 2 processes under DDP (wall clock; 2 steps each), per rank the seconds in dummy
    passes and in the count agreement, against the rank's whole training time."""
    from cppo_trl.testing import build_tiny_vlm

    root = Path(__file__).resolve().parents[1]
    two_processes = import_test_module("two_processes")
    model = build_tiny_vlm("qwen2_5_vl", Path(args.model_cache) / "tiny-two-process")
    out = scratch / "two_process"
    script = root / "tests" / "scripts" / "rank_cases.py"
    job = two_processes.launch("ddp", script, [str(model), str(out), "ddp", *TWO_PROCESS_CASES], scratch, 600)
    if job.timed_out or job.returncode != 0:
        raise RuntimeError(f"the two-process run failed:\n{job.output[-3000:]}")
    rows = []
    for case in TWO_PROCESS_CASES:
        for rank in (0, 1):
            result = json.loads((out / case / f"rank{rank}.json").read_text())
            rows.append(
                {
                    "case": case,
                    "rank": rank,
                    "dummy_passes": result["dummy_passes"],
                    "dummy_s": result["dummy_seconds"],
                    "agreement_s": result["agreement_seconds"],
                    "train_s": result["train_seconds"],
                    "overhead": (result["dummy_seconds"] + result["agreement_seconds"]) / result["train_seconds"],
                }
            )
    return rows


def two_process_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| case | rank | dummy passes | dummy s | agreement s | training s | overhead |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['rank']} | {r['dummy_passes']} | {r['dummy_s']:.3f} | {r['agreement_s']:.4f} "
            f"| {r['train_s']:.2f} | {100 * r['overhead']:.1f}% |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--sizes", default=None, help="comma list of tiny,small,3b (default: tiny,small on cpu, 3b on cuda)"
    )
    parser.add_argument("--steps", type=int, default=5, help="measured steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--completion-length", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--preset", choices=("paper", "released"), default="paper")
    parser.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="TRL's GRPOConfig default is on",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-cache", default="~/.cache/cppo_trl/bench_models")
    parser.add_argument("--out", default="outputs/bench")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 on cpu)")
    parser.add_argument(
        "--two-process",
        action="store_true",
        help="also time 2 CPU processes (DDP) whose ranks hold different work: the dummy passes and the agreement",
    )
    parser.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default=None,
        help="cpu = process CPU time (robust to other load on a shared CPU box; default on cpu), "
        "wall = perf_counter (always on cuda)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the JSON payload (also written to --out/bench.json and bench.md)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.device == "cuda":
        args.clock = "wall"  # GPU work is asynchronous; CPU time would miss it
    args.clock = args.clock or "cpu"
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    sizes = (args.sizes or ("3b" if args.device == "cuda" else "tiny,small")).split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    results = []
    with tempfile.TemporaryDirectory(prefix="cppo-bench-") as tmp:
        # The two processes first, while this one is small: the size runs leave it holding most of the memory.
        two_process = bench_two_processes(args, Path(tmp)) if args.two_process else []
        for size in sizes:
            results.append(bench_size(size, args, Path(tmp)))
    payload = {
        "config": dict(vars(args)),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "results": results,
        "two_process": two_process,
        "notes": {
            "loss_phase": "compute_loss forward + backward on identical prepared inputs",
            "whole_step": "generation + scoring (shared, measured once) + view building + loss phase",
            "memory": results[0]["memory_kind"] if results else "",
        },
    }
    for r in results:
        for key in ("loss_phase_ratio", "whole_step_ratio", "memory_ratio", "papo_whole_step_ratio"):
            if not math.isfinite(r[key]):
                logger.warning("%s: non-finite %s", r["size"], key)
    (out / "bench.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    table = markdown_table(results)
    if two_process:
        table += "\n\nTwo processes (DDP, wall clock) whose ranks hold different work:\n\n" + two_process_table(
            two_process
        )
    (out / "bench.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
