"""What a run says of its time before it trains: how long a step, an evaluation and the whole run
should take here, a warning when that is days, and, on the CPU, a default validation set sized so
that evaluations stay about a tenth of the run. Also what every source holds out of the same file."""

import os
import re
import signal
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fineweb_gpt.config_files import build, group_options, load_option
from fineweb_gpt.data import bundled_sample_path
from fineweb_gpt.data.settings import DataSettings
from fineweb_gpt.monitor.run_summary import describe_evaluation, too_long
from fineweb_gpt.plan import plan_run
from fineweb_gpt.time_estimate import evaluation_count, interval_for_share, run_time
from helpers import SMALL, cli_env

QUICKSTART = {"model": "tiny", "data": "sample", "hw": "cpu"}


def test_on_the_cpu_the_default_validation_keeps_evaluations_near_a_tenth_of_the_run(make_config):
    plan = plan_run(make_config("hw=cpu"), QUICKSTART)  # the no-argument run: 40 steps of 4,096 tokens
    assert plan["evaluations"] == 5  # before step 1, at steps 10, 20, 30 and 40
    # An evaluation costs a third of training's FLOPs per token (the forward pass): 5 of them take
    # 10% of the run's time when 9 times as long as training's 40 x 4,096 tokens is 5 x val_tokens / 3.
    assert plan["val_tokens"] == int(40 * 4096 * 3 / 9 / 5) < plan["val_tokens_asked"] == 16384


@pytest.mark.parametrize(
    "overrides, choices, kept",
    [
        (["hw=cpu", "data.val_tokens=16384"], QUICKSTART, 16384),  # set on the command line, even to the default
        (["hw=cpu", "data.val_tokens=4096"], QUICKSTART, 4096),
        (["hw=cpu"], {"hw": "cpu"}, 16384),  # a data config of the user's own
    ],
)
def test_a_validation_size_the_user_chose_is_kept(make_config, overrides, choices, kept):
    assert plan_run(make_config(*overrides), choices)["val_tokens"] == kept


@given(st.integers(1, 5000), st.integers(2, 60))
def test_the_interval_advised_is_the_smallest_that_fits_the_evaluations_allowed(max_steps, allowed):
    interval = interval_for_share(max_steps, allowed)
    assert evaluation_count(max_steps, interval) <= allowed
    assert interval == 1 or evaluation_count(max_steps, interval - 1) > allowed


def test_a_run_of_days_on_this_machine_is_warned_about_with_what_fits_an_hour(make_config):
    plan = plan_run(make_config("model=124m", "hw=cpu"), {"model": "124m", "hw": "cpu"})
    summary = {**plan, **run_time(plan, matmul_flops=100e9, val_tokens_scored=16384)}
    step = summary["estimated_step_seconds"]  # 854.77M FLOPs x 524,288 tokens at 70 GFLOPS: 1.8 hours
    assert step == pytest.approx(plan["flops_per_token"] * plan["tokens_per_step"] / 70e9)
    assert summary["estimated_run_seconds"] > plan["max_steps"] * step > 86400
    evaluation = plan["flops_per_token"] / 3 * 16384 / 70e9  # the forward pass alone
    days = (plan["max_steps"] * step + plan["evaluations"] * evaluation) / 86400
    warning = too_long(summary)
    assert warning.startswith(f"This run would take about {days:.0f} days on this machine (1.8 h per step x 4,715")
    assert warning.endswith("use a smaller model (model=tiny), or train on a GPU")  # no step fits an hour


def test_the_summary_says_when_the_held_out_data_holds_less_than_asked():
    s = {"val_tokens_scored": 7168, "val_tokens": 1048576, "val_tokens_asked": 1048576, "evaluations": 4}
    said = describe_evaluation({**s, "block_size": 256, "val_every_steps": 10})
    assert said.startswith("7,168 validation tokens x 4 evaluations")
    assert "all there is of the held-out data: data.val_tokens=1,048,576 asks for more" in said


def test_when_evaluations_take_much_of_the_run_the_summary_names_settings_that_fit_a_tenth(make_config):
    cfg = make_config(*SMALL, "trainer.max_steps=200", "val_every_steps=2", "data.val_tokens=512")
    plan = plan_run(cfg, {"hw": "cpu"})  # 101 evaluations of 512 tokens against 200 steps of 256
    summary = {**plan, **run_time(plan, matmul_flops=1e10, val_tokens_scored=512), "val_tokens_scored": 512}
    said = describe_evaluation(summary)
    # Per token an evaluation costs a third of a step: 101 x 512 / 3 against 200 x 256.
    assert f", {101 * 512 / 3 / (101 * 512 / 3 + 200 * 256):.0%} of the run" in said.splitlines()[0]
    tokens, interval = map(int, re.search(r"data.val_tokens=([\d,]+) or val_every_steps=(\d+) keeps", said).groups())

    def share(val_tokens: int, evaluations: int) -> float:
        times = run_time({**plan, "evaluations": evaluations}, matmul_flops=1e10, val_tokens_scored=val_tokens)
        return evaluations * times["estimated_evaluation_seconds"] / times["estimated_run_seconds"]

    assert share(tokens, plan["evaluations"]) <= 0.1 < share(tokens + 2 * 32, plan["evaluations"])
    assert share(512, evaluation_count(200, interval)) <= 0.1 < share(512, evaluation_count(200, interval - 1))


def test_one_file_holds_out_the_same_documents_as_the_sample_and_as_single_parquet(make_config):
    sources = [make_config(*SMALL), make_config(*SMALL, "data=single_parquet", f"data.path={bundled_sample_path()}")]
    modules = [build(cfg.data, micro_batch_size=4, val_tokens=None) for cfg in sources]
    for module in modules:
        module.setup("fit")
    sample, single = modules
    assert sample.val_windows.tokens.tolist() == single.val_windows.tokens.tolist()
    assert sample.unique_train_tokens == single.unique_train_tokens


def test_every_source_and_the_tokenizer_hold_out_the_same_fraction():
    fractions = {option: load_option("data", option).get("val_fraction") for option in group_options("data")}
    held_out = {option: fraction for option, fraction in fractions.items() if fraction is not None}
    assert set(held_out) == {"sample", "single_parquet", "multi_shard", "hf_stream"}
    assert set(held_out.values()) == {DataSettings.val_fraction}  # fineweb-gpt-tokenize's default too (its --help)


def test_a_run_of_days_says_so_before_training_through_the_command_line(tmp_path):
    """As the trial's `model=124m` on a CPU without trainer.max_steps, at the small model's cost."""
    process = subprocess.Popen(
        [sys.executable, "-m", "fineweb_gpt.train", *SMALL, "trainer.max_steps=100000000"],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if "This run would take about" in line or "step 1/" in line:
                break
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    said = "".join(lines)
    assert "time             about " in said and " per step, " in said
    warning = lines[-1]
    assert "[WARNING] - This run would take about " in warning and " days on this machine (" in warning
    assert "x 100,000,000 steps, estimated): set trainer.max_steps=" in warning
    assert warning.rstrip().endswith("for a run of about an hour, or train on a GPU")  # tiny is the small model
