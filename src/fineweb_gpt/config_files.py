"""Where the Hydra config lives, reading one of its option files, and what Hydra says of this job.

A checkout (and an editable install) keeps it in the repository's top-level conf/; a wheel
carries the same folder inside the package (pyproject.toml maps it there). This is the one
place that knows which.
"""

from functools import cache
from pathlib import Path

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fineweb_gpt.errors import ConfigError, UserError, one_line

PACKAGE_DIR = Path(__file__).resolve().parent


@cache
def config_dir() -> Path:
    """The folder holding train.yaml and the config groups."""
    for candidate in (PACKAGE_DIR / "conf", PACKAGE_DIR.parents[1] / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise ConfigError(f"fineweb_gpt's config folder (conf/train.yaml) is missing beside {PACKAGE_DIR}; reinstall it")


def config_groups() -> list[str]:
    """The config groups a command line chooses options of (model, data, hw, ...), Hydra's own aside."""
    return sorted(path.name for path in config_dir().iterdir() if path.is_dir() and path.name != "hydra")


def group_options(group: str) -> list[str]:
    """The options of a config group: group_options('model') -> ['124m', '40m', 'tiny']."""
    return sorted(path.stem for path in (config_dir() / group).glob("*.yaml"))


def load_option(group: str, option: str) -> dict:
    """One option's settings as a plain dict, e.g. load_option('model', '124m'), with the options
    of its own group that it extends first (optim/muon.yaml: `defaults: [adamw, _self_]`)."""
    path = config_dir() / group / f"{option}.yaml"
    if not path.is_file():
        raise ConfigError(f"{group}={option} is not a {group} option; choose one of {', '.join(group_options(group))}")
    own = OmegaConf.load(path)
    defaults = list(own.pop("defaults", None) or [])
    merged = OmegaConf.create()
    for entry in defaults if "_self_" in defaults else [*defaults, "_self_"]:  # Hydra's order: _self_ last
        merged = OmegaConf.merge(merged, own if entry == "_self_" else load_option(group, entry))
    return OmegaConf.to_container(merged)


def options_with_key(group: str, key: str) -> list[str]:
    """The options of a config group that set `key`: options_with_key('data', 'path') -> ['single_parquet']."""
    return [option for option in group_options(group) if key in load_option(group, option)]


def build(node: DictConfig, refusals: tuple = (), **kwargs):
    """hydra.utils.instantiate, letting the constructor's one-line UserError through unwrapped,
    and the target's refusal of its settings (`refusals`, e.g. Lightning's MisconfigurationException)
    as one line too."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, UserError):
            raise err.__cause__ from None
        if refusals and isinstance(err.__cause__, refusals):
            raise ConfigError(f"{node._target_} refused its settings: {one_line(err.__cause__)}") from None
        raise


def hydra_choices() -> dict:
    """Which option of each config group this run uses (model=124m -> {'model': '124m'})."""
    from hydra.core.hydra_config import HydraConfig

    return dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}


def set_on_command_line(key: str) -> bool:
    """Whether this job's command line sets `key` (data.val_tokens=..., +data.val_tokens=...)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return False
    return any(override.split("=", 1)[0].lstrip("+~") == key for override in HydraConfig.get().overrides.task)


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def sweep_names() -> tuple[str, str] | None:
    """(the sweep's folder, this point's overrides) in a multirun, for grouping loggers' runs."""
    if not in_multirun():
        return None
    from hydra.core.hydra_config import HydraConfig

    job = HydraConfig.get()
    return job.sweep.dir, job.job.override_dirname or str(job.job.num)
