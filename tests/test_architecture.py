"""The package's layout is its architecture (docs/architecture.md): imports flow one way, from the pure code up to the
command-line tools, with no circle, and the pure code never imports TRL.

Every `import` statement of every module counts, also those inside functions: a lazy import that points upwards is
still a dependency a reader has to hold in mind.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest


PACKAGE = Path(__file__).resolve().parents[1] / "src" / "cppo_trl"

# Lower layers never import higher ones. A layer is a sub-package or a top-level module.
LAYERS = {
    "core": 0,  # pure tensor and image code
    "testing": 0,  # tiny offline models
    "data": 1,  # loaders, generated tasks, rewards, the recipe's script arguments
    "trainer": 2,  # TRL glue: the rails, CPPO, PAPO
    "recipe": 3,  # the method switch and a recipe's parser
    "evaluate": 4,  # cppo-eval
    "scripts": 5,  # training script, demo, visualisers
    "cppo": 6,  # `python -m cppo_trl.cppo`, the recipes' launch name
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every cppo_trl module `path` imports (a `from pkg import name` of a sub-module counts as that sub-module)."""
    tree = ast.parse(path.read_text())
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                is_module = (PACKAGE.parent / Path(*candidate.split("."))).with_suffix(".py").exists() or (
                    PACKAGE.parent / Path(*candidate.split("."))
                ).is_dir()
                found.add(candidate if is_module else base)
    return {name for name in found if name == "cppo_trl" or name.startswith("cppo_trl.")}


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    return None if len(parts) == 1 else LAYERS[parts[1]]


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
GRAPH = {name: imported_modules(path) - {name} for name, path in MODULES.items()}


def test_every_module_has_a_layer():
    unplaced = sorted({name.split(".")[1] for name in MODULES if name != "cppo_trl"} - set(LAYERS))
    assert not unplaced, f"add these to LAYERS and docs/architecture.md: {unplaced}"


@pytest.mark.parametrize("module", [m for m in MODULES if m != "cppo_trl"])
def test_imports_flow_one_way(module):
    """A module imports only its own layer or lower ones; the root `cppo_trl` (lazy public API) is never imported."""
    upward = sorted(
        target
        for target in GRAPH[module]
        if target == "cppo_trl" or (layer_of(target) is not None and layer_of(target) > layer_of(module))
    )
    assert not upward, f"{module} imports upwards: {upward}"


def test_no_import_circle():
    def cycle_from(start):
        stack, on_path = [(start, iter(sorted(GRAPH[start])))], [start]
        while stack:
            node, children = stack[-1]
            child = next((c for c in children if c in GRAPH), None)
            if child is None:
                stack.pop()
                on_path.pop()
            elif child == start:
                return [*on_path, start]
            elif child not in on_path:
                stack.append((child, iter(sorted(GRAPH[child]))))
                on_path.append(child)
        return None

    circles = [cycle for cycle in map(cycle_from, GRAPH) if cycle]
    assert not circles, circles


def test_pure_code_never_imports_trl():
    offenders = {
        name: sorted(target for target in _all_imports(MODULES[name]) if target.split(".")[0] == "trl")
        for name in MODULES
        if name.startswith("cppo_trl.core")
    }
    assert not any(offenders.values()), offenders
    code = "import sys, cppo_trl.core.images, cppo_trl.core.perception, cppo_trl.core.perturbations, "
    code += "cppo_trl.core.masking, cppo_trl.core.plotting; print('trl' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr[-2000:]


def _all_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_the_public_api_is_unchanged():
    import cppo_trl

    assert set(cppo_trl.__all__) >= {"CPPOConfig", "CPPOTrainer", "PAPOConfig", "PAPOTrainer"}
    for name in cppo_trl.__all__:
        assert getattr(cppo_trl, name) is not None
    assert cppo_trl.CPPOTrainer.__module__ == "cppo_trl.trainer.cppo_trainer"
