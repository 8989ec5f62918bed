"""`--help` of every console script, every `python -m cppo_trl...` entry point (modules with a
`__main__` block, sub-packages with a `__main__.py`) and every benchmark script.

Discovered, not listed: `[project.scripts]` of pyproject.toml, the package modules with a `__main__` block and
`benchmarks/*.py`, so a script added later is covered. Each runs in its own process, in parallel: one interpreter
(`tests/scripts/run_help.py`) imports torch/transformers/TRL once and forks a child per entry point, which runs it as
the user's command would. argparse formats help text with `%`, so a help string with an unescaped `%` crashes
`--help`: this catches it.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path


try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "cppo_trl"
RUNNER = ROOT / "tests" / "scripts" / "run_help.py"


def entry_points() -> list[tuple[str, str, str]]:
    """(kind, target, name): console scripts as `module:function`, package modules, benchmark files."""
    entries = []
    for name, target in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"].items():
        entries.append(("script", target, name))
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if path.name == "__main__.py":  # `python -m` of a sub-package
            module = ".".join(parts[:-1])
            entries.append(("module", module, f"python -m {module}"))
        elif re.search(r"^if __name__ == .__main__.:", path.read_text(), flags=re.MULTILINE):
            module = ".".join(parts)
            entries.append(("module", module, f"python -m {module}"))
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        entries.append(("path", str(path), f"benchmarks/{path.name}"))
    return entries


def test_entry_points_are_discovered():
    names = {name for _, _, name in entry_points()}
    assert {"cppo-train", "cppo-visualize", "python -m cppo_trl.cppo", "python -m cppo_trl.scripts.visualize"} <= names
    assert {"benchmarks/bench.py", "benchmarks/gpu_check.py", "benchmarks/gpu_wheels.py"} <= names


def test_every_entry_point_prints_help():
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT / "src"), TOKENIZERS_PARALLELISM="false")
    entries = entry_points()
    result = subprocess.run(
        [sys.executable, str(RUNNER), json.dumps(entries)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(outputs) == {name for _, _, name in entries}
    failures = {name: out for name, (code, out) in outputs.items() if code != 0 or "usage:" not in out}
    assert not failures, "\n\n".join(f"{name}:\n{out[-3000:]}" for name, out in failures.items())
