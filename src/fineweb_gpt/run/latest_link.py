"""outputs/latest: the link to the newest run in outputs/ that trained a step, for the commands
that take a run folder (python -m fineweb_gpt.doctor outputs/latest)."""

import logging
import os
from pathlib import Path

import lightning as L

from fineweb_gpt.run.ownership import AfterFirstStep
from fineweb_gpt.safe_files import replace_with_link

log = logging.getLogger("fineweb_gpt")


class LatestRun(AfterFirstStep):
    """When the run's first optimizer step ends, `link` (latest_link: outputs/latest, from the folder
    the command was started in) points at the run if the run is inside the link's folder: a run
    elsewhere (hydra.run.dir=/scratch/...) leaves it alone. A run stopped before its first step
    (nothing trained, nothing saved) is not named."""

    def __init__(self, run_dir: str, link: str | None):
        super().__init__()
        self.run_dir = Path(os.path.abspath(run_dir))
        self.link = Path(os.path.abspath(os.path.join(launch_folder(), link))) if link else None

    def first_step_done(self, trainer: L.Trainer) -> None:
        if self.link and self.run_dir.is_relative_to(self.link.parent) and trainer.is_global_zero:
            point_link(self.link, self.run_dir)


def launch_folder() -> str:
    """Where the command was started (the current folder, unless hydra.job.chdir moved it)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.cwd if HydraConfig.initialized() else os.getcwd()


def point_link(link: Path, run_dir: Path) -> None:
    """Make `link` a relative symlink to run_dir (a moved or copied outputs/ keeps it working),
    atomically: a reader always finds the old run or the new one. Anything at `link` that is not
    a link is left alone."""
    if os.path.lexists(link) and not link.is_symlink():
        log.warning("%s is not a link, so it is left as it is and does not name this run", link)
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    replace_with_link(link, os.path.relpath(run_dir, link.parent))
