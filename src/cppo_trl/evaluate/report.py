"""What `cppo-eval` reports: accuracy@k with its spread over draws, the paper-style tables, the comparison of runs
(table + bar chart, with the paper's Table 1 as reference rows), the perturbation audit, and the model-card section.

Pure functions over plain dicts (the content of `results.json`), so that tables can be rebuilt from finished runs
without a model.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


logger = logging.getLogger(__name__)

# Paper Table 1 (accuracy@8, T = 1.0, VLMEvalKit), in percent.
PAPER_COLUMNS = (
    "MathVista-mini",
    "DynaMath",
    "WeMath",
    "MathVision-mini",
    "MathVerse",
    "MMMU-Pro-vision",
    "LogicVista",
)
PAPER_TABLE1: dict[str, tuple[float, ...]] = {
    # model: 7 benchmarks in PAPER_COLUMNS order, then Avg
    "Qwen2.5-VL-3B": (56.4, 33.7, 14.5, 19.5, 25.7, 19.9, 32.4, 28.8),
    "Qwen2.5-VL-3B PAPO": (64.8, 45.4, 28.1, 24.3, 38.3, 26.8, 39.4, 38.1),
    "Qwen2.5-VL-3B GRPO": (63.7, 45.7, 28.4, 25.1, 38.3, 25.8, 37.7, 37.8),
    "Qwen2.5-VL-3B CPPO": (66.3, 48.9, 30.8, 25.3, 39.4, 28.5, 40.9, 40.0),
    "Qwen2.5-VL-7B": (65.6, 53.2, 33.3, 24.5, 41.2, 33.7, 45.1, 42.3),
    "Qwen2.5-VL-7B PAPO": (71.6, 54.7, 39.5, 26.5, 44.5, 38.7, 45.8, 46.8),
    "Qwen2.5-VL-7B GRPO": (71.2, 55.6, 42.4, 27.6, 45.0, 37.9, 47.4, 46.7),
    "Qwen2.5-VL-7B CPPO": (72.2, 56.9, 44.8, 29.9, 46.5, 39.0, 48.2, 48.2),
}
# Paper Table 6: Qwen2.5-VL-7B base, average over LogicVista, MathVista-mini, MathVision-mini and WeMath, per view.
PAPER_TABLE6_ORIGINAL = {
    "LogicVista": 45.1,
    "MathVista-mini": 65.6,
    "MathVision-mini": 24.5,
    "WeMath": 33.3,
    "Avg": 42.1,
}
PAPER_TABLE6_AVG = {
    "color_jitter": 41.3,
    "perspective": 41.2,
    "rotation": 40.7,
    "gaussian_blur": 41.4,
    "patch_occlusion": 26.3,
    "zoom_crop": 27.3,
}
# Audit thresholds in accuracy points : a preserving view should cost little, a removing view a lot.
PRESERVING_MAX_DROP = 2.0
REMOVING_MIN_DROP = 10.0
CARD_START = "<!-- cppo-eval:start -->"
CARD_END = "<!-- cppo-eval:end -->"


# --- accuracy@k ---------------------------------------------------------------------------------------------------


def draw_accuracies(scores: Sequence[Sequence[float]]) -> list[float]:
    """Accuracy of draw j over the benchmark, for j = 1..k: `scores[i][j]` is the score of sample i's draw j."""
    if not scores:
        raise ValueError("no scored samples")
    k = len(scores[0])
    if any(len(row) != k for row in scores):
        raise ValueError(f"every sample needs {k} scores, got lengths {sorted({len(row) for row in scores})}")
    return [statistics.fmean(row[j] for row in scores) for j in range(k)]


def spread(values: Sequence[float]) -> float | None:
    """Sample standard deviation (ddof 1, as pandas' `std` in the authors' summary script); None for one value."""
    return statistics.stdev(values) if len(values) > 1 else None


def benchmark_summary(title: str, scores: Sequence[Sequence[float]]) -> dict[str, Any]:
    """accuracy@k = mean over the k draws of the per-draw accuracy (= mean per-sample score) and the draws' std."""
    per_draw = draw_accuracies(scores)
    return {
        "title": title,
        "n": len(scores),
        "accuracy": statistics.fmean(per_draw),
        "std": spread(per_draw),
        "per_draw": per_draw,
    }


