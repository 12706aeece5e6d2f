"""The doctor as users run it: on logs of nanoGPT, llm.c and modded-nanogpt and on run folders,
from another folder, with known plateaus, known healthy curves and known settings."""

import csv
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from doctor_fixtures import (
    annealing_curve,
    cosine_lr,
    knee_curve,
    llmc_console_log,
    llmc_main_log,
    metric_rows,
    modded_log,
    nanogpt_console,
    owt_curve,
    run_summary,
    write_run_folder,
)
from fineweb_gpt.doctor.checks import diagnose
from fineweb_gpt.doctor.cli import main, plot_title
from fineweb_gpt.doctor.plot import loss_figure, plot_losses
from fineweb_gpt.doctor.record import RunRecord
from fineweb_gpt.doctor.report import render_markdown
from fineweb_gpt.doctor.sources import read_run
from fineweb_gpt.errors import ConfigError
from helpers import run_in_terminal

STEP_TOKENS = 524_288  # the plateau log: 16 x 1024 x 32
OWT_TOKENS = 491_520  # nanoGPT's config/train_gpt2.py: 12 x 1024 x 40
OWT_PARAMS = 123.59e6
A100, RTX4070 = 312e12, 58.3e12


def doctor(here: Path, *args: str) -> str:
    """Run the doctor as a user does from `here`; return what it printed."""
    here.mkdir(parents=True, exist_ok=True)
    previous = Path.cwd()
    os.chdir(here)
    try:
        assert main(list(args)) == 0
    finally:
        os.chdir(previous)
    return str(here)


def section(report: str, title_start: str) -> str:
    """The finding whose title starts so, up to the next one."""
    start = report.index(f"### {title_start}")
    end = report.find("\n### ", start + 1)
    return report[start : end if end > 0 else None]


@pytest.fixture
def plateau_log(tmp_path) -> Path:
    """A '125M' config left at 40.56M: 14,500 steps of 524,288 tokens, cosine decay planned to step
    20,000, compiled, micro-batch 16; val loss follows a power law to step 12,500, then moves
    0.004 in the last 2,000 steps."""
    path = tmp_path / "theirs" / "plateau.log"
    path.parent.mkdir()
    curve = knee_curve(12_500 * STEP_TOKENS)
    path.write_text(nanogpt_console("fineweb_125m", curve, 14_500, STEP_TOKENS, 40.56, 250, noise=0.002, mfu_percent=9))
    return path


def test_a_late_plateau_with_the_learning_rate_still_high_is_found(plateau_log, tmp_path, capsys):
    doctor(tmp_path / "here", str(plateau_log), "--gpu", "rtx4070")
    report = (tmp_path / "here" / "plateau.doctor.md").read_text()
    assert report in capsys.readouterr().out
    assert sorted(p.name for p in plateau_log.parent.iterdir()) == ["plateau.log"]  # nothing beside their file

    plateau = section(report, "Plateau since step ")
    start = int(plateau.split("Plateau since step ")[1].split("\n")[0].replace(",", ""))
    assert abs(start - 12_500) <= 500  # within two evaluations of the knee
    assert "how many unique tokens does the training data hold?" in plateau
    assert "the learning rate is still high" in plateau

    def nanogpt_lr(step):  # cosine from 6e-4 to 6e-5 between step 700 and 20,000
        return 6e-5 + 0.5 * (1 + math.cos(math.pi * (step - 700) / (20_000 - 700))) * (6e-4 - 6e-5)

    learning_rate = section(report, "Learning rate still high on the plateau")
    assert f"at step 14,500 it is {nanogpt_lr(14_500):.2e} ({nanogpt_lr(14_500) / 6e-4:.0%})" in learning_rate
    assert "**Fix:** --lr_decay_iters=14500, so the decay ends with the run" in learning_rate

    assert "--n_embd=768 gives 123.59M" in section(report, "Model size does not match its name")
    batch = section(report, "Batch plan for 12 GB")
    assert "micro-batch 16" in batch and "so it fits" in batch and "needs about" not in batch
    assert f"### MFU {0.09 * A100 / RTX4070:.0%}: fair" in report
    assert "### No reference run of this size" in report


