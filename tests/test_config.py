"""The config as users give it: every value either plans a run or is refused in one line naming
its key; what fineweb_gpt works out itself is refused when set by hand, everything else honoured."""

import copy
import logging
import os
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import get_args

import pytest
from hydra.errors import ConfigCompositionException
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar

from fineweb_gpt.config_schema import ALLOWED, PRECISIONS
from fineweb_gpt.console import StepProgressBar
from fineweb_gpt.errors import ConfigError
from fineweb_gpt.plan import plan_run, trainer_arguments
from fineweb_gpt.run.latest_link import LatestRun, point_link
from fineweb_gpt.run.ownership import NoteNewRunFolder, discard_untrained_run
from helpers import CONF_DIR, SMALL

BASE = [*SMALL, "trainer.max_steps=8"]
BASES = {}


def plan_or_error(make_config, *overrides: str) -> dict | ConfigError:
    try:
        return plan_run(make_config(*BASE, *overrides), {"hw": "cpu"})
    except ConfigError as err:
        return err


@pytest.mark.parametrize(
    "override",
    [
        "hw.micro_batch_size=0",
        "data.block_size=0",
        "trainer.devices=0",
        "optim.lr=0",
        "optim.lr=-0.001",
        "optim.warmup_steps=-1",
        "total_batch_tokens=abc",
        "trainer.max_steps=abc",
        "val_every_steps=abc",
        "model.dropout=abc",
        "seed=abc",
        "trainer.max_steps=1e5",
        "optim.lr=nan",
        "trainer.precision=fp8",
        "optim.betas=[0.9]",
    ],
)
def test_a_value_of_the_wrong_type_or_range_is_one_line_naming_it(make_config, override):
    error = plan_or_error(make_config, override)
    assert isinstance(error, ConfigError)
    key = override.partition("=")[0]
    assert str(error).startswith(f"{key}=") and " must be " in str(error) and "\n" not in str(error)


def test_the_error_says_what_the_key_must_be(make_config):
    assert str(plan_or_error(make_config, "optim.lr=0")) == "optim.lr=0 must be a number above 0"
    assert str(plan_or_error(make_config, "seed='12'")) == "seed='12' must be a whole number from 0 to 4294967295"
    assert str(plan_or_error(make_config, "trainer.max_steps=0")) == (
        "trainer.max_steps=0 must be a whole number at least 1, or -1"
    )


# What a user may type after key=: numbers of any size and sign, floats with nan and inf, words,
# quoted numbers, null, booleans, lists and dicts; Hydra's own parser turns each into a value.
VALUES = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.integers(-3, 600).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,8}", fullmatch=True),
    st.integers(-5, 99).map(lambda n: f"'{n}'"),
    st.sampled_from(["null", "true", "false", "[]", "[0,1]", "[0.9,0.95]", "[1,x]", "{a:1}", "'0,1'", "auto", "''"]),
)


# The keys of the table, the ones users were shown tracebacks for, and the model's shape.
SHOWN_TRACEBACKS = ["hw.micro_batch_size", "data.block_size", "trainer.devices", "optim.lr", "optim.warmup_steps"]
SHOWN_TRACEBACKS += ["total_batch_tokens", "trainer.max_steps", "val_every_steps", "model.dropout", "seed"]
MODEL_SHAPE = ["model.n_layer", "model.n_head", "model.n_embd", "model.block_size", "model.vocab_size", "model.arch"]
SWITCHES = ("norm", "mlp", "positions", "qk_norm", "tied_head", "zero_init_proj", "logit_softcap", "doc_mask")
MODEL_SHAPE += [f"model.{key}" for key in SWITCHES]
KEYS = sorted({*ALLOWED, *SHOWN_TRACEBACKS, *MODEL_SHAPE})
FOLLOWS = {"model.block_size": "data.block_size"}  # data.block_size: ${model.block_size}, the batch's block


