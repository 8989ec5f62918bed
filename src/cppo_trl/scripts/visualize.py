"""Visual checks for CPPO: what the image views look like, and which completion tokens CPPO calls perception tokens.

Why: the two knobs users tune blind are the perturbation parameters (is the "removing" view really removing the
evidence? is the "preserving" view still legible?) and the perception-token selection (does ΔH single out the tokens
that depend on the image?). `perturbation_sheet` shows every transform side by side; `inspect_perception_tokens`
renders one completion with each token shaded by ΔH = H(I⁻) - H(I) and the selected tokens marked, in the spirit of
Figure 3 of the CPPO paper.

CLI::

    python -m cppo_trl.scripts.visualize perturbations --synthetic --out sheet.png
    python -m cppo_trl.scripts.visualize inspect --model PATH --synthetic --prompt "What is shown?" --out DIR
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image
import PIL.ImageDraw
import torch

from cppo_trl.core.images import PixelBudget, to_rgb
from cppo_trl.core.perception import entropy_from_logits, perception_token_count, select_perception_tokens
from cppo_trl.core.perturbations import (
    PRESERVING_PERTURBATIONS,
    REMOVING_PERTURBATIONS,
    PerturbationParams,
    apply_perturbation,
    make_views,
)
from cppo_trl.core.plotting import headless_pyplot


logger = logging.getLogger(__name__)

# Keys of a processor output that describe text positions (one value per prompt token); they are zero-extended over
# the completion for a teacher-forced pass.
_TEXT_SIDE_KEYS = ("token_type_ids", "mm_token_type_ids")


def synthetic_image(size: int = 224, seed: int = 0) -> PIL.Image.Image:
    """A deterministic image with a few coloured shapes, so every command runs without any input file."""
    rng = random.Random(seed)
    image = PIL.Image.new("RGB", (size, size), (235, 235, 225))
    draw = PIL.ImageDraw.Draw(image)
    for i in range(5):
        x0, y0 = rng.randrange(size * 3 // 4), rng.randrange(size * 3 // 4)
        side = rng.randrange(size // 8, size // 3)
        color = tuple(rng.randrange(40, 230) for _ in range(3))
        (draw.ellipse if i % 2 else draw.rectangle)((x0, y0, x0 + side, y0 + side), fill=color)
    draw.text((size // 10, size // 10), "7", fill=(0, 0, 0))
    return image


# --------------------------------------------------------------------------------------------------- perturbations
def perturbation_sheet(
    image: PIL.Image.Image,
    params: PerturbationParams | None = None,
    seed: int = 0,
    out_png: str | Path = "perturbations.png",
) -> dict[str, Any]:
    """One labelled PNG grid: the original, every information-preserving and every information-removing transform.

    Every name in `PRESERVING_PERTURBATIONS` and `REMOVING_PERTURBATIONS` is shown (not only the ones enabled in
    `params`), each applied with a generator seeded by `seed`, so the sheet is reproducible and shows what enabling a
    transform would do. Returns metadata: the panel labels/kinds in order, the grid shape and the output path.
    """
    params = params or PerturbationParams()
    rgb = to_rgb(image)
    panels: list[tuple[str, str, PIL.Image.Image]] = [("original", "original", rgb)]
    for kind, names in (("preserving", PRESERVING_PERTURBATIONS), ("removing", REMOVING_PERTURBATIONS)):
        for name in names:
            generator = torch.Generator().manual_seed(seed)
            panels.append((name, kind, apply_perturbation(rgb, name, params, generator)))

    plt = headless_pyplot()
    cols = min(len(panels), 5)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.3 * rows), squeeze=False)
    colors = {"original": "black", "preserving": "tab:green", "removing": "tab:red"}
    for ax, (name, kind, panel) in zip(axes.flat, panels, strict=False):
        ax.imshow(panel)
        enabled = name in params.preserving_perturbations or name in params.removing_perturbations
        suffix = "" if kind == "original" or enabled else " (off)"
        ax.set_title(f"{name}{suffix}\n[{kind}]", color=colors[kind], fontsize=10)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(f"CPPO views (seed {seed}): green = information-preserving, red = information-removing")
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    logger.info("wrote perturbation sheet with %d panels to %s", len(panels), out_png)
    return {
        "path": str(out_png),
        "panels": [{"name": name, "kind": kind} for name, kind, _ in panels],
        "num_panels": len(panels),
        "grid": (rows, cols),
        "seed": seed,
    }


# ------------------------------------------------------------------------------------------------ perception tokens
@dataclass
class PerceptionInspection:
    """Everything the inspector computed, so callers (and tests) can check the page against a direct computation."""

    prompt_text: str
    completion_text: str
    token_ids: list[int]
    tokens: list[str]
    anchor_entropy: torch.Tensor  # (T,)
    removed_entropy: torch.Tensor  # (T,)
    selected: torch.Tensor  # (T,) bool
    top_fraction: float
    score: str
    k: int
    removing_name: str
    paths: dict[str, str] = field(default_factory=dict)

    @property
    def delta(self) -> torch.Tensor:
        return self.removed_entropy - self.anchor_entropy


def _load(model_path: str | Path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_path)
    model.eval()
    return model, AutoProcessor.from_pretrained(model_path)


def _prompt_text(processor, prompt_text: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt_text}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _teacher_forced_entropy(model, processor, text: str, image, completion_ids: torch.Tensor) -> torch.Tensor:
    """Entropy (T,) of the next-token distribution at each completion position, with `image` as the input image."""
    encoded = processor(text=[text], images=[[image]], return_tensors="pt")
    prompt_ids = encoded.pop("input_ids")
    encoded.pop("attention_mask", None)
    t = completion_ids.numel()
    input_ids = torch.cat([prompt_ids, completion_ids[None]], dim=1)
    for key in _TEXT_SIDE_KEYS:
        if key in encoded:
            encoded[key] = torch.cat([encoded[key], encoded[key].new_zeros(1, t)], dim=1)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **encoded).logits
    # Logit at position p predicts token p + 1: the completion's T tokens are predicted by positions L-1 .. L+T-2.
    return entropy_from_logits(logits[0, prompt_ids.size(1) - 1 : -1].float())


def _generate(model, processor, text: str, image, max_new_tokens: int) -> torch.Tensor:
    """Greedy completion ids, cut at the first end-of-sequence token (ids, not text: a decode/encode round trip of
    a byte-level tokenizer does not give the same tokens back)."""
    encoded = processor(text=[text], images=[[image]], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False)
    ids = out[0, encoded["input_ids"].size(1) :]
    eos = model.generation_config.eos_token_id
    stops = set(eos if isinstance(eos, list) else [eos]) | {processor.tokenizer.pad_token_id}
    keep = [i for i, t in enumerate(ids.tolist()) if t in stops]
    return ids[: keep[0]] if keep else ids


def _token_strings(tokenizer, ids: list[int]) -> list[str]:
    """Each token's own text (decoded alone), so the page shows readable pieces rather than byte-level symbols."""
    return [tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False) for i in ids]


