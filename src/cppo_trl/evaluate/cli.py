"""The `cppo-eval` command line: `cppo-eval --config recipes/eval/*.yaml [--field value ...]` and `cppo-eval compare`."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cppo_trl import evaluate as evaluate_package
from cppo_trl.evaluate import report
from cppo_trl.evaluate.arguments import EvalArguments
from cppo_trl.evaluate.evaluation import AUDIT_MD, run_evaluation
from cppo_trl.evaluate.runner import RESULTS_MD


def make_parser():
    """The parser every eval recipe goes through (`tests/test_evaluate_cli.py` parses each one with it)."""
    from trl import TrlParser

    parser = TrlParser((EvalArguments,))
    parser.prog = "cppo-eval"
    parser.description = evaluate_package.__doc__.split("\n\n")[0]
    parser.epilog = (
        "cppo-eval compare RUN_A RUN_B ...: table and bar chart of finished runs (see cppo-eval compare --help)."
    )
    return parser


def compare_main(argv: Sequence[str]) -> str:
    """`cppo-eval compare RUN [RUN ...]`: table, bar chart and JSON of finished runs, with the paper's rows."""
    import argparse

    parser = argparse.ArgumentParser(prog="cppo-eval compare", description=compare_main.__doc__)
    parser.add_argument("runs", nargs="+", help="Run folders (or their results.json) of finished cppo-eval runs.")
    parser.add_argument("--output_dir", default="outputs/eval/compare", help="Where compare.md/.json/.png go.")
    parser.add_argument(
        "--paper",
        nargs="*",
        default=["3B", "7B"],
        choices=["3B", "7B", "none"],
        help="Which of the paper's Table 1 model sizes to show as reference rows ('none' for no row).",
    )
    parsed = parser.parse_args(list(argv))
    sizes = [] if "none" in parsed.paper else parsed.paper
    table = report.compare_runs(parsed.runs, parsed.output_dir, sizes)
    print(table)
    print(f"written: {Path(parsed.output_dir) / 'compare.md'}, compare.json, compare.png")
    return table


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | str:
    """Console entry point (`cppo-eval`, `python -m cppo_trl.evaluate`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", stream=sys.stdout
    )
    if argv and argv[0] == "compare":
        return compare_main(argv[1:])
    (args,) = make_parser().parse_args_and_config(args=argv)
    results = run_evaluation(args)
    out = Path(args.output_dir)
    if results and (out / RESULTS_MD).exists():  # the main process prints (the others return no results)
        print((out / RESULTS_MD).read_text(encoding="utf-8"))
    if results and (out / AUDIT_MD).exists():
        print((out / AUDIT_MD).read_text(encoding="utf-8"))
    return results


def cli(argv: Sequence[str] | None = None) -> None:
    """The console script: runs `main` and exits 0 (a console wrapper would `sys.exit` `main`'s results dict,
    which prints it and exits 1)."""
    main(argv)
