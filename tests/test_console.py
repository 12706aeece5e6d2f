"""What a person sees: the run in a terminal (a pseudo-terminal, its screen rebuilt as a
terminal draws it), the run's output in a file or pipe, --help and shell completion."""

import itertools
import logging
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from fineweb_gpt import console
from fineweb_gpt.config_files import group_options
from fineweb_gpt.errors import ConfigError
from fineweb_gpt.run.names import METRICS_FILE
from fineweb_gpt.run.run_files import read_metrics
from fineweb_gpt.run.stop_signals import RunStopped
from fineweb_gpt.training import train
from helpers import SMALL, TERMINAL_COLUMNS, TESTS_DIR, cli_env, run_cli, run_in_terminal

# Lines a run must not print: Lightning's own bars, notices and advertisement, a library's
# deprecation warning, W&B's warnings about the arguments Lightning passes it.
NOISE = [
    "Sanity Checking",
    "Validation DataLoader",
    "Epoch 0",
    "Training steps",
    "Tip:",
    "litlogger",
    "GPU available",
    "TPU available",
    "`Trainer.fit` stopped",
    "LeafSpec",
    "anonymous setting",
    "environment variables will be ignored",
]
LOG_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+\]\[[\w.]+\]\[[A-Z]+\] - ")


def screen(output: str, width: int = TERMINAL_COLUMNS) -> list[str]:
    """The lines a terminal shows after drawing `output`: carriage returns go back to the start
    of the line, ESC[A up one line, text overwrites what is there, long lines wrap."""
    lines: list[list[str]] = [[]]
    row = column = 0
    position = 0
    while position < len(output):
        escape = re.compile(r"\x1b\[[0-9;?]*([A-Za-z])").match(output, position)
        if escape:
            row -= escape.group(1) == "A" and row > 0
            position = escape.end()
            continue
        char = output[position]
        position += 1
        if char == "\r":
            column = 0
        elif char == "\n":
            row += 1
        else:
            if column == width:
                row, column = row + 1, 0
            while len(lines) <= row:
                lines.append([])
            line = lines[row]
            line.extend(" " * (column + 1 - len(line)))
            line[column] = char
            column += 1
        while len(lines) <= row:
            lines.append([])
    return ["".join(line).rstrip() for line in lines]


def bar_states(output: str, description: str) -> list[str]:
    """Every state of a progress bar, as it was drawn."""
    return [part for part in re.split(r"[\r\n]", output) if part.startswith(description)]


def seconds(clock: str) -> int:
    minutes, secs = clock.split(":")[-2:]
    return int(minutes) * 60 + int(secs)


def test_in_a_terminal_log_lines_go_above_one_clean_bar(tmp_path):
    # Step 4 is slow (2.5 s before its first micro-batch): inside it, the bar shows the micro-batches.
    slow = ["+callbacks.slow._target_=helpers.PauseMidStep", "+callbacks.slow.step=3", "+callbacks.slow.seconds=2.5"]
    code, output = run_in_terminal(
        *SMALL, "trainer.max_steps=6", "val_every_steps=3", *slow, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path
    )
    assert code == 0, output[-3000:]
    inside = [state for state in bar_states(output, "Training:") if "micro-batch" in state]
    assert inside and all(re.search(r"\| 3/6 \[.*, micro-batch 1/2\]$", state) for state in inside), inside
    shown = screen(output)
    # Each log line starts a line of its own, whole; the bar is never cut by one.
    logged = [line for line in shown if "][fineweb_gpt][" in line]
    assert len(logged) >= 6 and all(LOG_LINE.match(line) for line in logged), logged
    assert any(re.search(r"- step 3/6: val loss \d+\.\d{4} \(ppl", line) for line in logged)
    bars = [line for line in shown if line.startswith("Training")]
    assert len(bars) == 1, shown  # one bar, left at its end state, below the log lines before it
    assert re.fullmatch(
        r"Training: 100%\|█+\| 6/6 \[\d\d:\d\d<00:00, +[\d.]+(s/step|step/s), "
        r"loss=\d+\.\d{4}, val=\d+\.\d{4}, tok/s=\d{1,3}(,\d{3})*\]",
        bars[0],
    ), bars[0]
    assert shown.index(bars[0]) < shown.index(next(line for line in logged if "Finished 6 steps" in line))
    # The step-0 evaluation says what it is; every evaluation bar is cleared when it ends.
    assert bar_states(output, "Evaluating at step 0 (before training):")
    assert bar_states(output, "Evaluating at step 3:") and not any(line.startswith("Evaluating") for line in shown)
    for noise in NOISE:
        assert noise not in output, noise


