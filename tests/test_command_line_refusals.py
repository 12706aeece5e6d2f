"""A command line Hydra refuses (an unknown key, a missing +, an option a group lacks), and a data key
the chosen source does not read: one line ending on the nearest valid name, exit 2, for every Hydra
command, run as installed from a folder of the user's own."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException, OverrideParseException
from hypothesis import given, settings
from hypothesis import strategies as st

from fineweb_gpt.command_line import refusal
from fineweb_gpt.config_files import load_option
from fineweb_gpt.errors import ConfigError
from fineweb_gpt.plan import plan_run
from helpers import CONF_DIR, SMALL, cli_env


def run(script: str, *args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    path = Path(sys.executable).parent / script
    if not path.is_file():
        pytest.fail(f"{script} is not installed beside {sys.executable}; run pip install -e . again")
    return subprocess.run([path, *args], cwd=cwd, env=cli_env(env), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "script, args, line",
    [
        (
            "fineweb-gpt-train",
            ["trainer.max_step=5"],
            "trainer.max_step=5: there is no key trainer.max_step; did you mean trainer.max_steps=5?",
        ),
        (
            "fineweb-gpt-train",
            ["model=124M"],
            "model=124M: model has no option 124M (it has 124m, 40m, tiny); did you mean model=124m?",
        ),
        (
            "fineweb-gpt-train",
            ["data.path=/nope.parquet"],
            "data.path=/nope.parquet: data=sample has no key path; data=single_parquet reads data.path: "
            "add data=single_parquet",
        ),
        ("fineweb-gpt-eval", ["ckpx=last.ckpt"], "ckpx=last.ckpt: there is no key ckpx; did you mean ckpt=last.ckpt?"),
        ("fineweb-gpt-eval", ["data=sampel"], "data=sampel: data has no option sampel (it has "),
    ],
    ids=["unknown key", "unknown option", "key of another source", "eval key", "eval option"],
)
def test_a_refused_command_line_is_one_line_ending_on_the_nearest_name(script, args, line, tmp_path):
    done = run(script, *args, cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"error: {line}"), done.stderr
    assert "HYDRA_FULL_ERROR" not in done.stderr
    assert not any(tmp_path.iterdir())  # nothing written


def test_hydra_full_error_still_gives_the_whole_trace(tmp_path):
    done = run("fineweb-gpt-train", "trainer.max_step=5", cwd=tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert done.returncode == 1
    assert "Traceback" in done.stderr
    assert "ConfigCompositionException: Could not override 'trainer.max_step'" in done.stderr


def test_a_key_added_with_plus_that_the_source_does_not_read_is_refused_naming_the_source(tmp_path):
    # data=sample trains on the bundled file whatever data.path says: the run would be silently wrong.
    done = run("fineweb-gpt-train", "+data.path=/nope.parquet", cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    says = "data.path is not a setting of data=sample; data=single_parquet reads it: use data=single_parquet"
    assert last == f"error: {says}"
    assert not (tmp_path / "outputs").exists()


def refused(*overrides: str) -> Exception | None:
    """Hydra's own exception for a command line, as the command gets it; None if it composes."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            compose("train", overrides=list(overrides))
    except (ConfigCompositionException, OverrideParseException) as err:
        return err
    finally:
        GlobalHydra.instance().clear()
    return None


@pytest.mark.parametrize(
    "override, ending",
    [
        ("max_steps=5", "did you mean trainer.max_steps=5?"),  # a name that lives one level down
        ("hw.peak=1", "did you mean hw.peak_flops=1?"),  # the only key that begins with it
        ("modle=tiny", "did you mean model=tiny?"),  # a group's name
        ("seed2=3", "did you mean seed=3?"),
        ("optim=adam", "did you mean optim=adamw?"),
        ("data=single_parquet data.paths=/x", "token_shards reads data.paths: add data=multi_shard"),
        ("+trainer.max_steps=3", "is already in the config; set it without the +: trainer.max_steps=3"),
        ("model.n_embd=1,2", "model.n_embd=[1,2]; a sweep over the values needs -m (--multirun)"),
        ("model.n_embd=[1,2", "(see Hydra's override grammar)"),
        ("callbacks.mine._target_=x", "(a new entry: +callbacks.mine._target_=x)"),
    ],
)
def test_each_kind_of_refusal_names_the_fix(override, ending):
    message = refusal(refused(*override.split()))
    assert "\n" not in message and message.endswith(ending), message


def test_a_key_nothing_is_close_to_lists_the_keys_there_without_advising_a_plus():
    message = refusal(refused("model.colour=red"))
    assert message.startswith("model.colour=red: there is no key model.colour; model has "), message
    assert all(key in message for key in load_option("model", "tiny")) and "+" not in message


@settings(max_examples=30, deadline=None)
@given(st.lists(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12), min_size=1, max_size=3))
def test_any_unknown_key_is_one_line_naming_it(parts):
    key = ".".join(parts)
    err = refused(f"{key}=1")
    if err is not None:  # a key that exists composes
        message = refusal(err)
        assert "\n" not in message and message.startswith(f"{key}=1: "), message


def test_plus_data_path_under_the_sample_is_refused_before_anything_is_read(make_config):
    cfg = make_config(*SMALL, "+data.path=/nope.parquet")
    with pytest.raises(ConfigError, match="data.path is not a setting of data=sample; data=single_parquet reads it"):
        plan_run(cfg, {"data": "sample", "hw": "cpu"})
