"""The Hydra command lines (fineweb-gpt-train, fineweb-gpt-eval): hydra.main, with a command line
Hydra refuses said in one line.

Hydra prints its refusals of a command line (an unknown key, an option a config group lacks, an
override it cannot parse) over several lines, ending on "Set the environment variable
HYDRA_FULL_ERROR=1 for a complete stack trace.", and exits 1; `trainer.max_step=5` is told to add
a `+`, which then fails in the Trainer. Here they end as the project's other errors do:
`error: <one line>`, naming the override and the nearest valid key or option, and exit 2.
HYDRA_FULL_ERROR=1 still gives Hydra's full trace.

Nothing here imports torch or Lightning: `--help`, `--cfg` and a refused command line answer
without them.
"""

import difflib
import os
import re
from collections.abc import Callable
from contextlib import contextmanager

from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf

from fineweb_gpt.config_files import config_dir, config_groups, group_options, load_option, options_with_key
from fineweb_gpt.errors import ConfigError, exit_with


def run_hydra_command(task: Callable, config_name: str) -> None:
    """hydra.main for `task` on conf/<config_name>.yaml, from any folder."""
    import hydra

    with refusals_in_one_line():
        hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=config_name)(task)()


@contextmanager
def refusals_in_one_line():
    """Hydra catches every error of composing and running in hydra._internal.utils.run_and_report
    (its only reporting hook, and private: tests/test_command_line_refusals.py pins it); each call
    goes through it here, and a refused command line leaves as `error: ...`, exit 2."""
    from hydra._internal import utils

    hydra_report = utils.run_and_report

    def run_and_report(func: Callable):
        return hydra_report(lambda: refused_in_one_line(func))

    utils.run_and_report = run_and_report
    try:
        yield
    finally:
        utils.run_and_report = hydra_report


def refused_in_one_line(func: Callable):
    try:
        return func()
    except (OverrideParseException, ConfigCompositionException) as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        exit_with(ConfigError(refusal(err)))


# --- the one line ----------------------------------------------------------------------------


def refusal(err: Exception) -> str:
    """What Hydra refused, in one line ending on the nearest valid key or option."""
    if isinstance(err, OverrideParseException):
        return f"{err.override}: {first_line(err.message)} (see Hydra's override grammar)"
    if isinstance(err, MissingConfigException) and err.options is not None and err.missing_cfg_file:
        group, _, option = err.missing_cfg_file.rpartition("/")
        return unknown_option(group, option, list(err.options))
    parent = getattr(err.__cause__, "parent_node", None)
    full_key = getattr(err.__cause__, "full_key", None)
    if isinstance(parent, DictConfig) and full_key:
        given = re.search(r"use \+(.*)$", str(err), re.S)  # Hydra quotes the override
        return unknown_key(full_key, given.group(1).strip() if given else full_key, parent)
    text = str(err)
    present = re.search(r"An item is already at '(.+?)'.*?Either remove \+ prefix: '(.+?)'", text, re.S)
    if present:
        key, override = present.groups()
        return f"+{override}: {key} is already in the config; set it without the +: {override}"
    ambiguous = re.match(r"Ambiguous value for argument '(.+?)=(.*)'", text)
    if ambiguous:
        key, value = ambiguous.groups()
        return f"{key}={value}: a list needs brackets, {key}=[{value}]; a sweep over the values needs -m (--multirun)"
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(err).__name__


def first_line(text: str) -> str:
    return next((line.strip() for line in str(text).splitlines() if line.strip()), "")


def unknown_option(group: str, option: str, options: list[str]) -> str:
    said = f"{group}={option}: {group} has no option {option} (it has {', '.join(options)})"
    nearest = closest(option, options)
    return f"{said}; did you mean {group}={nearest}?" if nearest else f"{said}; choose one of them"


def unknown_key(full_key: str, override: str, parent: DictConfig) -> str:
    """`trainer.max_step=5`, `max_steps=5`, `data.path=...` under data=sample, `model.doc_mask=true`."""
    node, _, key = full_key.rpartition(".")
    holders = other_options_reading(node, key, parent)
    if holders is not None:
        current, others = holders
        names = " or ".join(f"{node}={option}" for option in others)
        return f"{override}: {node}={current} has no key {key}; {names} reads {full_key}: add {node}={others[0]}"
    nearest = nearest_key(full_key, parent)
    if nearest:
        return f"{override}: there is no key {full_key}; did you mean {override.replace(full_key, nearest, 1)}?"
    keys = [str(k) for k in parent.keys() if not str(k).startswith("_")]
    where = f"{node} has" if node else "the config's top level has"
    said = f"{override}: there is no key {full_key}; {where} {', '.join(keys)}"
    # A collection of named entries (callbacks) takes new ones with +; the model, the Trainer and
    # the other groups read only their own keys, and refuse an added one later.
    if keys and all(isinstance(parent._get_node(k), DictConfig) for k in keys):
        return f"{said} (a new entry: +{override})"
    return said


def other_options_reading(group: str, key: str, parent: DictConfig) -> tuple[str, list[str]] | None:
    """(the group's option in use, its other options that have `key`) when another option of a
    config group reads the key this one lacks (data.path under data=sample), else None."""
    if group not in config_groups():
        return None
    in_use = [option for option in group_options(group) if set(load_option(group, option)) == set(parent.keys())]
    others = [option for option in options_with_key(group, key) if option not in in_use]
    if not others:
        return None
    return (in_use[0] if len(in_use) == 1 else "(this option)"), others


def nearest_key(full_key: str, parent: DictConfig) -> str | None:
    """The key the unknown one most likely means: one of the same name elsewhere (max_steps ->
    trainer.max_steps), else the closest beside it (trainer.max_step -> trainer.max_steps), else,
    for a key at the top, the closest anywhere by the last part of its name. Hydra's own keys
    only for a hydra.* key."""
    node, _, key = full_key.rpartition(".")
    root = parent._get_root()
    keys = [k for k in flat_keys(root) if full_key.startswith("hydra.") == k.startswith("hydra.")]
    by_name = {}
    for candidate in sorted(keys, key=len):  # the shortest key of a name stands for it (seed, not data.seed)
        by_name.setdefault(candidate.rpartition(".")[2], candidate)
    if key in by_name:
        return by_name[key]
    beside = closest(key, [str(k) for k in parent.keys()])
    if beside:
        return f"{node}.{beside}" if node else beside
    name = closest(key, list(by_name)) if not node else None
    return by_name[name] if name else None


def flat_keys(node: DictConfig, prefix: str = "") -> list[str]:
    """Every key of a config, dotted, nodes included, without resolving any value."""
    keys = []
    for key in node.keys():
        dotted = f"{prefix}{key}"
        keys.append(dotted)
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not OmegaConf.is_missing(node, key) and not child._is_none():
            keys += flat_keys(child, f"{dotted}.")
    return keys


def closest(word: str, choices: list[str]) -> str | None:
    """The choice closest to `word`: the same but for case, else the closest by difflib, else the
    only one that begins with it (hw.peak -> peak_flops); None when none is close."""
    choices = [choice for choice in choices if not choice.startswith("_")]
    same = [choice for choice in choices if choice.lower() == word.lower()]
    if same:
        return same[0]
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if close:
        return close[0]
    longer = [choice for choice in choices if choice.lower().startswith(word.lower())]
    return longer[0] if len(longer) == 1 else None
