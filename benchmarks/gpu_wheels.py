"""Download every wheel cppo_trl needs, except PyTorch, into one folder for an offline GPU machine (`make gpu-wheels`).

Why this design: the GPU check (`benchmarks/gpu_check.py`) must run on a machine that has PyTorch and CUDA but no
network. PyTorch comes from that machine (its CUDA build must match its driver); everything else is pinned to the
versions installed in *this* environment, where the test suite passes, and fetched as binary wheels for the target
Python and platform (`pip download --only-binary=:all: --no-deps`), so nothing is resolved or built on the GPU machine.

On the GPU machine:  pip install --no-index --find-links <folder> -e . && make gpu-check
"""

from __future__ import annotations

import argparse
import logging
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


logger = logging.getLogger("cppo_gpu_wheels")

ROOT = Path(__file__).resolve().parents[1]

# The GPU machine's own PyTorch stack: never downloaded (its CUDA build must match the machine).
TORCH_STACK = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*|pytorch-triton.*)$")
# manylinux tags are listed one by one: pip does not widen a given tag to older glibc versions (nvidia-nccl wheels are
# tagged 2_18, llguidance's 2_31). glibc 2.17 to 2.35 covers CentOS 7 to Ubuntu 22.04.
DEFAULT_PLATFORMS = ("manylinux2014_x86_64", *(f"manylinux_2_{minor}_x86_64" for minor in range(17, 36)))


def marker_environment(python_version: str) -> dict[str, str]:
    """Marker values of a CPython `python_version` on x86-64 Linux (the target, not this machine)."""
    env = default_environment()
    env.update(
        python_version=python_version,
        python_full_version=f"{python_version}.0",
        sys_platform="linux",
        platform_system="Linux",
        platform_machine="x86_64",
        os_name="posix",
        implementation_name="cpython",
        platform_python_implementation="CPython",
    )
    return env


def _read_pyproject(pyproject: Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    return tomllib.loads(pyproject.read_text(encoding="utf-8"))


def build_requirements(pyproject: Path) -> list[str]:
    """`[build-system] requires`, unpinned: needed to install cppo_trl itself from source without an index."""
    return list(_read_pyproject(pyproject)["build-system"]["requires"])


def project_requirements(pyproject: Path, extras: tuple[str, ...] = ()) -> list[str]:
    """`[project] dependencies` of the repository's pyproject.toml plus those of `extras` (self-references expanded)."""
    project = _read_pyproject(pyproject)["project"]
    name = canonicalize_name(project["name"])
    optional = project.get("optional-dependencies", {})
    requirements, pending, done = list(project.get("dependencies", [])), list(extras), set()
    while pending:
        extra = pending.pop()
        if extra in done:
            continue
        if extra not in optional:
            raise ValueError(f"unknown extra {extra!r}; {pyproject} defines {sorted(optional)}")
        done.add(extra)
        for line in optional[extra]:
            requirement = Requirement(line)
            if canonicalize_name(requirement.name) == name:
                pending.extend(requirement.extras)
            else:
                requirements.append(line)
    return requirements


def runtime_closure(requirements: list[str], python_version: str) -> tuple[dict[str, str], list[str]]:
    """Pinned `{name: version}` of every distribution `requirements` pull in on the target, minus the PyTorch stack,
    walked through the metadata installed here; plus the requirements that are not installed here (unpinned)."""
    env = marker_environment(python_version)
    pinned: dict[str, str] = {}
    missing: list[str] = []
    queue = [(Requirement(line), ("",)) for line in requirements]
    seen: set[tuple[str, tuple[str, ...]]] = set()
    while queue:
        requirement, parent_extras = queue.pop()
        active = requirement.marker is None or any(
            requirement.marker.evaluate({**env, "extra": extra}) for extra in parent_extras
        )
        name = canonicalize_name(requirement.name)
        if not active or TORCH_STACK.match(name):
            continue
        try:
            version = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            missing.append(str(requirement).split(";")[0])
            continue
        if not requirement.specifier.contains(version, prereleases=True):
            raise RuntimeError(f"{requirement} is required but {requirement.name} {version} is installed here")
        pinned[name] = version
        key = (name, tuple(sorted(requirement.extras)))
        if key in seen:
            continue
        seen.add(key)
        extras = ("", *sorted(requirement.extras))
        queue.extend((Requirement(line), extras) for line in metadata.distribution(requirement.name).requires or [])
    return pinned, sorted(set(missing))


def download_command(requirements: list[str], out: Path, python_version: str, platforms: tuple[str, ...]) -> list[str]:
    abi = "cp" + python_version.replace(".", "")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(out)]
    command += ["--python-version", python_version, "--implementation", "cp", "--abi", abi, "--abi", "abi3"]
    command += ["--abi", "none"]
    for platform in platforms:
        command += ["--platform", platform]
    return command + requirements


