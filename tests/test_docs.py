"""The README and `docs/` as a user reads them: every command they show parses with the real entry point's parser,
every file and link they name exists, the Python examples run, the field tables list every config field, and no page
talks about the project's tracker instead of the software.

Commands are parsed, not run: most of them need GPUs and the Hub. Each one goes through the parser its entry point
uses (the training recipe parser, `cppo-eval`'s, accelerate's launcher, the argparse of each script), so a renamed
flag, a moved module, a missing recipe or a removed make target fails here.
"""

import argparse
import dataclasses
import re
import runpy
import shlex
from pathlib import Path
from unittest import mock

import pytest


ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXPECTED_PAGES = {
    "method.md",
    "papo.md",
    "recipes.md",
    "gpu.md",
    "evaluation.md",
    "cost_and_comparison.md",
    "reliability.md",
    "architecture.md",
    "agents.md",
}
SKIP_MARK = "<!-- not run by tests/test_docs.py:"
EXTERNAL = {"pip", "git", "cp", "huggingface-cli", "trl", "export", "cd", "source"}


def fenced_blocks(page: Path, language: str) -> list[tuple[str, bool]]:
    """(code, skipped) of every ```language block; `skipped` when the line before the fence is a SKIP_MARK comment."""
    lines = page.read_text().splitlines()
    blocks, index = [], 0
    while index < len(lines):
        if lines[index].strip() == f"```{language}":
            end = next(i for i in range(index + 1, len(lines)) if lines[i].strip() == "```")
            skipped = index > 0 and lines[index - 1].startswith(SKIP_MARK)
            blocks.append(("\n".join(lines[index + 1 : end]), skipped))
            index = end
        index += 1
    return blocks


def shell_commands(block: str) -> list[list[str]]:
    """The block's commands as argv lists: continuation lines joined, comments dropped, `VAR="..."` assignments
    substituted, simple `for x in ...; do ...; done` loops unrolled, `&&` / `;` chains split."""
    text = re.sub(r"\\\n\s*", " ", block)
    variables: dict[str, str] = {}
    commands: list[list[str]] = []
    lines = iter(text.splitlines())
    for line in lines:
        loop = re.match(r"\s*for (\w+) in (.+?); do\s*$", line)
        if loop:
            body = []
            for inner in lines:
                if inner.strip() == "done":
                    break
                body.append(inner)
            for value in loop.group(2).split():
                for inner in body:
                    commands.extend(_split(inner.replace(f"${loop.group(1)}", value), variables))
            continue
        assignment = re.match(r'\s*([A-Z_]+)="(.*)"\s*$', line)
        if assignment:
            variables[assignment.group(1)] = assignment.group(2)
            continue
        commands.extend(_split(line, variables))
    return commands