def test_with_the_data_size_the_plateau_is_blamed_on_repeated_data(plateau_log, tmp_path):
    doctor(tmp_path, str(plateau_log), "--train-tokens", "500000000")
    report = (tmp_path / "plateau.doctor.md").read_text()
    epochs = 14_500 * STEP_TOKENS / 500e6
    assert f"### Repeated data: {epochs:.1f} epochs" in report
    assert "**Fix:** the data repeats" in section(report, "Plateau since step")


@pytest.fixture(scope="module")
def owt_log(tmp_path_factory) -> Path:
    """nanoGPT's GPT-2 124M OpenWebText reproduction: 600,000 iterations, a long, steady fall."""
    path = tmp_path_factory.mktemp("owt") / "owt.log"
    path.write_text(nanogpt_console("gpt2_owt", owt_curve, 600_000, OWT_TOKENS, 123.59, 1000, 1000, 38, noise=0.003))
    return path


def test_a_long_steadily_falling_run_has_no_plateau_and_no_learning_rate_finding(owt_log, tmp_path):
    doctor(tmp_path, str(owt_log))
    report = (tmp_path / "owt.doctor.md").read_text()
    for silent in ("Plateau", "Flattening", "Learning rate", "Overfitting", "Model size"):
        assert silent not in report
    assert "continuing is worth it" in section(report, "What continuing buys")
    # 600,000 x 491,520 tokens over nanoGPT's 9,035,582,198-token OpenWebText: repeated, and said so.
    assert f"### Repeated data: {600_000 * OWT_TOKENS / 9_035_582_198:.1f} epochs" in report
    assert "(openwebtext) is not FineWeb" in section(report, "Against GPT-2 124M trained by llm.c on FineWeb")


def test_headlines_say_what_was_trained_and_where_the_plan_came_from(tmp_path):
    log = tmp_path / "short.log"  # the same config without max_iters, stopped at iteration 6,000
    log.write_text(nanogpt_console("gpt2_owt", owt_curve, 6_000, OWT_TOKENS, 123.59, 1000, 100, drop=("max_iters",)))
    doctor(tmp_path, str(log))
    report = (tmp_path / "short.doctor.md").read_text()
    optimal = 20 * OWT_PARAMS
    plan = "nanoGPT's default max_iters=600000, not in the log"
    trained, planned = 6_000 * OWT_TOKENS, 600_000 * OWT_TOKENS
    assert (
        f"### Tokens: {trained / optimal:.2f}x Chinchilla-optimal trained (plan: {planned / optimal:.2f}x, {plan})"
        in report
    )
    unique = 9_035_582_198
    assert f"### Epochs: {trained / unique:.2f} trained (plan: {planned / unique:.2f}, {plan})" in report
    assert "Repeated data" not in report and "## No problems found" in report


def test_llmc_main_log_is_read_and_the_settings_it_lacks_are_asked_for(tmp_path):
    log = tmp_path / "main.log"
    log.write_text(llmc_main_log(annealing_curve(6e-4, 700, 19_560, STEP_TOKENS), 19_560, 250))
    doctor(tmp_path, str(log))
    report = (tmp_path / "main.doctor.md").read_text()
    assert "| source | llm.c log |" in report
    missing = section(report, "Not in the log: the tokens per optimizer step and the model size")
    assert "the token budget, epochs, the reference, MFU are skipped" in missing
    assert "**Next:** give --tokens-per-step N and --params N (or --model 124m)" in missing
    for skipped in ("### Tokens", "### Epochs", "### Against"):
        assert skipped not in report
    # A cosine schedule to zero flattens the curve at its end by design: no plateau.
    assert "## No problems found" in report and "Plateau" not in report


def test_a_124m_run_is_placed_beside_the_llmc_reference_at_equal_tokens(tmp_path):
    curve = annealing_curve(6e-4, 700, 19_560, STEP_TOKENS)
    log = tmp_path / "main.log"
    log.write_text(llmc_main_log(curve, 19_560, 250))
    doctor(tmp_path, str(log), "--tokens-per-step", "524288", "--model", "124m")
    report = (tmp_path / "main.doctor.md").read_text()
    reference = section(report, "Against GPT-2 124M trained by llm.c on FineWeb")
    # llm.c's own evaluation at step 19,560 (10.26B tokens) was 3.2722.
    assert f"at 10.26B tokens, the reference was at 3.272, this run is at {curve(19_560):.3f}" in reference
    assert reference.startswith("### Against GPT-2 124M trained by llm.c on FineWeb: on par")

    run = read_run(log)
    run.summary.update(tokens_per_step=STEP_TOKENS, n_layer=12, n_embd=768, n_head=12)
    labels = {line.get_label(): line.get_linestyle() for line in loss_figure(run, False).axes[0].get_lines()}
    assert labels["reference: GPT-2 124M trained by llm.c on FineWeb"] == "--"
    assert (tmp_path / "main.doctor.png").read_bytes().startswith(b"\x89PNG")


