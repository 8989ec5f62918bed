"""`python -m cppo_trl.cppo`: the launch name every recipe's header uses for the training script
(`cppo_trl.scripts.train`, also the `cppo-train` console script)."""

from cppo_trl.scripts.train import cli


if __name__ == "__main__":
    cli()
