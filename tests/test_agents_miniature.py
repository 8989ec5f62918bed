"""`make agents` in plumbing mode: `benchmarks/agents.py --quick` (SFT warm-up, the three arms through the training
script with `environment: zoom`, both evaluation conditions through TRL's tool loop) writes complete outputs.
The real run takes ~10 minutes (docs/agents.md); this checks that every stage runs and every number is reported."""

import importlib.util
import json
import math
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
AGENTS = ROOT / "benchmarks" / "agents.py"
COLUMNS = (
    "zoom_rate",
    "covered_cell_rate",
    "accuracy",
    "accuracy_zoomed",
    "accuracy_direct",
    "accuracy_occluded",
    "dependence_on_tool_image",
)


@pytest.fixture(scope="module")
def agents():
    spec = importlib.util.spec_from_file_location("cppo_agents", AGENTS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_complete_outputs(agents, tmp_path):
    payload = agents.main(["--quick", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "agents.json").read_text())
    assert json.dumps(payload, sort_keys=True) == json.dumps(written, sort_keys=True)  # NaN-safe equality
    assert payload["complete"] and payload["quick"] and payload["arms"] == agents.ARMS
    assert (tmp_path / "data" / "train.parquet").is_file() and (tmp_path / "sft" / "sft_warmup.json").is_file()

    rows = {row["arm"]: row for row in payload["table"]}
    assert list(rows) == ["SFT start", "grpo", "papo", "cppo"]
    for name, row in rows.items():
        assert row["n"] == payload["held_out_rows"] * payload["samples"] == 8
        assert set(COLUMNS) <= set(row), name
        assert all(0 <= row[c] <= 1 for c in COLUMNS[:3] if not math.isnan(row[c]))
        if name != "SFT start":
            assert row["step_seconds"] > 0 and "train_reward_last_quarter" in row

    for name, run in payload["runs"].items():
        assert run["switch"] == agents.ARMS[name] and len(run["reward"]) == payload["steps"] == 1
        assert set(run["conditions"]) == set(agents.CONDITIONS)
        assert all(c["rollouts"] == 8 for c in run["conditions"].values())
        trained = json.loads((tmp_path / "runs" / name / "trainer_state.json").read_text())["log_history"]
        assert "tools/call_frequency" in trained[0]  # trained through the script with the zoom environment
    assert payload["runs"]["cppo"]["method_metric_values"] and payload["runs"]["papo"]["method_metric_values"]

    visibility = payload["visibility"]
    assert visibility["full_decoder_accuracy"] <= 0.5 < visibility["zoom_decoder_accuracy"]
    markdown = (tmp_path / "agents.md").read_text()
    assert "INCOMPLETE" not in markdown and all(f"| {name} |" in markdown for name in rows)


def test_a_rollout_record_reads_the_tool_loop(agents):
    from PIL import Image

    module = agents
    call = {"type": "function", "function": {"name": "zoom_in", "arguments": {"bbox_2d": [10, 10, 30, 30]}}}
    zoomed = [
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "name": "zoom_in", "content": [{"type": "image", "image": Image.new("RGB", (4, 4))}]},
        {"role": "assistant", "content": "\\boxed{red}"},
    ]
    record = module.rollout_record(zoomed, "red", 1.0, [12, 12, 14, 14])
    assert (record["calls"], record["zoomed"], record["covered_cell"], record["correct"]) == (1, True, True, True)
    missed = module.rollout_record(zoomed, "red", 1.0, [40, 40, 42, 42])
    assert not missed["covered_cell"]
    failed = [{"role": "assistant", "content": "", "tool_calls": [call]}, {"role": "tool", "content": "Error: x"}]
    record = module.rollout_record(failed + [{"role": "assistant", "content": "blue"}], "red", 0.0, [12, 12, 14, 14])
    assert (record["calls"], record["zoomed"], record["covered_cell"], record["boxed"]) == (1, False, False, False)
    summary = module.summarize_records([module.rollout_record(zoomed, "red", 1.0, None), record])
    assert summary["zoom_rate"] == 0.5 and summary["accuracy_zoomed"] == 1.0 and summary["accuracy_direct"] == 0.0