def test_a_model_of_another_size_is_not_compared_with_the_reference(tmp_path):
    log = tmp_path / "main.log"
    log.write_text(llmc_main_log(annealing_curve(6e-4, 700, 4000, STEP_TOKENS), 4000, 250))
    doctor(tmp_path, str(log), "--tokens-per-step", "524288", "--model", "40m")
    report = (tmp_path / "main.doctor.md").read_text()
    assert "### No reference run of this size" in report and "this model has 40.56M parameters" in report
    assert "the reference was at" not in report


def test_llmc_plateau_while_the_learning_rate_works_is_a_problem(tmp_path):
    curve = knee_curve(12_000, b=8.4)  # by steps: 3.5 at step 12,000, then flat, lr still well above 5%

    def val_loss(step):
        return curve(max(step, 1))

    log = tmp_path / "main.log"
    log.write_text(llmc_main_log(val_loss, 16_000, 250))
    doctor(tmp_path, str(log))
    report = (tmp_path / "main.doctor.md").read_text()
    plateau = section(report, "Plateau since step ")
    start = int(plateau.split("Plateau since step ")[1].split("\n")[0].replace(",", ""))
    assert abs(start - 12_000) <= 500
    # It stayed flat while the learning rate decayed from over a tenth of its peak: the rate is not the cause.
    assert cosine_lr(start, 6e-4, 700, 16_000) / 6e-4 > 0.1 and "Learning rate" not in report
    assert "**Fix:** the model learns little more from this data at this size" in plateau
    last_working = max(s for s in range(0, 16_001, 250) if cosine_lr(s, 6e-4, 700, 16_000) >= 0.05 * 6e-4)
    assert f"after step {last_working:,} the learning rate is under 5% of its peak" in plateau


def test_llmc_console_output_carries_its_own_settings(tmp_path):
    log = tmp_path / "console.log"
    log.write_text(llmc_console_log(annealing_curve(6e-4, 700, 6000, STEP_TOKENS), 6000, 250))
    doctor(tmp_path, str(log))
    report = (tmp_path / "console.doctor.md").read_text()
    assert "Not in the log" not in report
    assert "124.48M parameters" in report  # num_parameters 124475904 from its table
    assert "### MFU 42%: fair" in report and "h100's 989.0 TFLOPS" in report  # its device, H100 80GB HBM3


def test_modded_nanogpt_log_is_read_past_the_source_it_starts_with(tmp_path):
    log = tmp_path / "modded.txt"
    log.write_text(modded_log(lambda step: knee_curve(1200, b=5.0)(max(step, 1)), 1770, 25))
    doctor(tmp_path, str(log), "--tokens-per-step", "393216", "--params", "124M")
    report = (tmp_path / "modded.doctor.md").read_text()
    assert "| source | modded-nanogpt log |" in report and "| trained | 1,770 steps, 695.99M tokens" in report
    # Its log has no learning rate: a flattening is reported as a note, not blamed.
    notes = report.split("## Notes")[1]
    assert "may be the end of a schedule that decays to zero" in section(notes, "Flattening since step ")
    assert "Plateau" not in report


@pytest.mark.parametrize("name, text, source", [("a.log", "iter 10: loss 5.0, time 1.0ms, mfu 1.0%\n", "nanogpt")])
def test_format_can_be_forced_and_foreign_content_is_one_line(tmp_path, capsys, name, text, source):
    log = tmp_path / name
    log.write_text(text)
    assert read_run(log).source == source
    with pytest.raises(Exception, match="no llm.c"):
        read_run(log, "llmc")
    other = tmp_path / "other.log"
    other.write_text("epoch 1/10 - accuracy 0.93\n")
    assert "has no lines of a known training log" in error_line(capsys, str(other))
    assert f"{other} has no nanoGPT 'iter N: loss" in error_line(capsys, "--nanogpt-log", str(other))