def download_or_build(requirements: list[str], out: Path, python_version: str, platforms: tuple[str, ...]) -> None:
    """Binary wheels for the target; a requirement with no wheel on PyPI at all (an old pure-Python sdist such as
    docopt) is built into a wheel here, and refused unless that wheel is pure Python (`py3-none-any`)."""
    pending = list(requirements)
    while pending:
        result = subprocess.run(
            download_command(pending, out, python_version, platforms), capture_output=True, text=True
        )
        if result.returncode == 0:
            return
        missing = re.search(r"No matching distribution found for (\S+)", result.stderr)
        if missing is None:
            raise RuntimeError(f"pip download failed:\n{result.stderr[-3000:]}")
        name = missing.group(1)
        logger.warning("%s has no binary wheel: building a pure-Python wheel of it here", name)
        before = set(out.glob("*.whl"))
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(out), name], check=True)
        built = set(out.glob("*.whl")) - before
        impure = [wheel.name for wheel in built if not wheel.name.endswith("-none-any.whl")]
        if impure:
            raise RuntimeError(f"{name} builds a platform-specific wheel ({impure}): it cannot be prepared here")
        pending = [requirement for requirement in pending if requirement != name]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="wheels/gpu", help="folder the wheels are written to")
    parser.add_argument("--python-version", default="3.12", help="Python of the GPU machine (major.minor)")
    parser.add_argument("--platform", action="append", help="wheel platform tag (repeatable; default: manylinux)")
    parser.add_argument(
        "--torchvision",
        default=None,
        help="torchvision version matching the GPU machine's torch (default: the one installed here); 'none' when "
        "the GPU machine already has torchvision",
    )
    parser.add_argument("--extras", default="", help="comma list of cppo_trl extras to include as well, e.g. wandb")
    parser.add_argument("--dry-run", action="store_true", help="print the pinned list and the pip command only")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[str]:
    """Returns the requirement list it downloaded (or would download, with --dry-run)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    extras = tuple(extra for extra in args.extras.split(",") if extra)
    pinned, missing = runtime_closure(project_requirements(ROOT / "pyproject.toml", extras), args.python_version)
    torchvision = args.torchvision or pinned.get("torchvision")
    pinned.pop("torchvision", None)
    requirements = [f"{name}=={version}" for name, version in sorted(pinned.items())] + missing
    if torchvision and torchvision != "none":
        requirements.append(f"torchvision=={torchvision}")
    requirements += build_requirements(ROOT / "pyproject.toml")  # `pip install -e .` builds cppo_trl with these
    if missing:
        logger.warning("not installed here, downloaded unpinned: %s", ", ".join(missing))
    out = Path(args.out)
    logger.info(
        "%d wheels for CPython %s (torch excluded): %s", len(requirements), args.python_version, " ".join(requirements)
    )
    if args.dry_run:
        print(
            " ".join(
                download_command(requirements, out, args.python_version, tuple(args.platform or DEFAULT_PLATFORMS))
            )
        )
        return requirements
    out.mkdir(parents=True, exist_ok=True)
    download_or_build(requirements, out, args.python_version, tuple(args.platform or DEFAULT_PLATFORMS))
    logger.info("on the GPU machine: pip install --no-index --find-links %s -e . && make gpu-check", out)
    return requirements


if __name__ == "__main__":
    main(sys.argv[1:])