def _split(line: str, variables: dict[str, str]) -> list[list[str]]:
    for name, value in variables.items():
        line = line.replace(f"${name}", value)
    line = re.sub(r"\$\w+", "1", line)  # placeholders such as $NODE_RANK
    tokens = shlex.split(line, comments=True)
    commands, current = [], []
    for token in tokens:
        if token in ("&&", ";", "||"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    return [command for command in commands if command]


class _Parsed(Exception):
    """Raised once an argparse parser has accepted a command line, so that the script does not go on to run."""


def _run_argparse(main, argv: list[str]) -> None:
    """Run an argparse entry point until its outermost parse succeeds (sub-parsers parse inside it), then stop."""
    original = argparse.ArgumentParser.parse_known_args
    depth = [0]

    def parse_known_args(self, args=None, namespace=None):
        depth[0] += 1
        try:
            result = original(self, args, namespace)
        finally:
            depth[0] -= 1
        if depth[0] == 0:
            raise _Parsed(result)
        return result

    with mock.patch.object(argparse.ArgumentParser, "parse_known_args", parse_known_args), pytest.raises(_Parsed):
        main(argv)


def check_training(argv: list[str]) -> None:
    from cppo_trl.recipe import parse_args

    # A GPU recipe's mixed precision must not stop the parse on a CPU machine; flag names and values still count.
    parse_args([*argv, "--bf16", "false", "--fp16", "false", "--report_to", "none"])


def check_eval(argv: list[str]) -> None:
    from cppo_trl.evaluate.cli import compare_main, make_parser

    if argv[:1] == ["compare"]:
        _run_argparse(compare_main, argv[1:])
    else:
        make_parser().parse_args_and_config(args=argv)


def check_module(module: str, argv: list[str]) -> None:
    if module == "cppo_trl.cppo" or module == "cppo_trl.scripts.train":
        return check_training(argv)
    if module == "cppo_trl.evaluate":
        return check_eval(argv)
    if module == "cppo_trl.scripts.demo":
        from cppo_trl.scripts.demo import main
    elif module == "cppo_trl.scripts.visualize":
        from cppo_trl.scripts.visualize import main
    else:
        raise AssertionError(f"no parser check for `python -m {module}`: add one to tests/test_docs.py")
    _run_argparse(main, argv)


def check_command(argv: list[str], targets: set[str]) -> None:
    env = 0
    while env < len(argv) and re.match(r"^[A-Z_]+=", argv[env]):
        env += 1  # `HF_HUB_OFFLINE=1 cmd ...`
    program, args = argv[env], argv[env + 1 :]
    if program == "make":
        missing = [a for a in args if "=" not in a and a not in targets]
        assert not missing, f"make targets {missing} are not in the Makefile"
    elif program == "accelerate":
        from accelerate.commands.launch import launch_command_parser

        assert args[0] == "launch", argv
        launched = launch_command_parser().parse_args(args[1:])
        if launched.config_file:
            assert (ROOT / launched.config_file).is_file(), launched.config_file
        assert launched.module, f"accelerate commands in the docs launch a module with -m: {argv}"
        check_module(launched.training_script, launched.training_script_args)
    elif program == "cppo-train":
        check_training(args)
    elif program == "cppo-eval":
        check_eval(args)
    elif program == "cppo-visualize":
        from cppo_trl.scripts.visualize import main

        _run_argparse(main, args)
    elif program in ("python", "python3"):
        if args[0] == "-m":
            check_module(args[1], args[2:])
        else:
            script = ROOT / args[0]
            assert script.is_file(), f"{args[0]} does not exist"
            _run_argparse(runpy.run_path(str(script), run_name="docs_check")["main"], args[1:])
    else:
        assert program in EXTERNAL, f"unknown command {program!r} in the docs: add a check to tests/test_docs.py"


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), flags=re.MULTILINE))


COMMANDS = [
    pytest.param(command, id=f"{page.name}:{' '.join(command)[:70]}")
    for page in PAGES
    for block, _ in fenced_blocks(page, "bash")
    for command in shell_commands(block)
]


def test_pages_exist_and_say_what_they_are_for():
    assert {page.name for page in PAGES if page.parent.name == "docs"} >= EXPECTED_PAGES
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    for name in EXPECTED_PAGES:
        assert f"docs/{name}" in readme, f"the README does not point to docs/{name}"
        text = (ROOT / "docs" / name).read_text()
        assert text.startswith("# ") and "What this page is for:" in text.split("\n\n", 2)[1], name


def test_every_page_has_commands_and_each_is_checked():
    assert len(COMMANDS) > 40
    assert {"make demo", "make test"} <= {" ".join(p.values[0]) for p in COMMANDS}


