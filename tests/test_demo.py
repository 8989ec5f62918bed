"""`python -m cppo_trl.scripts.demo --quick` end to end: SFT warm-up, CPPO through the recipe, evaluation and every artefact.

Budgets are tiny (8 SFT steps, 2 RL steps), so this checks plumbing, not learning; `make demo` is the real run.
"""

import html
import json

import PIL.Image
import pytest

from cppo_trl.scripts import demo


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    summary = demo.main(["--out", str(out), "--quick"])
    return out, summary


def test_artefacts(quick_run):
    out, _ = quick_run
    for name in ("training_curves.png", "perception_tokens.png", "perturbations.png"):
        with PIL.Image.open(out / name) as image:
            image.verify()
    page = (out / "perception_tokens.html").read_text()
    tokens = json.loads((out / "perception_tokens.json").read_text())["tokens"]
    assert tokens and all(not token.strip() or html.escape(token.strip()) in page for token in tokens)


def test_summary(quick_run):
    out, returned = quick_run
    summary = json.loads((out / "summary.json").read_text())
    for key in demo.SUMMARY_KEYS:
        assert key in summary
    assert summary["steps"] == 2 and summary["quick"]
    assert 0.0 <= summary["accuracy_before"] <= 1.0 and 0.0 <= summary["accuracy_after"] <= 1.0
    assert returned["accuracy_after"] == summary["accuracy_after"]


def test_recipe_is_what_trained(quick_run):
    """The RL run went through cppo.main with the recipe: its output folder holds the trained model and state."""
    out, _ = quick_run
    state = json.loads((out / "cppo" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert (out / "cppo" / "README.md").exists()  # model card written by cppo.main
