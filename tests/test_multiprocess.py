"""Two CPU processes under DDP (`accelerate launch --multi_gpu`, gloo, buffers broadcast at every forward): CPPO and PAPO
train, their metrics are reduced across ranks, both ranks build the same views for the same prompt (views derive from
(seed, step, prompt), not from the rank), and ranks that hold different work run the same passes
(`tests/scripts/rank_cases.py`; the DeepSpeed runs of the same cases are in `tests/test_deepspeed.py`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rank_case_checks import DUMMIES, check_case, run_cases

from cppo_trl.testing import build_tiny_vlm


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "two_process_cppo.py"
# `accelerate launch --cpu --num_processes 2` needs mpirun (its simple launcher starts one process otherwise);
# `--multi_gpu` takes the torchrun launcher, and with no GPU (and `use_cpu=True` in the script) the ranks use gloo.
ACCELERATE = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2"]
ACCELERATE += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]

pytestmark = pytest.mark.slow


def test_two_processes_reduce_metrics_and_share_views(tmp_path):
    model = build_tiny_vlm("qwen2_5_vl", tmp_path / "model")
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", MASTER_PORT=str(29500 + os.getpid() % 1000))
    cmd = [*ACCELERATE, "--main_process_port", env["MASTER_PORT"], str(SCRIPT), str(model), str(out)]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["num_processes"] for r in ranks] == [2, 2]

    logs0, logs1 = ranks[0]["logs"], ranks[1]["logs"]
    assert len(logs0) == 2 and logs0 == logs1  # reduced: identical `cppo/*` values on both ranks
    # Each rank holds 2 of the prompt's 4 rollouts; the reduced count covers both ranks' rows.
    assert all(h["cppo/extra_pass_rows"] == 4 for h in logs0)
    assert all(h["cppo/gated_fraction"] == 1 for h in logs0)

    hashes0, hashes1 = ranks[0]["view_hashes"], ranks[1]["view_hashes"]
    assert len(hashes0) == 2 and hashes0.keys() == hashes1.keys()  # one prompt key per step, seen by both ranks
    for key in hashes0:
        assert hashes0[key] == hashes1[key], key
    assert len({h[0] for h in hashes0.values()}) == 2  # views change with the step

    # PAPO: rank 0 masks its image prompt, rank 1 has a text-only prompt and no masked pass; the reduced metrics are
    # the same on both ranks and count rank 0's two rows only.
    papo0, papo1 = ranks[0]["papo"], ranks[1]["papo"]
    assert len(papo0["logs"]) == 2 and papo0["logs"] == papo1["logs"]
    assert all(h["papo/masked_view_rows"] == 2 and h["papo/nonfinite_masked_tokens"] == 0 for h in papo0["logs"])
    assert all(h["papo/kl_prc"] >= 0 and 0 < h["papo/masked_fraction"] < 1 for h in papo0["logs"])
    assert len(papo0["mask_hashes"]) == 2 and papo1["mask_hashes"] == {}
    # TRL 1.16 alone deadlocks here (only the image rank gathers its images for logging); the rails gather on both
    # ranks instead, so the completions table stays aligned: rank 0's two rollouts with their image, rank 1's without.
    assert papo0["logged"] == {"images": [1, 1, 0, 0], "prompts": 4}


@pytest.fixture(scope="module")
def ddp_cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    model = build_tiny_vlm("qwen2_5_vl", root / "model")
    return model, run_cases("ddp", model, root, timeout=300)


@pytest.mark.parametrize("case", list(DUMMIES))
def test_ranks_with_different_work_run_the_same_passes_under_ddp(case, ddp_cases):
    model, results = ddp_cases
    check_case(case, results[case], model, sharded=False)
