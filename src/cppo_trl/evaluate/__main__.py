"""`python -m cppo_trl.evaluate`: the `cppo-eval` command."""

from cppo_trl.evaluate.cli import cli


cli()