def with_override(base, override: str):
    """base with one command-line override applied by Hydra's own parser and code, as compose does."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = copy.deepcopy(base)
    ConfigLoaderImpl._apply_overrides_to_config(OverridesParser.create().parse_overrides([override]), cfg)
    return cfg


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(KEYS), value=VALUES)
def test_any_value_of_any_key_plans_or_is_refused_in_one_line_naming_the_key(make_config, key, value):
    optim = "muon" if "muon" in key else "adamw"
    if optim not in BASES:  # composed once: the override is applied below, as compose applies it
        BASES[optim] = make_config(*BASE, f"optim={optim}")
    try:
        cfg = with_override(BASES[optim], f"{key}={value}")
    except ConfigCompositionException:  # Hydra's own one-line refusal ({a:1} for a list)
        return
    try:
        plan = plan_run(cfg, {"hw": "cpu"})
    except ConfigError as err:
        assert "\n" not in str(err) and (key in str(err) or FOLLOWS.get(key, key) in str(err)), str(err)
    else:  # a plan that holds together: whole steps of exactly total_batch_tokens
        assert plan["tokens_per_step"] == cfg.total_batch_tokens
        batch = plan["micro_batch_size"] * cfg.data.block_size * plan["grad_accum"] * plan["world_size"]
        assert plan["tokens_per_step"] == batch
        assert plan["grad_accum"] * plan["world_size"] >= 1 and 0 <= plan["warmup_steps"] < plan["max_steps"]


@pytest.mark.parametrize("arch, bias", [("gpt2", False), ("gpt2", True), ("modern", False)])
def test_the_planned_parameter_count_is_the_built_models(arch, bias):
    from fineweb_gpt.flops import parameter_count
    from fineweb_gpt.model import GPT, GPTConfig

    config = GPTConfig(n_layer=3, n_head=2, n_embd=32, block_size=32, arch=arch, bias=bias)
    assert parameter_count(config) == GPT(config).num_params()
    assert parameter_count(GPTConfig(n_layer=12, n_head=12, n_embd=768)) == 123_587_328  # GPT-2 small, nanoGPT's count


def test_precisions_are_lightnings_own():
    from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT

    def flat(kind):
        return [v for part in get_args(kind) for v in (flat(part) if get_args(part) else [part])]

    assert set(PRECISIONS) == {"auto", *flat(_PRECISION_INPUT)}


@pytest.mark.parametrize(
    "override, says",
    [
        ("trainer.accumulate_grad_batches=4", "set total_batch_tokens"),
        ("trainer.val_check_interval=10", "set val_every_steps"),
        ("+trainer.logger=false", "set the logger group"),
        ("+trainer.callbacks=[]", "set the callbacks group"),
        ("trainer.num_sanity_val_steps=2", "must be one of null, 0, -1 (null: the whole validation set before"),
        ("trainer.barebones=true", "benchmarks/train_throughput.py"),
        ("trainer.precision=16-mixed", "needs a CUDA GPU; on the CPU use trainer.precision=bf16-mixed"),
        ("trainer.accelerator=mps", "trainer.accelerator=mps is not available on this machine"),
        (
            "trainer.devices=[0,1]",
            "trainer.devices=[0,1] is for GPUs (their ids, or -1: all of them); on the CPU give a",
        ),
        ("trainer.devices=-1", "trainer.devices=-1 is for GPUs"),
        ("optim.min_lr=0.01", "optim.min_lr=0.01 is above optim.lr"),
        ("+model.n_embed=64", "model.n_embed is not a model setting"),
    ],
)
def test_what_fineweb_gpt_would_otherwise_replace_or_cannot_honour_is_refused(make_config, override, says):
    error = plan_or_error(make_config, override)
    assert isinstance(error, ConfigError) and says in str(error) and "\n" not in str(error)


def test_a_warmup_longer_than_the_run_is_shortened_with_one_warning(make_config, caplog):
    with caplog.at_level(logging.WARNING, logger="fineweb_gpt"):
        plan = plan_or_error(make_config, "trainer.max_steps=1", "optim.warmup_steps=200")
    assert plan["warmup_steps"] == 0 and plan["max_steps"] == 1
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith("optim.warmup_steps=200 does not fit in the run's 1 step(s): warming up over 0")
    assert plan_or_error(make_config, "trainer.max_steps=50", "optim.warmup_steps=200")["warmup_steps"] == 5
    assert plan_or_error(make_config, "trainer.max_steps=50", "optim.warmup_steps=49")["warmup_steps"] == 49


def arguments(make_config, *overrides, resuming=False, extra=()):
    cfg = make_config(*BASE, *overrides)
    plan = plan_run(cfg, {"hw": "cpu"})
    ours = [StepProgressBar(), ModelCheckpoint(dirpath=cfg.run_dir)]
    return trainer_arguments(cfg, plan, resuming, [*ours, *extra])


def test_trainer_values_set_by_hand_are_honoured(make_config):
    default = arguments(make_config)
    assert default["num_sanity_val_steps"] == -1 and arguments(make_config, resuming=True)["num_sanity_val_steps"] == 0
    assert arguments(make_config, "trainer.num_sanity_val_steps=0")["num_sanity_val_steps"] == 0
    assert arguments(make_config, "trainer.num_sanity_val_steps=-1", resuming=True)["num_sanity_val_steps"] == -1
    assert arguments(make_config, "trainer.precision=bf16-mixed")["precision"] == "bf16-mixed"
    assert arguments(make_config, "hw.precision=64-true")["precision"] == "64-true"
    assert arguments(make_config, "trainer.max_steps=5")["max_steps"] == 5

    kinds = [type(c) for c in default["callbacks"]]
    assert kinds == [StepProgressBar, ModelCheckpoint] and default["enable_checkpointing"] is True
    quiet = arguments(make_config, "trainer.enable_progress_bar=false", "trainer.enable_checkpointing=false")
    assert quiet["callbacks"] == [] and quiet["enable_checkpointing"] is False
    rich = arguments(make_config, extra=[RichProgressBar()])
    assert [type(c) for c in rich["callbacks"] if isinstance(c, ProgressBar)] == [RichProgressBar]


def test_no_checkpoint_callback_means_no_checkpoints_unless_asked(make_config):
    cfg = make_config(*BASE)
    plan = plan_run(cfg, {"hw": "cpu"})
    assert trainer_arguments(cfg, plan, False, [StepProgressBar()])["enable_checkpointing"] is False
    cfg.trainer.enable_checkpointing = True  # Lightning's own default checkpoint, as asked
    assert trainer_arguments(cfg, plan, False, [StepProgressBar()])["enable_checkpointing"] is True


# --- run folders ------------------------------------------------------------------------------


def test_latest_link_is_replaced_atomically(tmp_path):
    runs = [tmp_path / "outputs" / "2026-01-01" / name for name in ("10-00-00", "11-00-00")]
    for run in runs:
        run.mkdir(parents=True)
    link = tmp_path / "outputs" / "latest"
    point_link(link, runs[0])
    assert os.readlink(link) == "2026-01-01/10-00-00"  # relative: a moved outputs/ keeps it working
    seen, done = set(), threading.Event()

    def watch():
        while not done.is_set():
            try:
                seen.add(os.readlink(link))
            except FileNotFoundError:
                seen.add("missing")

    watcher = threading.Thread(target=watch)
    watcher.start()
    for i in range(3000):
        point_link(link, runs[i % 2])
    done.set()
    watcher.join()
    assert seen == {"2026-01-01/10-00-00", "2026-01-01/11-00-00"}  # never missing, never half made
    assert link.resolve() == runs[1] and sorted(p.name for p in link.parent.iterdir()) == ["2026-01-01", "latest"]


def test_latest_names_runs_inside_its_folder_only_and_leaves_a_real_folder_alone(tmp_path):
    rank_zero = SimpleNamespace(is_global_zero=True)
    inside, elsewhere = tmp_path / "outputs" / "slurm-123", tmp_path / "scratch" / "run"
    LatestRun(str(inside), str(tmp_path / "outputs" / "latest")).first_step_done(rank_zero)
    assert os.readlink(tmp_path / "outputs" / "latest") == "slurm-123"
    LatestRun(str(elsewhere), str(tmp_path / "outputs" / "latest")).first_step_done(rank_zero)
    assert os.readlink(tmp_path / "outputs" / "latest") == "slurm-123"  # hydra.run.dir elsewhere: left alone
    (tmp_path / "mine" / "latest").mkdir(parents=True)
    LatestRun(str(tmp_path / "mine" / "run"), str(tmp_path / "mine" / "latest")).first_step_done(rank_zero)
    assert (tmp_path / "mine" / "latest").is_dir() and not (tmp_path / "mine" / "latest").is_symlink()


def hydra_run_start(run_dir: Path) -> None:
    """What Hydra does for a single run: the callback first, then the run folder is made."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        config = compose("train", overrides=[f"hydra.run.dir={run_dir}"], return_hydra_config=True)
    NoteNewRunFolder().on_run_start(config=config)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ".hydra").mkdir(exist_ok=True)


def test_a_refused_run_removes_only_the_folders_made_for_it(tmp_path):
    fresh = tmp_path / "outputs" / "2026-01-01" / "10-00-00"
    hydra_run_start(fresh)
    (tmp_path / "outputs" / "2026-01-01" / "10-00-01").mkdir()  # another run started beside it meanwhile
    assert discard_untrained_run(str(fresh))
    assert not fresh.exists() and sorted(p.name for p in (tmp_path / "outputs" / "2026-01-01").iterdir()) == [
        "10-00-01"
    ]

    earlier = tmp_path / "outputs" / "2026-01-01" / "10-00-01"
    (earlier / "result.json").write_text("{}")
    hydra_run_start(earlier)  # resume=auto hydra.run.dir=<earlier run>
    assert not discard_untrained_run(str(earlier)) and (earlier / "result.json").read_text() == "{}"
