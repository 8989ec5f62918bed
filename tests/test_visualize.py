"""The visual tools write what they claim: every panel of the sheet, and exactly the selected perception tokens."""

import re

import PIL.Image
import pytest
import torch

from cppo_trl.core.perception import select_perception_tokens
from cppo_trl.core.perturbations import PRESERVING_PERTURBATIONS, REMOVING_PERTURBATIONS
from cppo_trl.scripts.visualize import inspect_perception_tokens, main, perturbation_sheet, synthetic_image
from cppo_trl.testing import build_tiny_vlm


def test_perturbation_sheet_has_every_transform(tmp_path):
    out = tmp_path / "sheet.png"
    meta = perturbation_sheet(synthetic_image(112), seed=3, out_png=out)
    names = [p["name"] for p in meta["panels"]]
    assert names == ["original", *PRESERVING_PERTURBATIONS, *REMOVING_PERTURBATIONS]
    assert meta["num_panels"] == 1 + len(PRESERVING_PERTURBATIONS) + len(REMOVING_PERTURBATIONS)
    rows, cols = meta["grid"]
    assert rows * cols >= meta["num_panels"]
    with PIL.Image.open(out) as image:
        image.verify()


def test_cli_perturbations(tmp_path):
    out = tmp_path / "cli.png"
    assert main(["perturbations", "--synthetic", "--out", str(out)]) == 0
    assert out.exists()


@pytest.fixture(scope="module")
def tiny_model():
    return build_tiny_vlm("qwen2_5_vl")


@pytest.mark.parametrize("completion", ["There are 3 circles and a red square. <answer>3</answer>", None])
def test_inspector_marks_exactly_the_selected_tokens(tmp_path, tiny_model, completion):
    result = inspect_perception_tokens(
        tiny_model, synthetic_image(112), "How many circles?", completion, tmp_path, top_fraction=0.5, seed=1
    )
    page = (tmp_path / "perception_tokens.html").read_text(encoding="utf-8")
    spans = re.findall(
        r'<span class="(tok(?: sel)?)" data-index="(\d+)" data-selected="([01])"[^>]*>([^<]*)</span>', page
    )
    assert len(spans) == len(result.tokens) > 0
    assert [int(i) for _, i, _, _ in spans] == list(range(len(result.tokens)))
    import html

    assert [html.unescape(text) for *_, text in spans] == result.tokens  # every completion token is on the page

    expected = select_perception_tokens(
        result.anchor_entropy[None],
        result.removed_entropy[None],
        torch.ones(1, len(result.tokens)),
        0.5,
        "raw",
    )[0]
    marked = torch.tensor([sel == "1" for _, _, sel, _ in spans])
    assert torch.equal(marked, expected)
    assert all((cls == "tok sel") == (sel == "1") for cls, _, sel, _ in spans)
    assert f"K = {result.k}" in page and "score = <code>raw</code>" in page
    assert "data:image/png;base64," in page
    if completion is not None:
        assert "".join(result.tokens).strip() == completion.strip()
    with PIL.Image.open(tmp_path / "perception_tokens.png") as image:
        image.verify()