def test_doctor_on_a_run_folder_writes_report_and_plot_beside_it(tmp_path, capsys):
    summary = run_summary(model_name="124m", dropout=0.1, compile=False)
    run_dir = write_run_folder(tmp_path / "run", summary, metric_rows(summary, train_gap=0.05))
    assert main([str(run_dir), "--log-x"]) == 0
    printed = capsys.readouterr().out
    report = (run_dir / "REPORT.md").read_text()
    assert report in printed and f"Report: {run_dir / 'REPORT.md'}" in printed
    assert "## Problems (2)" in report and "model.n_embd=768" in report and "model.dropout=0.0" in report
    assert "### Batch plan for 12 GB (uncompiled figures)" in report and "(measured, uncompiled)" in report
    assert (run_dir / "REPORT.png").read_bytes().startswith(b"\x89PNG")


def test_in_a_terminal_the_report_is_plain_text_and_the_plot_says_which_run(tmp_path):
    summary = run_summary(model_name="124m", dropout=0.1, compile=False)
    run_dir = write_run_folder(tmp_path / "run", summary, metric_rows(summary, train_gap=0.05))
    code, output = run_in_terminal(str(run_dir), cwd=tmp_path, module="fineweb_gpt.doctor")
    assert code == 0, output[-3000:]
    shown = output.replace("\r\n", "\n")
    assert shown.startswith(f"Run doctor: `fineweb_gpt run folder {run_dir}`\n\n  source     fineweb_gpt run folder\n")
    assert "\nProblems (2)\n" in shown and "\n    Fix: " in shown
    assert not any(mark in shown for mark in ("![", "| source |", "## ", "**Fix:**"))  # no markdown marks
    assert shown.endswith(f"Report: {run_dir / 'REPORT.md'}\nPlot: {run_dir / 'REPORT.png'}\n")
    assert "![train and val loss" in (run_dir / "REPORT.md").read_text()  # the file stays markdown
    title = plot_title(read_run(run_dir), run_dir)
    assert title == f"{run_dir}: 124m, 40.56M parameters"
    assert loss_figure(read_run(run_dir), False, title).axes[0].get_title() == title


def test_run_folder_without_a_summary_reads_the_hydra_config(tmp_path):
    summary = run_summary()
    run_dir = write_run_folder(tmp_path / "run", summary, metric_rows(summary))
    (run_dir / "run_summary.json").unlink()
    (run_dir / ".hydra" / "config.yaml").write_text(
        "model:\n  n_layer: 12\n  n_head: 12\n  n_embd: 384\n  block_size: 1024\ntotal_batch_tokens: 524288\n"
        "hw:\n  compile: true\n  micro_batch_size: 8\n"
    )
    assert main([str(run_dir), "--gpu", "rtx4070"]) == 0
    report = (run_dir / "REPORT.md").read_text()
    assert "40.56M parameters" in report and "1.00x" in report  # counted from the config's shape
    assert "compiled" in report.split("| hardware |")[1].split("\n")[0]  # hw.compile from the config
    assert "### Batch plan for 12 GB (compiled figures)" in report


def test_a_report_for_a_folder_you_do_not_own_goes_to_the_current_folder(tmp_path):
    summary = run_summary()
    run_dir = write_run_folder(tmp_path / "shared" / "run", summary, metric_rows(summary))
    before = sorted(p.name for p in run_dir.iterdir())
    os.chown(run_dir, 65534, 65534)
    doctor(tmp_path / "mine", str(run_dir))
    assert (tmp_path / "mine" / "run.doctor.md").is_file() and (tmp_path / "mine" / "run.doctor.png").is_file()
    assert sorted(p.name for p in run_dir.iterdir()) == before


# --- untrusted run folders and logs (issue 19) -------------------------------------------------