@pytest.mark.parametrize("command", COMMANDS)
def test_command_parses(command, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    check_command(command, makefile_targets())


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def test_links_and_anchors_resolve():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"https?://", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and file.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", file.read_text(), flags=re.MULTILINE)
                if anchor not in {_anchor(h) for h in headings}:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


def test_named_files_exist():
    """Every repository path the pages quote in backticks (recipes, scripts, modules, tests) exists."""
    missing = []
    for page in PAGES:
        for path in re.findall(r"`((?:recipes|benchmarks|tests|src|docs)/[\w./{},-]+)`", page.read_text()):
            for expanded in _brace_expand(path):
                if not (ROOT / expanded).exists() and not (ROOT / "recipes" / expanded).exists():
                    missing.append(f"{page.name}: {expanded}")
        for path in re.findall(r"`(cppo_trl/[\w/]+\.py)`", page.read_text()):
            if not (ROOT / "src" / path).exists():
                missing.append(f"{page.name}: {path}")
    recipe_rows = re.findall(r"^\| `([^`]+\.yaml)`", (ROOT / "README.md").read_text(), flags=re.MULTILINE)
    for row in recipe_rows:
        for part in row.split("`, `"):
            for expanded in _brace_expand(part):
                if not (ROOT / "recipes" / expanded).exists():
                    missing.append(f"README recipe table: {expanded}")
    assert not missing, missing


def test_module_map_lists_every_module():
    """docs/architecture.md's tree names every module of the package, and only modules that exist."""
    tree = (ROOT / "docs" / "architecture.md").read_text().split("```")[1]
    named = set(re.findall(r"(?<![*\w])([a-z][a-z_]*\.py)", tree))
    package = ROOT / "src" / "cppo_trl"
    modules = {p.name for p in package.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    assert modules - named == set(), "modules missing from the module map"
    assert named - modules - {"__init__.py"} == set(), "the module map names files that do not exist"


def _brace_expand(path: str) -> list[str]:
    match = re.search(r"\{([^}]+)\}", path)
    if not match:
        return [path]
    return [
        e
        for option in match.group(1).split(",")
        for e in _brace_expand(path[: match.start()] + option + path[match.end() :])
    ]


def test_python_examples_run(tmp_path, monkeypatch):
    """README's example trains two steps; the PAPO page's runs in its namespace (it reuses model, data and reward)."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for page in [ROOT / "README.md", ROOT / "docs" / "papo.md", *PAGES]:
        for code, skipped in fenced_blocks(page, "python"):
            compile(code, str(page), "exec")  # every example at least compiles
            if skipped or page.name not in ("README.md", "papo.md") or code in namespace.get("__ran__", set()):
                continue
            exec(code, namespace)
            namespace.setdefault("__ran__", set()).add(code)
            assert "trainer" in namespace and namespace["trainer"].state.global_step == 2
    assert (tmp_path / "outputs" / "example").is_dir()


def _documented_fields(page: str) -> set[str]:
    return set(re.findall(r"^\| `(\w+)`", (ROOT / "docs" / page).read_text(), flags=re.MULTILINE)) | {
        name
        for row in re.findall(r"^\| (`\w+`(?:, `\w+`)+) \|", (ROOT / "docs" / page).read_text(), re.M)
        for name in re.findall(r"`(\w+)`", row)
    }


def test_field_tables_list_every_new_field():
    from trl import GRPOConfig

    from cppo_trl import CPPOConfig, PAPOConfig

    grpo = {f.name for f in dataclasses.fields(GRPOConfig)}
    for config, page in ((CPPOConfig, "method.md"), (PAPOConfig, "papo.md")):
        new = {f.name for f in dataclasses.fields(config)} - grpo
        assert new <= _documented_fields(page), sorted(new - _documented_fields(page))


TRACKER_WORDS = re.compile(r"\bissue \d|\(issue|SPEC §|STYLE §|this task\b|was lent|this session", re.IGNORECASE)


def test_no_word_of_the_tracker():
    """User-facing text says what the software does and why, not where a change came from."""
    files = [
        *PAGES,
        *(ROOT / "recipes").rglob("*.yaml"),
        *(ROOT / "src").rglob("*.py"),
        *(ROOT / "benchmarks").glob("*.py"),
    ]
    hits = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in files
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if TRACKER_WORDS.search(line) and "their issue #" not in line
    ]
    assert not hits, "\n".join(hits)


def test_readme_shows_the_citation():
    from cppo_trl import CPPOTrainer

    readme = (ROOT / "README.md").read_text()
    assert CPPOTrainer._paper["id"] == "2601.00501" and "2601.00501" in readme
    bibtex = re.sub(r"\s+", " ", CPPOTrainer._paper["citation"])
    assert "Rezaei, Ahmad" in bibtex and "Akbari, Mohammad" in bibtex
    for line in re.findall(r"author\s*=\s*\{(.+)\},", readme):
        assert line in bibtex