def test_a_resumed_runs_bar_counts_and_times_from_the_resumed_step(make_config, tmp_path):
    run = [*SMALL, "trainer.max_steps=8", "val_every_steps=2"]
    stop = [
        "+callbacks.stop._target_=helpers.SignalAtStep",
        "+callbacks.stop.step=4",
        "+callbacks.stop.signal_name=SIGTERM",
    ]
    cfg = make_config(*run, *stop)
    with pytest.raises(RunStopped):
        train(cfg)  # stopped and saved at step 4 of 8
    # The first step after the resume takes 2 seconds longer: at that pace, 3 steps are left.
    slow = ["+callbacks.slow._target_=helpers.PauseMidStep", "+callbacks.slow.step=4", "+callbacks.slow.seconds=2"]
    code, output = run_in_terminal(*run, *slow, "resume=auto", f"hydra.run.dir={cfg.run_dir}", cwd=tmp_path)
    assert code == 0, output[-3000:]
    states = bar_states(output, "Training:")
    assert re.search(r"\| 4/8 \[00:00<\?", states[0]), states[0]  # the count starts at the resumed step
    assert all("/8 [" in state for state in states)  # the total is kept
    elapsed, left = re.search(r"\| 5/8 \[([\d:]+)<([\d:]+)", next(s for s in states if "| 5/8 [" in s)).groups()
    # Rate and time left count the steps this process trained: not 5 steps in 2 seconds.
    assert seconds(elapsed) >= 2 and seconds(left) >= 2 * seconds(elapsed), (elapsed, left)
    assert any(LOG_LINE.match(line) and "Resumed at step 4 of 8" in line for line in screen(output))