def error_line(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as stopped:
        main(list(args))
    assert stopped.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: ")
    return captured.err


@pytest.mark.parametrize("planted", ["REPORT.md", "REPORT.png"])
def test_links_planted_where_the_report_goes_are_refused_and_their_targets_untouched(tmp_path, capsys, planted):
    summary = run_summary()
    run_dir = write_run_folder(tmp_path / "run", summary, metric_rows(summary))
    outside = tmp_path / "outside.pth"
    outside.write_text("precious\n")
    (run_dir / planted).symlink_to(outside)
    before = sorted(p.name for p in run_dir.iterdir())
    assert f"{run_dir / planted} is a link" in error_line(capsys, str(run_dir))
    assert outside.read_text() == "precious\n"
    assert sorted(p.name for p in run_dir.iterdir()) == before  # not even the other file was written


def test_a_crafted_model_name_cannot_add_lines_to_the_report(tmp_path):
    name = "124m\n# Injected heading\n[click](http://example.com) | <script>"
    summary = run_summary(model_name=name)
    run_dir = write_run_folder(tmp_path / "run", summary, metric_rows(summary))
    assert main([str(run_dir)]) == 0
    report = (run_dir / "REPORT.md").read_text()
    assert "# Injected heading" not in report.splitlines()
    assert not any(line.startswith(("[click]", "<script>")) for line in report.splitlines())
    model_row = next(line for line in report.splitlines() if line.startswith("| model |"))
    assert "`124m # Injected heading [click](http://example.com) \\| <script>`" in model_row


def test_nan_and_inf_in_a_log_are_a_divergence_finding(tmp_path):
    import re

    text = nanogpt_console("gpt2_owt", owt_curve, 3000, OWT_TOKENS, 123.59, 500, 100)
    text = re.sub(r"iter 2000: loss [\d.]+", "iter 2000: loss nan", text)
    text = re.sub(r"step 2500: train loss [\d.]+, val loss [\d.]+", "step 2500: train loss inf, val loss inf", text)
    log = tmp_path / "nan.log"
    log.write_text(text)
    doctor(tmp_path, str(log))
    report = (tmp_path / "nan.doctor.md").read_text()
    divergence = section(report, "Loss became NaN at step 2000")
    assert "the last finite value was" in divergence and "lower learning rate (--learning_rate=0.0003)" in divergence


def test_colour_codes_and_carriage_returns_do_not_change_what_is_read(tmp_path):
    text = nanogpt_console("fineweb_125m", knee_curve(3e9), 4000, STEP_TOKENS, 40.56, 250)
    coloured = "".join(f"\x1b[32m{line}\x1b[0m\r\n" for line in text.splitlines())
    (tmp_path / "plain.log").write_text(text)
    (tmp_path / "colour.log").write_text("\x1b]0;title\x07" + coloured)
    plain, colour = read_run(tmp_path / "plain.log"), read_run(tmp_path / "colour.log")
    assert colour.summary == plain.summary and colour.rows == plain.rows and len(plain.rows) > 400


def test_a_crafted_config_line_allocates_nothing(tmp_path):
    import tracemalloc

    text = nanogpt_console("fineweb_125m", knee_curve(3e9), 1000, STEP_TOKENS, 40.56, 250)
    text = text.replace("batch_size = 16", 'batch_size = "x" * 99999999999')
    text = text.replace("n_layer = 12", "n_layer = 10**10**10")
    log = tmp_path / "crafted.log"
    log.write_text(text)
    tracemalloc.start()
    run = read_run(log)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 50 * 2**20
    assert run.get("micro_batch_size") is None and run.get("n_layer") is None  # unusable, so unknown
    assert run.get("tokens_per_step") == STEP_TOKENS  # nanoGPT printed its own count


def test_folder_without_metrics_says_how_to_get_them(tmp_path, capsys):
    (tmp_path / "wandb").mkdir()
    message = error_line(capsys, str(tmp_path))
    assert f"{tmp_path} has no csv/metrics.csv" in message
    assert "It logged to W&B" in message and "'logger=[csv,wandb]'" in message


def test_a_missing_path_is_one_line(tmp_path, capsys):
    assert f"{tmp_path / 'nope'} does not exist; give a run folder" in error_line(capsys, str(tmp_path / "nope"))


def test_command_line_error_has_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "fineweb_gpt.doctor", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr == f"error: {tmp_path / 'nope'} does not exist; give a run folder or a training log\n"


# --- the batch plan --------------------------------------------------------------------------------


def test_plan_command_prints_the_micro_batch_and_accumulation(capsys):
    assert main(["--plan", "--model", "124m", "--gpu-memory-gb", "12", "--tokens-per-step", "524288"]) == 0
    out = capsys.readouterr().out
    assert "micro-batch 8 x gradient accumulation 64" in out and "10.3 GiB (measured, uncompiled)" in out
    assert "hw.micro_batch_size=8" in out and "--gradient_accumulation_steps=64" in out
    assert "compiled (hw.compile=true): micro-batch 16 x gradient accumulation 32" in out


def test_plan_without_memory_is_one_line(capsys):
    assert "--plan needs the GPU's memory" in error_line(capsys, "--plan", "--model", "40m")


# --- any input: the readers and checks never crash (hypothesis) --------------------------------------

NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(10**6), 10**15))
STEPS = st.integers(0, 10**12)


