"""The benchmark runs end to end on the tiny model and reports finite, positive ratios."""

import importlib.util
import json
import math
from pathlib import Path

import pytest


BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("cppo_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_tiny_two_steps(tmp_path):
    bench = _load_bench()
    argv = ["--sizes", "tiny", "--steps", "2", "--warmup", "0", "--prompts", "2", "--completion-length", "8"]
    payload = bench.main([*argv, "--out", str(tmp_path)])
    on_disk = json.loads((tmp_path / "bench.json").read_text())
    assert (tmp_path / "bench.md").read_text().startswith("| size")
    (result,) = on_disk["results"]
    assert set(bench.RESULT_KEYS) <= set(result)
    assert result == json.loads(json.dumps(payload["results"][0]))
    for key in (
        "loss_phase_ratio",
        "naive_loss_phase_ratio",
        "whole_step_ratio",
        "naive_whole_step_ratio",
        "memory_ratio",
        "naive_memory_ratio",
        "floor_1_plus_2f",
        "papo_loss_phase_ratio",
        "papo_whole_step_ratio",
        "papo_memory_ratio",
        "masked_forward_s",
        "masked_forward_vs_plain_forward",
    ):
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert 0 <= result["gated_fraction"] <= 1
    assert 0 <= result["view_build_share"] < 1
    assert 0 < result["masked_pass_share"] < 1 and 0 <= result["masked_build_s"] < result["masked_pass_s"]
    # PAPO adds no gradient pass: its activation memory is GRPO's (the two extra terms reuse the policy's log-probs).
    assert result["papo_memory_ratio"] < 1.1


def test_the_two_process_part_loads_the_launcher_and_tabulates():
    """`make bench --two-process` imports the suite's launcher (its dataclasses need a named module) and tabulates each
    rank's overhead; the run itself is the DDP cases of tests/test_multiprocess.py."""
    bench = _load_bench()
    launcher = bench.import_test_module("two_processes")
    assert callable(launcher.launch)
    row = {"case": "gated_vs_none", "rank": 1, "dummy_passes": 2, "dummy_s": 0.05, "agreement_s": 0.002}
    table = bench.two_process_table([{**row, "train_s": 2.0, "overhead": 0.026}])
    assert table.splitlines()[2] == "| gated_vs_none | 1 | 2 | 0.050 | 0.0020 | 2.00 | 2.6% |"


def test_measuring_activation_memory_frees_what_it_measured(tmp_path):
    """The CPU memory measure runs a forward without backward under a saved-tensor hook; the graph it builds must go
    with the loss (a pack hook returning its own input kept every measured graph alive: 24 GB of RSS on `make bench`)."""
    import gc

    import torch

    from cppo_trl.testing import build_tiny_vlm

    bench = _load_bench()
    args = bench.parse_args(["--prompts", "2", "--completion-length", "8"])
    model_dir = build_tiny_vlm("qwen2_5_vl", tmp_path / "model")
    trainers = bench.make_trainers(model_dir, args, tmp_path / "runs")
    cppo = trainers["cppo"]
    batch = [dict(r) for r in bench.make_rows(args.prompts, args.image_size, args.seed) for _ in range(4)]
    with torch.no_grad():
        inputs = cppo._generate_and_score_completions(batch)

    def live_tensor_bytes() -> int:
        gc.collect()
        storages = {
            o.untyped_storage().data_ptr(): o.untyped_storage().nbytes()
            for o in gc.get_objects()
            if torch.is_tensor(o)
        }
        return sum(storages.values())

    measured = bench._activation_bytes(cppo, inputs)
    before = live_tensor_bytes()
    for _ in range(3):  # the same inputs each time; a few index tensors differ in size by some bytes between calls
        assert bench._activation_bytes(cppo, inputs) == pytest.approx(measured, rel=1e-3)
    assert live_tensor_bytes() - before < 0.05 * measured
