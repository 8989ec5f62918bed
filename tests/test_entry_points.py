"""`--help` of every console script, every `python -m cppo_trl.<module>` entry point and every benchmark script.

Discovered, not listed: `[project.scripts]` of pyproject.toml, the package modules with a `__main__` block and
`benchmarks/*.py`, so a script added later is covered. Each runs as a user runs it (a subprocess), all in parallel.
A help string with an unescaped `%` (argparse formats help text) once crashed `cppo-train --help`.
"""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest


try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "cppo_trl"


def entry_points() -> dict[str, list[str]]:
    commands = {}
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for name, target in scripts.items():
        module, function = target.split(":")
        # What the installed console script does (`sys.exit(function())`), without depending on the installed copy.
        code = f"import sys; from {module} import {function}; sys.argv[0] = {name!r}; sys.exit({function}())"
        commands[f"script:{name}"] = [sys.executable, "-c", code, "--help"]
    for path in sorted(PACKAGE.glob("*.py")):
        if re.search(r"^if __name__ == .__main__.:", path.read_text(), flags=re.MULTILINE):
            commands[f"module:cppo_trl.{path.stem}"] = [sys.executable, "-m", f"cppo_trl.{path.stem}", "--help"]
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        commands[f"benchmark:{path.name}"] = [sys.executable, str(path), "--help"]
    return commands


def test_entry_points_are_discovered():
    found = set(entry_points())
    assert {"script:cppo-train", "script:cppo-visualize", "module:cppo_trl.cppo"} <= found
    assert {"benchmark:bench.py", "benchmark:gpu_check.py", "benchmark:gpu_wheels.py"} <= found


def test_every_entry_point_prints_help():
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT / "src"))
    started = time.perf_counter()
    running = {
        name: subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, command in entry_points().items()
    }
    failures = {}
    for name, process in running.items():
        try:
            out, err = process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            failures[name] = "timed out"
            continue
        if process.returncode != 0 or "usage:" not in out:
            failures[name] = f"exit {process.returncode}\n{out[-1500:]}\n{err[-3000:]}"
    assert not failures, "\n\n".join(f"{name}: {why}" for name, why in failures.items())
    elapsed = time.perf_counter() - started
    if elapsed > 60:
        pytest.fail(f"--help of {len(running)} entry points took {elapsed:.0f} s")
