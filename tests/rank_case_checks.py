"""Checks shared by the DDP and the DeepSpeed runs of `tests/scripts/rank_cases.py`: the job finishes (a hang fails
with every rank's stack), both ranks log identical reduced metrics, the dummy passes ran where the ranks disagreed, and
each rank's first loss equals its agreeing twin's: the same rank's data trained alone in one process."""

import json
import sys
import tempfile
from pathlib import Path

import pytest
from two_processes import launch


SCRIPT = Path(__file__).resolve().parent / "scripts" / "rank_cases.py"
sys.path.insert(0, str(SCRIPT.parent))

import rank_cases  # noqa: E402


# Dummy passes each rank runs in 2 steps (rank 0, rank 1): a rank with fewer passes than the other makes them up.
DUMMIES = {
    "gated_vs_none": (0, 4),  # 2 steps x (removed + preserved) x 1 pass
    "uneven_chunks": (0, 4),  # 2 steps x 2 views x (2 - 1) passes
    "no_token_selected": (0, 0),  # same counts; the preserved view still runs on rank 1
    "cppo_text_rank": (0, 4),
    "grpo_text_rank": (0, 0),  # no view passes anywhere (λ = 0)
    "papo_text_rank": (0, 2),  # one masked-pass chunk per generation batch on rank 0
}


def run_cases(mode: str, model: Path, tmp_path: Path, timeout: float, cases=tuple(rank_cases.CASES)) -> dict:
    """Every case in one 2-process job under `mode` (ddp, zero2, zero3): {case: [rank 0 result, rank 1 result]}."""
    out = tmp_path / "out"
    script_mode = "ddp" if mode == "ddp" else "deepspeed"
    job = launch(mode, SCRIPT, [str(model), str(out), script_mode, *cases], tmp_path / "scratch", timeout=timeout)
    assert not job.timed_out and job.returncode == 0, job.output[-8000:]
    return {case: [json.loads((out / case / f"rank{r}.json").read_text()) for r in (0, 1)] for case in cases}


def check_case(case: str, ranks: list[dict], model: Path, sharded: bool) -> None:
    assert [r["num_processes"] for r in ranks] == [2, 2]
    assert len(ranks[0]["logs"]) == rank_cases.STEPS and ranks[0]["logs"] == ranks[1]["logs"]
    assert tuple(r["dummy_passes"] for r in ranks) == DUMMIES[case]
    if sharded and case.endswith("_text_rank"):  # the text-only rank ran the vision tower on the dummy image
        assert ranks[0]["dummy_vision_passes"] == 0 and ranks[1]["dummy_vision_passes"] > 0
    for rank, result in enumerate(ranks):
        with tempfile.TemporaryDirectory() as scratch:
            twin = rank_cases.make_trainer(case, str(model), scratch, "single", ranks=[rank])
            twin.args.max_steps = 1
            alone = rank_cases.run(twin, case, rank)["losses"][0]
        assert result["losses"][0] == pytest.approx(alone, rel=1e-6, abs=1e-7), (case, rank)