def overall_summary(benchmarks: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The average over benchmarks, and its std over draws (draw j's average over benchmarks, j = 1..k)."""
    if not benchmarks:
        raise ValueError("no benchmark results")
    average = statistics.fmean(b["accuracy"] for b in benchmarks.values())
    draws = [b["per_draw"] for b in benchmarks.values()]
    per_draw = (
        [statistics.fmean(column) for column in zip(*draws, strict=True)] if len({len(d) for d in draws}) == 1 else []
    )
    return {"average": average, "average_std": spread(per_draw) if per_draw else None}


# --- tables -------------------------------------------------------------------------------------------------------


def _cell(value: float | None, std: float | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.1f}" + (f" ± {std:.1f}" if std is not None else "")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def run_row(results: Mapping[str, Any], titles: Sequence[str], with_std: bool = True) -> list[str]:
    """One table row (percent): per-benchmark accuracy ± std over draws, then the average."""
    by_title = {b["title"]: b for b in results["benchmarks"].values()}
    cells = []
    for title in titles:
        entry = by_title.get(title)
        cells.append(
            _cell(100 * entry["accuracy"], 100 * entry["std"] if with_std and entry["std"] is not None else None)
            if entry
            else "—"
        )
    std = results.get("average_std")
    cells.append(_cell(100 * results["average"], 100 * std if with_std and std is not None else None))
    return [results.get("run_name") or results["model"], *cells]


def ordered_titles(results_list: Sequence[Mapping[str, Any]]) -> list[str]:
    """Benchmark columns: the paper's Table 1 order first, then any other benchmark in first-seen order."""
    seen = [b["title"] for r in results_list for b in r["benchmarks"].values()]
    return [t for t in PAPER_COLUMNS if t in seen] + list(dict.fromkeys(t for t in seen if t not in PAPER_COLUMNS))


def results_markdown(results: Mapping[str, Any]) -> str:
    """`results.md`: the paper's Table 1 layout (benchmarks as columns, Avg last) for one run."""
    titles = ordered_titles([results])
    protocol = results["protocol"]
    k, temperature = protocol["num_samples"], protocol["temperature"]
    metric = "greedy pass@1" if temperature == 0 else f"accuracy@{k} at temperature {temperature:g}"
    view = f", every image replaced by its `{protocol['perturbation']}` view" if protocol.get("perturbation") else ""
    lines = [
        f"# {results.get('run_name') or results['model']}",
        "",
        f"{metric}{view} (%, mean ± std over the {k} draws; Avg = mean over benchmarks). "
        f"Model `{results['model']}`, {protocol['backend']} backend, max {protocol['max_new_tokens']} new tokens, "
        f"seed {protocol['seed']}.",
        "",
        markdown_table(["Model", *titles, "Avg"], [run_row(results, titles)]),
        "n per benchmark: " + ", ".join(f"{b['title']} {b['n']}" for b in results["benchmarks"].values()),
        "",
    ]
    return "\n".join(lines)


def paper_rows(models: Sequence[str], titles: Sequence[str]) -> list[list[str]]:
    """The paper's Table 1 rows for `models` ('3B', '7B'), labelled as the paper's figures."""
    rows = []
    for label, values in PAPER_TABLE1.items():
        if not any(f"-{size}" in label for size in models):
            continue
        by_title = dict(zip(PAPER_COLUMNS, values[:-1], strict=True))
        average = values[-1] if all(t in by_title for t in titles) and len(titles) == len(PAPER_COLUMNS) else None
        cells = [_cell(by_title.get(t)) for t in titles] + [_cell(average) if average is not None else "—"]
        rows.append([f"paper Table 1: {label}", *cells])
    return rows


# --- comparison ---------------------------------------------------------------------------------------------------


def load_run(path: str | Path) -> dict[str, Any]:
    """A finished run's `results.json` (the run folder or the file); an incomplete or missing run is an error."""
    path = Path(path)
    file = path / "results.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} not found: {path} is not a finished cppo-eval run (results.json is written only when every "
            "sample is scored)"
        )
    results = json.loads(file.read_text(encoding="utf-8"))
    if not results.get("complete"):
        raise ValueError(f"{file} is marked incomplete")
    return results


def compare_runs(
    runs: Sequence[str | Path], output_dir: str | Path, paper_models: Sequence[str] = ("3B", "7B")
) -> str:
    """Table (printed and `compare.md`), `compare.json` and a bar chart `compare.png` of several runs, with the
    paper's Table 1 rows as labelled reference rows (only over the benchmarks the runs share with Table 1)."""
    if not runs:
        raise ValueError("compare needs at least one run folder")
    loaded = [load_run(run) for run in runs]
    titles = ordered_titles(loaded)
    rows = [run_row(r, titles) for r in loaded]
    shown_paper = [t for t in titles if t in PAPER_COLUMNS]
    reference = paper_rows(paper_models, titles) if shown_paper else []
    notes = ["Accuracy in %, mean ± std over draws; Avg = mean over each row's own benchmarks."]
    if reference:
        notes.append(
            "Rows starting with 'paper Table 1' are the paper's published figures (VLMEvalKit, accuracy@8, T = 1), "
            "not runs of this tool; their Avg is shown only when every Table 1 benchmark is a column."
        )
    text = markdown_table(["Model", *titles, "Avg"], rows + reference) + "\n" + "\n".join(notes) + "\n"
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "compare.md").write_text(text, encoding="utf-8")
    payload = {"titles": titles, "runs": [str(r) for r in runs], "rows": rows, "paper_rows": reference}
    (output_dir / "compare.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    plot_comparison(loaded, titles, paper_models if shown_paper else (), output_dir / "compare.png")
    return text


def plot_comparison(
    results_list: Sequence[Mapping[str, Any]], titles: Sequence[str], paper_models, path: Path
) -> None:
    """Grouped bars per benchmark (and Avg): one bar per run with its std as error bar, paper rows hatched."""
    from cppo_trl.core.plotting import headless_pyplot

    plt = headless_pyplot()
    series = []
    for results in results_list:
        by_title = {b["title"]: b for b in results["benchmarks"].values()}
        values = [100 * by_title[t]["accuracy"] if t in by_title else math.nan for t in titles] + [
            100 * results["average"]
        ]
        errors = [100 * (by_title[t]["std"] or 0) if t in by_title else 0 for t in titles] + [
            100 * (results.get("average_std") or 0)
        ]
        series.append((results.get("run_name") or results["model"], values, errors, False))
    for label, values in PAPER_TABLE1.items():
        if any(f"-{size}" in label for size in paper_models):
            by_title = dict(zip(PAPER_COLUMNS, values[:-1], strict=True))
            full = len(titles) == len(PAPER_COLUMNS) and all(t in by_title for t in titles)
            row = [by_title.get(t, math.nan) for t in titles] + [values[-1] if full else math.nan]
            series.append((f"paper: {label}", row, [0] * len(row), True))
    groups = [*titles, "Avg"]
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(min(14.0, 2.0 + 0.9 * len(groups) + 0.3 * len(series)), 4.5))
    for index, (label, values, errors, paper) in enumerate(series):
        positions = [g + (index - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(
            positions,
            values,
            width,
            yerr=errors,
            label=label,
            hatch="//" if paper else None,
            alpha=0.55 if paper else 0.9,
        )
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=20, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --- perturbation audit -------------------------------------------------------------------------------------------


def perturbation_audit(
    original: Mapping[str, Any], views: Mapping[str, Mapping[str, Any]], view_sets: Mapping[str, str]
) -> dict[str, Any]:
    """Per view: accuracy, drop against the original images (points, on the average over benchmarks and per
    benchmark) and a flag: a preserving view losing more than 2 points, a removing view losing fewer than 10."""
    rows = []
    for name, results in views.items():
        drop = 100 * (original["average"] - results["average"])
        kind = view_sets[name]
        if kind == "preserving" and drop > PRESERVING_MAX_DROP:
            flag = f"preserving view loses {drop:.1f} points (> {PRESERVING_MAX_DROP:g}): it removes information"
        elif kind == "removing" and drop < REMOVING_MIN_DROP:
            flag = f"removing view loses only {drop:.1f} points (< {REMOVING_MIN_DROP:g}): it keeps the answer"
        else:
            flag = None
        per_benchmark = {
            key: 100 * (original["benchmarks"][key]["accuracy"] - entry["accuracy"])
            for key, entry in results["benchmarks"].items()
        }
        paper = PAPER_TABLE6_AVG.get(name)
        rows.append(
            {
                "view": name,
                "set": kind,
                "average": results["average"],
                "drop": drop,
                "drop_per_benchmark": per_benchmark,
                "flag": flag,
                "paper_table6_drop": round(PAPER_TABLE6_ORIGINAL["Avg"] - paper, 1) if paper is not None else None,
            }
        )
    return {"original_average": original["average"], "views": rows}


def audit_markdown(
    original: Mapping[str, Any], views: Mapping[str, Mapping[str, Any]], audit: Mapping[str, Any]
) -> str:
    """The audit as the paper's Table 6: one row per view, accuracy per benchmark, drop and flag."""
    titles = ordered_titles([original, *views.values()])
    header = ["View", "Set", *titles, "Avg", "Drop (points)", "Flag"]
    rows = [["original", "—", *run_row(original, titles, with_std=False)[1:], "—", ""]]
    for entry in audit["views"]:
        cells = run_row(views[entry["view"]], titles, with_std=False)[1:]
        flag = f"**FLAG**: {entry['flag']}" if entry["flag"] else "ok"
        rows.append([entry["view"], entry["set"], *cells, f"{entry['drop']:.1f}", flag])
    lines = [
        f"Perturbation audit of `{original['model']}` (accuracy %, every image replaced by the view; drop = original "
        f"− view, on Avg). Flags: a preserving view losing > {PRESERVING_MAX_DROP:g} points, a removing view losing "
        f"< {REMOVING_MIN_DROP:g} points.",
        "",
        markdown_table(header, rows),
        "Paper Table 6 (Qwen2.5-VL-7B base, average of LogicVista, MathVista-mini, MathVision-mini, WeMath): original "
        f"{PAPER_TABLE6_ORIGINAL['Avg']}; "
        + ", ".join(
            f"{name} {value} ({value - PAPER_TABLE6_ORIGINAL['Avg']:+.1f})" for name, value in PAPER_TABLE6_AVG.items()
        )
        + ".",
        "",
    ]
    return "\n".join(lines)


# --- model card ---------------------------------------------------------------------------------------------------


def card_section(markdown: str) -> str:
    return f"{CARD_START}\n## Evaluation (cppo-eval)\n\n{markdown.strip()}\n{CARD_END}\n"


def with_card_section(card: str, markdown: str) -> str:
    """The card with its cppo-eval section replaced (re-runs do not pile up sections) or appended."""
    section = card_section(markdown)
    if CARD_START in card and CARD_END in card:
        before, rest = card.split(CARD_START, 1)
        return before + section + rest.split(CARD_END, 1)[1].lstrip("\n")
    return card.rstrip("\n") + ("\n\n" if card.strip() else "") + section


def update_local_card(model_dir: str | Path, markdown: str) -> Path:
    card = Path(model_dir) / "README.md"
    card.write_text(
        with_card_section(card.read_text(encoding="utf-8") if card.exists() else "", markdown), encoding="utf-8"
    )
    return card


def push_card(repo_id: str, markdown: str) -> None:
    """Append (or refresh) the section in the Hub repository's README.md."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        current = Path(hf_hub_download(repo_id, "README.md")).read_text(encoding="utf-8")
    except EntryNotFoundError:
        current = ""
    HfApi().upload_file(
        path_or_fileobj=with_card_section(current, markdown).encode("utf-8"),
        path_in_repo="README.md",
        repo_id=repo_id,
        commit_message="cppo-eval results",
    )