def test_outside_a_terminal_each_logged_step_is_one_line(tmp_path):
    # A user's first W&B run: no login on the machine, so it logs offline, and the CSV besides.
    home = tmp_path / "home"
    home.mkdir()
    no_login = {"WANDB_MODE": None, "WANDB_API_KEY": None, "HOME": str(home), "WANDB_CONFIG_DIR": str(home)}
    result = run_cli(
        *SMALL,
        "trainer.max_steps=6",
        "val_every_steps=3",
        "trainer.log_every_n_steps=2",
        "logger=wandb",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        env=no_login,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "\r" not in output and "\x1b[" not in output  # no bar drawing in a log file
    line = r"^\[.*\]\[fineweb_gpt\]\[INFO\] - step (\d)/6 \(\d+%\): loss \d+\.\d{4}, tok/s [\d,]+, .* elapsed"
    progress = re.findall(line, output, re.M)
    assert progress == ["2", "4", "6"]
    assert "No W&B login found: logging offline" in output
    for noise in NOISE:
        assert noise not in output, noise
    # The run's own record is there for the doctor and the sweep table, whatever the logger.
    rows = read_metrics(tmp_path / "run" / METRICS_FILE)
    assert [int(row["step"]) for row in rows if "train/loss" in row] == [2, 4, 6]


def sweep_points(overrides: list[str]) -> list[list[str]]:
    """Each run of a multirun's overrides (model.n_embd=256,384: two), read by Hydra's own parser."""
    values = [
        [f"{o.get_key_element()}={value}" for value in o.sweep_string_iterator()]
        if o.is_sweep_override()
        else [o.input_line]
        for o in OverridesParser.create().parse_overrides(overrides)
    ]
    return [list(point) for point in itertools.product(*values)]


def test_help_describes_this_program_and_its_examples_work(tmp_path, make_config):
    command = [sys.executable, "-m", "fineweb_gpt.train", "--help"]
    result = subprocess.run(command, cwd=tmp_path, env=cli_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "train a GPT-2-style language model" in text and "Powered by Hydra" not in text
    for group in ("model", "data", "hw", "optim", "trainer", "logger"):
        assert f"\n{group}: {', '.join(group_options(group))}\n" in text, group
    examples = [line.split(maxsplit=1)[1] for line in text.splitlines() if line.startswith("  fineweb-gpt-train ")]
    assert len(examples) == 3
    for example in examples:
        for point in sweep_points([arg for arg in shlex.split(example) if arg != "-m"]):
            try:
                make_config(*point)  # composes as written
            except ConfigError as err:
                pytest.fail(f"{example}: {err}")
    assert 'eval "$(fineweb-gpt-train -sc install=bash)"' in text
    for page in re.findall(r"docs/[\w-]+\.md", text) + ["README.md"]:
        assert (TESTS_DIR.parent / page).is_file(), page


@pytest.mark.slow
def test_the_documented_shell_completion_completes_groups_and_options(tmp_path):
    script = Path(sys.executable).parent / "fineweb-gpt-train"
    if not script.is_file():
        pytest.fail(f"fineweb-gpt-train is not installed beside {sys.executable}; run pip install -e . again")
    env = cli_env({"PATH": f"{script.parent}{os.pathsep}{os.environ['PATH']}"})
    line = "fineweb-gpt-train logger="
    completion = subprocess.run(
        [
            "bash",
            "-c",
            'eval "$(fineweb-gpt-train -sc install=bash)"; '
            f'COMP_LINE="{line}" COMP_POINT={len(line)} COMP_CWORD=1 hydra_bash_completion; echo "${{COMPREPLY[@]}}"',
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert completion.returncode == 0, completion.stderr
    assert completion.stdout.split() == [f"logger={option}" for option in group_options("logger")]


def test_outside_a_terminal_a_long_step_and_evaluation_say_how_far_they_have_come(monkeypatch, caplog):
    """124m on a CPU: 128 micro-batches of about 30 s a step, and a step-0 evaluation of minutes."""
    clock = [1000.0]
    monkeypatch.setattr(console.time, "monotonic", lambda: clock[0])
    caplog.set_level(logging.INFO, logger="fineweb_gpt")
    bar = console.StepProgressBar()
    bar.terminal = False
    trainer = SimpleNamespace(
        global_step=0,
        max_steps=4715,
        accumulate_grad_batches=128,
        log_every_n_steps=1,
        progress_bar_metrics={},
        sanity_checking=True,
        num_sanity_val_batches=[4],
    )
    bar.on_validation_start(trainer, None)
    for batch in range(4):  # 45 s a batch
        clock[0] += 45
        bar.on_validation_batch_end(trainer, None, None, None, batch)
    bar.on_validation_end(trainer, None)
    trainer.sanity_checking = False
    bar.on_train_start(trainer, None)
    for micro_batch in range(127):  # still accumulating the first step
        clock[0] += 30
        bar.on_train_batch_end(trainer, None, None, None, micro_batch)
    said = [record.getMessage() for record in caplog.records]
    assert said[:3] == [
        "evaluating at step 0: batch 2/4, 1m30s so far",
        "evaluating at step 0: batch 4/4, 3m00s so far",
        "step 1/4715: micro-batch 2/128, 1m00s into the step",
    ]
    assert said[-1] == "step 1/4715: micro-batch 126/128, 1h03m into the step"
    assert len(said) == 2 + 63  # one line a minute, no more