def number_text(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)


LOG_LINES = st.one_of(
    st.text(max_size=80),
    st.builds(
        "iter {}: loss {}, time {}ms, mfu {}%".format,
        STEPS,
        NUMBERS.map(number_text),
        NUMBERS.map(number_text),
        NUMBERS.map(number_text),
    ),
    st.builds("step {}: train loss {}, val loss {}".format, STEPS, NUMBERS.map(number_text), NUMBERS.map(number_text)),
    st.builds(
        "{} = {}".format,
        st.sampled_from(["batch_size", "n_layer", "n_embd", "max_iters", "learning_rate", "min_lr", "block_size"]),
        st.one_of(st.text(max_size=40), NUMBERS.map(number_text)),
    ),
    st.builds("tokens per iteration will be: {:,}".format, st.integers(0, 10**15)),
    st.builds("s:{} tel:{}".format, STEPS, NUMBERS.map(number_text)),
    st.builds("s:{} trl:{} lr:{} norm:{}".format, STEPS, *[NUMBERS.map(number_text)] * 3),
    st.builds(
        "step {:4d}/{} | loss {} | lr {} | 1.0 ms | {}% bf16 MFU".format, STEPS, STEPS, *[NUMBERS.map(number_text)] * 3
    ),
    st.builds("| {} | {} |".format, st.sampled_from(["total batch size", "num_parameters", "channels C"]), NUMBERS),
    st.builds(
        "step:{}/{} val_loss:{} train_time:1ms step_avg:{}ms".format, STEPS, STEPS, *[NUMBERS.map(number_text)] * 2
    ),
    st.builds("\x1b[{}m{}\x1b[0m".format, st.integers(0, 99), st.text(max_size=20)),
)


@settings(max_examples=150, deadline=None)
@given(lines=st.lists(LOG_LINES, max_size=40), log_format=st.sampled_from([None, "nanogpt", "llmc", "modded"]))
def test_any_log_lines_never_crash_the_readers_or_the_checks(lines, log_format):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "any.log"
        path.write_text("\n".join(lines), errors="surrogatepass")
        try:
            run = read_run(path, log_format)
        except ConfigError as err:
            assert "\n" not in str(err)
            return
        report = render_markdown("any.log", run, diagnose(run), "any.png")
    assert report.startswith("# Run doctor:")


CELLS = st.one_of(st.just(""), NUMBERS.map(number_text), st.text(max_size=10))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(CELLS, CELLS, CELLS, CELLS), min_size=1, max_size=30))
def test_any_metrics_csv_never_crashes_the_doctor(rows):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "history.csv"
        with open(path, "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["step", "train/loss", "val/loss", "data/tokens_seen"])
            writer.writerows(rows)
        try:
            run = read_run(path)
        except ConfigError:
            return
        findings = diagnose(run)
        report = render_markdown("history.csv", run, findings, "history.png")
        problems = sum(f.problem for f in findings)
        assert report.startswith("# Run doctor: `history.csv`")
        assert (f"## Problems ({problems})" if problems else "## No problems found") in report


def test_the_plot_survives_extreme_values(tmp_path):
    rows = [
        {"step": 0, "val/loss": math.nan},
        {"step": 1, "train/loss": 1e308, "train/lr": math.inf},
        {"step": 2, "val/loss": -1e308, "data/tokens_seen": 1e300},
        {"step": 3, "val/loss": 3.0, "train/loss": 3.1},
    ]
    for log_x in (False, True):
        assert plot_losses(RunRecord({"source": "csv"}, rows), log_x).startswith(b"\x89PNG")


def test_the_doctor_reads_the_folder_a_real_training_run_leaves(tmp_path, capsys):
    from helpers import SMALL, run_cli

    run_dir = tmp_path / "run"
    result = run_cli(*SMALL, "trainer.max_steps=4", "val_every_steps=2", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    doctor(tmp_path / "elsewhere", str(run_dir))
    report = (run_dir / "REPORT.md").read_text()
    assert "| trained | 4 steps, 1.02K tokens (256 per step) |" in report  # 4 steps of SMALL's 256 tokens
    assert "### Undertrained:" in report and "smoke test" in report
    assert (run_dir / "REPORT.png").read_bytes().startswith(b"\x89PNG")