def inspect_perception_tokens(
    model_path_or_trainer_output_dir: str | Path,
    image: PIL.Image.Image,
    prompt_text: str,
    completion_text: str | None,
    out_dir: str | Path,
    top_fraction: float = 0.5,
    score: str = "raw",
    seed: int = 0,
    params: PerturbationParams | None = None,
    max_new_tokens: int = 32,
) -> PerceptionInspection:
    """Teacher-force one completion with the original image and an information-removing view, and render ΔH.

    Writes `perception_tokens.html` (image embedded, tokens shaded red for ΔH > 0 / blue for ΔH < 0, selected
    tokens bold and underlined, a legend with K and the score) and `perception_tokens.png` into `out_dir`, plus the
    raw numbers as `perception_tokens.json`. The removing view is `make_views(image, params, seed).removed`, the
    same draw the trainer makes for that seed. Without `completion_text`, a greedy completion is generated first.
    """
    model, processor = _load(model_path_or_trainer_output_dir)
    rgb = to_rgb(image)  # views are drawn before the processor's resize, as the trainer draws them
    budget = PixelBudget.from_processor(processor)
    params = params or PerturbationParams()
    text = _prompt_text(processor, prompt_text)
    if completion_text is None:
        ids = _generate(model, processor, text, rgb, max_new_tokens)
        completion_text = processor.tokenizer.decode(ids)
        logger.info("generated completion: %r", completion_text)
    else:
        ids = processor.tokenizer(completion_text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if ids.numel() == 0:
        raise ValueError("the completion is empty: nothing to inspect (pass --completion)")
    views = make_views(rgb, params, seed, None if budget is None else budget.token_grid(*rgb.size))
    anchor = _teacher_forced_entropy(model, processor, text, rgb, ids)
    removed = _teacher_forced_entropy(model, processor, text, views.removed, ids)
    mask = torch.ones_like(anchor, dtype=torch.bool)
    selected = select_perception_tokens(anchor[None], removed[None], mask[None], top_fraction, score)[0]
    n_pos = int(((removed - anchor) > 0).sum())
    k = max(1, int(perception_token_count(torch.tensor(n_pos), top_fraction))) if n_pos else 0
    result = PerceptionInspection(
        prompt_text=prompt_text,
        completion_text=completion_text,
        token_ids=ids.tolist(),
        tokens=_token_strings(processor.tokenizer, ids.tolist()),
        anchor_entropy=anchor,
        removed_entropy=removed,
        selected=selected,
        top_fraction=top_fraction,
        score=score,
        k=k,
        removing_name=views.removing_name,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result.paths = {
        "html": str(_write_html(result, rgb, views.removed, out_dir / "perception_tokens.html")),
        "png": str(_write_png(result, rgb, views.removed, out_dir / "perception_tokens.png")),
        "json": str(out_dir / "perception_tokens.json"),
    }
    payload = {
        "prompt": prompt_text,
        "completion": completion_text,
        "tokens": result.tokens,
        "token_ids": result.token_ids,
        "anchor_entropy": anchor.tolist(),
        "removed_entropy": removed.tolist(),
        "delta_entropy": result.delta.tolist(),
        "selected": selected.tolist(),
        "k": k,
        "top_fraction": top_fraction,
        "score": score,
        "removing_perturbation": views.removing_name,
    }
    Path(result.paths["json"]).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    logger.info("selected %d/%d tokens (K=%d); wrote %s", int(selected.sum()), ids.numel(), k, out_dir)
    return result


def _shade(delta: float, scale: float) -> tuple[float, float, float, float]:
    """RGBA: red for ΔH > 0, blue for ΔH < 0, opacity proportional to |ΔH| / max |ΔH|."""
    alpha = 0.0 if scale <= 0 else min(1.0, abs(delta) / scale) * 0.85
    return (0.86, 0.15, 0.15, alpha) if delta > 0 else (0.15, 0.3, 0.86, alpha)


def _b64_png(image: PIL.Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _write_html(result: PerceptionInspection, image, removed_view, path: Path) -> Path:
    delta = result.delta.tolist()
    scale = max((abs(d) for d in delta), default=0.0)
    spans = []
    for i, (token, d, sel) in enumerate(zip(result.tokens, delta, result.selected.tolist(), strict=True)):
        r, g, b, a = _shade(d, scale)
        style = f"background: rgba({int(r * 255)},{int(g * 255)},{int(b * 255)},{a:.3f})"
        cls = "tok sel" if sel else "tok"
        title = f"ΔH={d:+.4f} H(I)={result.anchor_entropy[i]:.4f} H(I⁻)={result.removed_entropy[i]:.4f}"
        spans.append(
            f'<span class="{cls}" data-index="{i}" data-selected="{int(sel)}" data-delta="{d:.6f}" '
            f'style="{style}" title="{html.escape(title)}">{html.escape(token)}</span>'
        )
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>CPPO perception tokens</title>
<style>
body {{ font-family: sans-serif; max-width: 60em; margin: 2em auto; }}
.tok {{ font-family: monospace; white-space: pre-wrap; padding: 1px 0; }}
.sel {{ font-weight: bold; text-decoration: underline; }}
.images img {{ width: 224px; image-rendering: pixelated; margin-right: 1em; }}
.legend span {{ padding: 0 0.4em; margin-right: 1em; }}
</style></head><body>
<h1>CPPO perception tokens</h1>
<div class="images"><figure style="display:inline-block"><img src="data:image/png;base64,{_b64_png(image)}">
<figcaption>original I</figcaption></figure><figure style="display:inline-block">
<img src="data:image/png;base64,{_b64_png(removed_view)}">
<figcaption>removing view I⁻ ({html.escape(result.removing_name)})</figcaption></figure></div>
<p><b>Prompt:</b> {html.escape(result.prompt_text)}</p>
<p class="legend"><span style="background: rgba(219,38,38,0.7)">ΔH &gt; 0 (more uncertain without the evidence)</span>
<span style="background: rgba(38,76,219,0.7)">ΔH &lt; 0</span>
<span class="tok sel">selected perception token</span></p>
<p>ΔH = H(I⁻) − H(I); score = <code>{html.escape(result.score)}</code>; top fraction = {result.top_fraction};
K = {result.k}; selected = {int(result.selected.sum())} of {len(result.tokens)} tokens; max |ΔH| = {scale:.4f}.</p>
<div class="completion">{"".join(spans)}</div>
</body></html>
"""
    path.write_text(page, encoding="utf-8")
    return path


def _write_png(result: PerceptionInspection, image, removed_view, path: Path) -> Path:
    """The same page as a figure: both images on top, the shaded tokens laid out in monospace lines below."""
    plt = headless_pyplot()
    delta = result.delta.tolist()
    scale = max((abs(d) for d in delta), default=0.0)
    fontsize = 9
    # Monospace glyphs are ~0.6 em wide: one x unit = one character, so boxes match the text they shade.
    chars_per_line = int(0.96 * 10 * 72 / (0.6 * fontsize))
    lines, line, width = [], [], 0
    for i, token in enumerate(result.tokens):
        shown = token.replace("\n", "⏎") or "∅"
        if width + len(shown) > chars_per_line and line:
            lines.append(line)
            line, width = [], 0
        line.append((i, shown, width))
        width += len(shown)
    lines.append(line)
    text_height = 0.22 * len(lines) + 0.3
    fig = plt.figure(figsize=(10, 3.2 + text_height))
    top = 3.2 / (3.2 + text_height)
    for j, (img, caption) in enumerate(((image, "original I"), (removed_view, f"I⁻: {result.removing_name}"))):
        ax = fig.add_axes((0.05 + 0.3 * j, 1 - top + 0.02, 0.25, top - 0.08))
        ax.imshow(img)
        ax.set_title(caption, fontsize=9)
        ax.axis("off")
    fig.text(
        0.65,
        1 - top / 2,
        f"score={result.score}\ntop fraction={result.top_fraction}\nK={result.k}, selected="
        f"{int(result.selected.sum())}/{len(result.tokens)}\nred: ΔH>0, blue: ΔH<0\nbold+underline: selected",
        fontsize=9,
        va="center",
    )
    ax = fig.add_axes((0.02, 0.02, 0.96, 1 - top - 0.04))
    ax.set_xlim(0, chars_per_line)
    ax.set_ylim(len(lines), 0)
    ax.axis("off")
    selected = result.selected.tolist()
    for row, items in enumerate(lines):
        for i, shown, x in items:
            ax.add_patch(plt.Rectangle((x, row + 0.1), len(shown), 0.8, color=_shade(delta[i], scale), lw=0))
            ax.text(
                x,
                row + 0.5,
                shown,
                family="monospace",
                fontsize=9,
                va="center",
                fontweight="bold" if selected[i] else "normal",
            )
            if selected[i]:
                ax.plot([x, x + len(shown)], [row + 0.88, row + 0.88], color="black", lw=1)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------------------- CLI
def _image_arg(args) -> PIL.Image.Image:
    if args.synthetic or not args.image:
        return synthetic_image(seed=args.seed)
    return PIL.Image.open(args.image)


def main(argv: list[str] | None = None) -> int:
    """`python -m cppo_trl.scripts.visualize {perturbations,inspect} ...`."""
    parser = argparse.ArgumentParser(prog="python -m cppo_trl.scripts.visualize", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, helptext in (("perturbations", "grid of every view transform"), ("inspect", "perception tokens")):
        p = sub.add_parser(name, help=helptext)
        group = p.add_mutually_exclusive_group(required=True)
        group.add_argument("--image", help="input image path")
        group.add_argument("--synthetic", action="store_true", help="use a generated image")
        p.add_argument("--seed", type=int, default=0)
    sub.choices["perturbations"].add_argument("--out", required=True, help="output PNG")
    inspect = sub.choices["inspect"]
    inspect.add_argument("--model", required=True, help="model folder (e.g. a trainer output_dir)")
    inspect.add_argument("--prompt", required=True)
    inspect.add_argument("--completion", default=None, help="completion to score; generated greedily if omitted")
    inspect.add_argument("--out", required=True, help="output folder")
    inspect.add_argument("--top-fraction", type=float, default=0.5)
    inspect.add_argument("--score", choices=("raw", "normalized"), default="raw")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    image = _image_arg(args)
    if args.command == "perturbations":
        meta = perturbation_sheet(image, seed=args.seed, out_png=args.out)
        logger.info("panels: %s", ", ".join(p["name"] for p in meta["panels"]))
    else:
        result = inspect_perception_tokens(
            args.model, image, args.prompt, args.completion, args.out, args.top_fraction, args.score, args.seed
        )
        logger.info("html: %s png: %s", result.paths["html"], result.paths["png"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
