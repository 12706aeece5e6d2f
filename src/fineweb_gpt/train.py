"""python -m fineweb_gpt.train (fineweb-gpt-train): compose the config, train, report.

The command line only: fineweb_gpt.training builds and trains the run. Nothing here imports
torch or Lightning, so `--help`, `--cfg job` and a command line Hydra refuses answer in about a
second instead of the several it takes to load them.
"""

from omegaconf import DictConfig

from fineweb_gpt.command_line import run_hydra_command


def main(cfg: DictConfig) -> float | None:
    """Hydra's task: one run (or one point of a sweep); returns its final validation loss."""
    from fineweb_gpt import training

    return training.main(cfg)


def train(cfg: DictConfig, folder=None, plan: dict | None = None) -> float | None:
    """One run without the command line's lifecycle (fineweb_gpt.training.train)."""
    from fineweb_gpt import training

    return training.train(cfg, folder, plan)


def cli() -> None:
    """The console script and `python -m fineweb_gpt.train`, from any folder."""
    run_hydra_command(main, "train")


if __name__ == "__main__":
    cli()
