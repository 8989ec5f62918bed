"""cppo-eval end to end on a tiny model that really reads colour: the CPU recipe through the CLI, the perturbation
audit (colour jitter must show as harmful to colour questions, occlusion as removing), resumption after an
interruption, and `cppo-eval compare`.

The model: the tiny random Qwen2.5-VL after a short SFT on the synthetic colour task. The demo's 300-step SFT takes
~45 s to reach accuracy@8 ~0.37; here half of the SFT images are plain colour fields (a curriculum: the colour is then
all the image says) and half are synthetic colour questions from a seed stream disjoint from the held-out split.
Measured on 2 CPU cores, 120-200 steps, 4 seeds: held-out accuracy@8 0.60-0.88, colour jitter -13 to -29 points,
occlusion -30 to -63 points, in ~10 s of SFT. The assertions keep wide margins under those numbers.
"""

import json
import sys

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from cppo_trl.data.synthetic import SYNTHETIC_COLORS, make_synthetic_perception_dataset
from cppo_trl.evaluate import cli, evaluation, report
from cppo_trl.evaluate.generation import chat_text


RECIPE = "recipes/eval/eval_tiny_cpu.yaml"
DEMO_RECIPE = "recipes/tiny/cppo/config_demo_cpu.yaml"
SFT_STEPS = 160


def colour_sft(base, output_dir, steps=SFT_STEPS, batch_size=8, learning_rate=3e-3, rows=512, seed=0):
    """Teacher-forced SFT on `\\boxed{colour}` (completion tokens only), images processed once."""
    suffix = " Answer with \\boxed{}."  # the demo recipe's prompt_suffix
    processor = AutoProcessor.from_pretrained(base, padding_side="right")
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
    data = make_synthetic_perception_dataset(rows, seed=1234, tasks=["color"], prompt_suffix=suffix)
    prompts = [chat_text(processor, row["prompt"]) for row in data]
    images = [
        [Image.new("RGB", (112, 112), SYNTHETIC_COLORS[row["solution"]])] if index % 2 == 0 else row["images"]
        for index, row in enumerate(data)
    ]
    texts = [prompt + "\\boxed{" + row["solution"] + "}<|im_end|>" for prompt, row in zip(prompts, data, strict=True)]
    full = processor(text=texts, images=images, return_tensors="pt", padding=True)
    prompt_lengths = processor(text=prompts, images=images, return_tensors="pt", padding=True)["attention_mask"].sum(1)
    labels = full["input_ids"].masked_fill(full["attention_mask"] == 0, -100)
    for row, length in enumerate(prompt_lengths.tolist()):
        labels[row, :length] = -100
    patches = full["pixel_values"].size(0) // rows
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps, pct_start=0.1)
    order = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = torch.randperm(rows, generator=order)[:batch_size]
        pixels = torch.cat([full["pixel_values"][i * patches : (i + 1) * patches] for i in batch.tolist()])
        loss = model(
            input_ids=full["input_ids"][batch],
            attention_mask=full["attention_mask"][batch],
            pixel_values=pixels,
            image_grid_thw=full["image_grid_thw"][batch],
            labels=labels[batch],
        ).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    model.eval().save_pretrained(output_dir)
    AutoProcessor.from_pretrained(base).save_pretrained(output_dir)
    return output_dir


@pytest.fixture(scope="module")
def colour_model(tiny_vlm, tmp_path_factory):
    return colour_sft(tiny_vlm("qwen2_5_vl"), tmp_path_factory.mktemp("colour_sft"))


@pytest.fixture(scope="module")
def audited(colour_model, tmp_path_factory):
    """The CPU eval recipe through the CLI, with the audit narrowed to two views to keep the suite short."""
    out = tmp_path_factory.mktemp("eval") / "run"
    argv = ["--config", RECIPE, "--model_name_or_path", str(colour_model), "--output_dir", str(out)]
    cli.main([*argv, "--perturb", "color_jitter", "patch_occlusion"])
    return out


