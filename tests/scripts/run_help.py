"""Run `--help` of many entry points, each in its own forked process, after importing the heavy libraries once.

Why: every entry point imports torch/transformers/TRL (5-6 s of CPU each); ten fresh interpreters cost a minute on a
2-core machine. Here one interpreter imports them, then forks one child per entry point; each child runs its entry
point exactly as the user's command would (`python -m module`, the console script's `module:function`, or
`python path.py`), with `sys.argv = [name, "--help"]`, its own stdout/stderr and exit code.

Usage: python run_help.py '<json list of [kind, target, name]>'  ->  prints a json {name: [exit code, output]}.
"""

import json
import os
import runpy
import sys
import tempfile
import time
import traceback


def run_entry_point(kind: str, target: str, name: str) -> int:
    sys.argv = [name, "--help"]
    try:
        if kind == "script":
            module, function = target.split(":")
            result = getattr(__import__(module, fromlist=[function]), function)()
            return result if isinstance(result, int) else 0
        if kind == "module":
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(target, run_name="__main__")
        return 0
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:
        traceback.print_exc()
        return 1


def main() -> None:
    entries = json.loads(sys.argv[1])
    # The libraries every entry point shares, imported once before forking.
    import numpy  # noqa: F401
    import PIL.Image  # noqa: F401
    import torch  # noqa: F401
    import torchvision  # noqa: F401
    import transformers  # noqa: F401
    from trl import GRPOConfig  # noqa: F401

    import cppo_trl.data.loaders  # noqa: F401

    children = {}
    with tempfile.TemporaryDirectory() as folder:
        for kind, target, name in entries:
            log = os.path.join(folder, f"{len(children)}.log")
            pid = os.fork()
            if pid == 0:
                descriptor = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(descriptor, 1)
                os.dup2(descriptor, 2)
                sys.stdout = os.fdopen(1, "w", buffering=1)
                sys.stderr = os.fdopen(2, "w", buffering=1)
                code = run_entry_point(kind, target, name)
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
            children[pid] = (name, log)
        results, deadline = {}, time.monotonic() + 100
        while children and time.monotonic() < deadline:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                time.sleep(0.05)
                continue
            name, log = children.pop(pid)
            with open(log, encoding="utf-8", errors="replace") as handle:
                results[name] = [os.waitstatus_to_exitcode(status), handle.read()]
        for pid, (name, _) in children.items():
            os.kill(pid, 9)
            results[name] = [-9, "timed out"]
    print(json.dumps(results))


if __name__ == "__main__":
    main()
