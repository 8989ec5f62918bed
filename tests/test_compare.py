"""`make compare`'s arms are one switch apart on one recipe, and its table reports spread and incompleteness honestly.
The real run takes ~40 minutes; `python benchmarks/compare.py --quick` checks the plumbing by hand (~20 s)."""

import importlib.util
from pathlib import Path

import pytest

from cppo_trl import CPPOConfig, PAPOConfig
from cppo_trl.scripts.demo import parse_recipe


COMPARE = Path(__file__).resolve().parents[1] / "benchmarks" / "compare.py"


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("cppo_compare", COMPARE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_arms_are_one_switch_apart(compare):
    parsed = {arm: parse_recipe(compare.RECIPE, flags) for arm, flags in compare.ARMS.items()}
    grpo, papo, cppo = (parsed[arm][1] for arm in ("grpo", "papo", "cppo"))
    assert type(grpo) is CPPOConfig and grpo.cpl_weight == 0  # GRPO bit for bit
    assert type(papo) is PAPOConfig and (papo.perception_loss_weight, papo.der_loss_weight1) == (0.02, 0.0)
    assert type(cppo) is CPPOConfig and cppo.cpl_weight == 0.02 and "color_jitter" not in cppo.preserving_perturbations
    shared = ("learning_rate", "max_steps", "per_device_train_batch_size", "num_generations", "beta", "temperature")
    assert len({tuple(getattr(args, name) for name in shared) for args in (grpo, papo, cppo)}) == 1
    scripts = [parsed[arm][0] for arm in compare.ARMS]
    assert all(s.synthetic_tasks == ["shape_color"] and s.synthetic_num_test == 96 for s in scripts)


def _run(arm, seed, accuracy, conflict, step_seconds):
    return {
        "arm": arm,
        "seed": seed,
        "accuracy": accuracy,
        "conflict_accuracy": conflict,
        "aligned_accuracy": 2 * accuracy - conflict,
        "reward": [0.0, 0.2, 0.4, 0.8],
        "reward_steps": [1, 2, 3, 4],
        "step_seconds": step_seconds,
    }


def test_table_reports_spread_step_time_and_incompleteness(compare, tmp_path):
    sft = {"accuracy": 0.25, "conflict_accuracy": 0.05, "aligned_accuracy": 0.85, "n": 96, "n_conflict": 72}
    runs = [_run("grpo", 0, 0.30, 0.10, 1.0), _run("grpo", 1, 0.40, 0.20, 1.2), _run("papo", 0, 0.35, 0.15, 1.65)]
    table = compare.aggregate(runs, sft)
    assert table["grpo"]["accuracy"] == {"mean": pytest.approx(0.35), "min": 0.30, "max": 0.40}
    assert table["grpo"]["gain_vs_sft"] == pytest.approx(0.10)
    assert table["grpo"]["final_reward_mean"] == 0.8  # the last quarter of the steps
    assert table["papo"]["step_time_vs_grpo"] == pytest.approx(1.5)
    compare.write_markdown(table, sft, 4, done=3, planned=9, path=tmp_path / "compare.md")
    text = (tmp_path / "compare.md").read_text()
    assert "INCOMPLETE: 3 of 9 runs" in text
    assert "| grpo | 2 | 0.350 [0.300, 0.400] | 0.150 [0.100, 0.200] |" in text
    compare.write_markdown(table, sft, 4, done=9, planned=9, path=tmp_path / "compare.md")
    assert "INCOMPLETE" not in (tmp_path / "compare.md").read_text()
    compare.plot(runs, sft, tmp_path / "compare.png")
    assert (tmp_path / "compare.png").stat().st_size > 1000