def test_recipe_end_to_end(audited):
    results = json.loads((audited / "results.json").read_text())
    assert results["complete"] and results["protocol"]["num_samples"] == 8 and results["protocol"]["temperature"] == 1
    synthetic = results["benchmarks"]["synthetic"]
    assert synthetic["n"] == 48  # the demo recipe's held-out split
    assert synthetic["accuracy"] >= 0.45  # chance is 0.25; measured 0.60-0.88
    assert synthetic["accuracy"] == pytest.approx(sum(synthetic["per_draw"]) / 8)
    lines = [json.loads(line) for line in (audited / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 48 and all(len(r["completions"]) == len(r["scores"]) == len(r["answers"]) == 8 for r in lines)
    colours = [a for r in lines for a in r["answers"] if a in SYNTHETIC_COLORS]
    assert len(colours) > 0.8 * 48 * 8  # the SFT taught the format; T = 1 still samples a few broken boxes
    per_draw = [sum(r["scores"][j] for r in lines) / 48 for j in range(8)]
    assert per_draw == pytest.approx(synthetic["per_draw"])
    table = (audited / "results.md").read_text()
    assert "| Model | Synthetic | Avg |" in table and f"{100 * synthetic['accuracy']:.1f} ±" in table


def test_audit_flags_colour_jitter_on_colour_questions(audited):
    audit = json.loads((audited / "perturbation_audit.json").read_text())
    views = {row["view"]: row for row in audit["views"]}
    jitter, occlusion = views["color_jitter"], views["patch_occlusion"]
    assert jitter["set"] == "preserving" and jitter["drop"] > 5  # measured 13-29 points
    assert jitter["flag"] and "preserving view loses" in jitter["flag"]
    assert occlusion["set"] == "removing" and occlusion["drop"] > 15 and occlusion["flag"] is None  # measured 30-63
    for view in views:
        assert (
            json.loads((audited / f"perturb-{view}" / "results.json").read_text())["protocol"]["perturbation"] == view
        )
    table = (audited / "perturbation_audit.md").read_text()
    assert "| color_jitter | preserving |" in table and "**FLAG**" in table and "Paper Table 6" in table


def test_resume_after_interruption_gives_the_same_results(colour_model, tmp_path, monkeypatch):
    options = {"training_recipe": DEMO_RECIPE, "max_new_tokens": 8, "max_samples": 16, "num_samples": 4}
    straight = evaluation.evaluate_model(colour_model, "synthetic", output_dir=tmp_path / "a", batch_size=4, **options)
    from cppo_trl.evaluate.generation import TransformersBackend

    original, calls = TransformersBackend.generate, []

    def interrupted(self, prompts):
        calls.append(len(prompts))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, prompts)

    monkeypatch.setattr(TransformersBackend, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluation.evaluate_model(colour_model, "synthetic", output_dir=tmp_path / "b", batch_size=4, **options)
    assert not (tmp_path / "b" / "results.json").exists() and not (tmp_path / "b" / "results.md").exists()
    assert len((tmp_path / "b" / "predictions.jsonl").read_text().splitlines()) == 8
    with (tmp_path / "b" / "predictions.jsonl").open("a") as handle:
        handle.write('{"benchmark": "synthetic", "id": "9", "compl')  # a write cut short by the interruption
    monkeypatch.setattr(TransformersBackend, "generate", original)
    resumed = evaluation.evaluate_model(colour_model, "synthetic", output_dir=tmp_path / "b", batch_size=2, **options)
    assert [r["completions"] for r in resumed["predictions"]] == [r["completions"] for r in straight["predictions"]]
    assert without_time(resumed) == without_time(straight) and 0 < straight["average"] < 1
    on_disk = [json.loads((tmp_path / name / "results.json").read_text()) for name in ("a", "b")]
    assert without_time(on_disk[0]) == without_time(on_disk[1])


def without_time(results):
    return {key: value for key, value in results.items() if key not in ("created", "predictions")}


def test_compare_runs(audited, tmp_path, capsys):
    table = cli.main(["compare", str(audited), str(audited / "perturb-color_jitter"), "--output_dir", str(tmp_path)])
    assert (tmp_path / "compare.png").stat().st_size > 0 and (tmp_path / "compare.md").read_text() == table
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 3 and not any(row.startswith("| paper") for row in rows)  # no Table 1 column: no reference
    original = json.loads((audited / "results.json").read_text())
    assert f"{100 * original['average']:.1f}" in rows[1]
    assert "compare.md" in capsys.readouterr().out
    # As the `cppo-eval` console script runs it (`sys.exit(cli())`): a finished command exits 0.
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(cli.cli(["compare", str(audited), "--output_dir", str(tmp_path / "again")]))
    assert exit_info.value.code is None


def test_compare_shows_the_papers_rows_as_reference(audited, tmp_path):
    results = json.loads((audited / "results.json").read_text())
    results["benchmarks"] = {"mathvista": {**results["benchmarks"]["synthetic"], "title": "MathVista-mini"}}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text(json.dumps(results))
    table = report.compare_runs([tmp_path / "run"], tmp_path / "out", paper_models=["3B"])
    assert "| paper Table 1: Qwen2.5-VL-3B CPPO | 66.3 | — |" in table  # Avg only over all seven columns
    assert "Qwen2.5-VL-7B" not in table
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "predictions.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match="partial.*not a finished cppo-eval run"):
        report.compare_runs([tmp_path / "run", tmp_path / "partial"], tmp_path / "out")
