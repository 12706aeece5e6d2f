"""Files that are not what they seem, as the commands meet them (issue 28): named pipes where a
file is expected, crafted JSON and metrics, spreadsheet formulas in sweep tables, token ids
beyond the vocabulary, token counts that are no counts, tokenizer options that cannot work."""

import csv
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from doctor_fixtures import run_summary, write_run_folder
from fineweb_gpt.data import bundled_sample_path, inspect_parquet
from fineweb_gpt.data.parquet_files import estimate_train_tokens
from fineweb_gpt.doctor.cli import main as doctor_main
from fineweb_gpt.errors import ConfigError
from fineweb_gpt.run.ownership import claim_run_folder
from fineweb_gpt.run.run_files import one_line_text, read_metrics
from fineweb_gpt.sweep import FORMULA_STARTS, csv_cell
from fineweb_gpt.sweep import main as sweep_main
from fineweb_gpt.tokenize import main as tokenize_main
from helpers import SMALL, run_cli
from test_data_token_shards import write_llm_c_shard


def without_waiting(call, pipes: list[Path], seconds: float = 60):
    """call() in a thread; if it is still waiting after `seconds` (on one of the named `pipes`),
    the pipes are opened for writing and closed, so that it returns, and the test fails."""
    outcome = {}

    def run():
        try:
            outcome["value"] = call()
        except BaseException as err:  # SystemExit from a command line's error
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    waited = thread.is_alive()
    if waited:
        for pipe in pipes:
            os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(10)
    assert not waited, f"it waited on a named pipe for {seconds} s"
    return outcome


def exited_with_one_line(outcome: dict, capsys) -> str:
    assert isinstance(outcome.get("error"), SystemExit) and outcome["error"].code == 2, outcome
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err.strip()


# --- named pipes ------------------------------------------------------------------------------


def test_a_named_pipe_as_data_path_is_refused_in_one_line_saying_what_it_is(tmp_path):
    # Before: "data file ... does not exist", though it does; given by a glob, train waited for ever.
    pipe = tmp_path / "000_00000.parquet"
    os.mkfifo(pipe)
    run_dir = tmp_path / "outputs" / "run"
    result = run_cli(*SMALL, "data=single_parquet", f"data.path={pipe}", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {pipe} is not a regular file (a named pipe); give .parquet files in data.path / data.paths"
    )
    assert not run_dir.exists()


def test_the_doctor_the_tokenizer_and_the_sweep_table_refuse_named_pipes_instead_of_waiting(tmp_path, capsys):
    log = tmp_path / "train.log"
    os.mkfifo(log)
    err = exited_with_one_line(without_waiting(lambda: doctor_main([str(log)]), [log]), capsys)
    assert err == f"error: {log} is not a regular file (a named pipe); give a run folder or a training log"

    parquet = tmp_path / "pipe.parquet"
    os.mkfifo(parquet)
    tokenize = lambda: tokenize_main([str(parquet), "--out", str(tmp_path / "tokens")])  # noqa: E731
    err = exited_with_one_line(without_waiting(tokenize, [parquet]), capsys)
    assert err == f"error: {parquet} is not a regular file (a named pipe); give .parquet files in the inputs"

    # A sweep whose second point has a named pipe for its overrides: the table still comes, that
    # point without its overrides.
    sweep = tmp_path / "sweep"
    for point in ("0", "1"):
        write_run_folder(sweep / point, run_summary(), [{"step": 1, "train/loss": 5.0}])
        (sweep / point / "result.json").write_text('{"status": "completed"}')
    (sweep / "0" / ".hydra" / "overrides.yaml").write_text("- optim.lr=0.001\n")
    os.mkfifo(sweep / "1" / ".hydra" / "overrides.yaml")
    outcome = without_waiting(lambda: sweep_main([str(sweep)]), [sweep / "1" / ".hydra" / "overrides.yaml"])
    assert outcome == {"value": 0}
    with open(sweep / "sweep_results.csv", newline="") as file:
        assert sorted((row["run"], row["overrides"]) for row in csv.DictReader(file)) == [
            ("0", "optim.lr=0.001"),
            ("1", ""),
        ]


def test_a_named_pipe_among_the_checkpoints_is_named_and_never_opened(make_config, tmp_path):
    # resume=auto read every *.ckpt of the folder, holding the folder's lock while it waited.
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    os.mkfifo(folder / "step000004.ckpt")
    cfg = make_config(*SMALL, "resume=auto")
    outcome = without_waiting(lambda: claim_run_folder(cfg), [folder / "step000004.ckpt"])
    assert isinstance(outcome.get("error"), ConfigError)
    assert str(outcome["error"]).startswith(
        f"resume=auto found checkpoints in {folder} but none loads (step000004.ckpt: not a regular file (a named pipe))"
    )


# --- crafted JSON and metrics -----------------------------------------------------------------

CRAFTED = {
    "nested 100,000 deep": "[" * 100_000 + "]" * 100_000,
    "10**400": '{"num_params": 1' + "0" * 400 + ', "error": 1' + "0" * 400 + "}",
    "a 5,000-digit integer": '{"num_params": ' + "7" * 5000 + ', "error": ' + "7" * 5000 + "}",
}


@pytest.mark.parametrize("payload", list(CRAFTED.values()), ids=list(CRAFTED))
def test_crafted_json_in_a_run_folder_is_one_line_or_ignored_never_a_traceback(tmp_path, capsys, payload):
    # Before: RecursionError, OverflowError or ValueError tracebacks in the doctor and the sweep table.
    sweep = tmp_path / "sweep"
    run = write_run_folder(sweep / "0", run_summary(), [{"step": 1, "train/loss": 5.0, "data/tokens_seen": 256}])
    (run / ".hydra" / "overrides.yaml").write_text("- optim.lr=0.001\n")
    (run / "run_summary.json").write_text(payload)
    (run / "result.json").write_text(payload)
    capsys.readouterr()
    if payload.startswith("["):
        with pytest.raises(SystemExit) as refused:
            doctor_main([str(run)])
        assert refused.value.code == 2
        err = capsys.readouterr().err
        assert (
            err
            == f"error: {run / 'run_summary.json'} is nested too deeply to be a run's record; restore it or delete it\n"
        )
    else:
        assert doctor_main([str(run)]) == 0  # the number is no number a run writes: as if not there
        assert "7777" not in (run / "REPORT.md").read_text() and "1000000" not in (run / "REPORT.md").read_text()
    assert sweep_main([str(sweep)]) == 1  # not completed: the status is not one a run writes
    with open(sweep / "sweep_results.csv", newline="") as file:
        [row] = list(csv.DictReader(file))
    assert row["params"] == ""
    if payload.startswith("["):
        assert "nested too deeply" in row["error"]


def test_a_crafted_metrics_file_is_read_in_time_linear_in_its_rows(tmp_path):
    # Rows alternating steps i, i+2 (every other row goes back a step): 271 s for the doctor at
    # 200,000 rows before, each step back rescanning every row kept.
    path = tmp_path / "metrics.csv"
    rows = 200_000
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["step", "train/loss"])
        writer.writerows([i + 2 * (i % 2), 5.0] for i in range(rows))
    started = time.perf_counter()
    read = read_metrics(path)
    seconds = time.perf_counter() - started
    # Each step back drops the rows from that step on: the even rows stay, with the last odd one.
    assert [row["step"] for row in read] == [*range(0, rows, 2), rows + 1]
    assert seconds < 30, f"{seconds:.1f} s for {rows:,} rows"


# --- the sweep table as a spreadsheet ---------------------------------------------------------


def test_no_cell_of_the_sweep_csv_starts_a_spreadsheet_formula(tmp_path):
    sweep = tmp_path / "sweep"
    names = {"=cmd|' -C calc'!A0": '=HYPERLINK("http://x","y")', "@SUM(1)": "-2+3", "+plain": "ok"}
    for name, error in names.items():
        run = write_run_folder(sweep / name, run_summary(), [{"step": 1, "train/loss": 5.0}])
        (run / ".hydra" / "overrides.yaml").write_text(f"- model.n_embd={len(name)}\n- '+x=@{len(name)}'\n")
        (run / "result.json").write_text(json.dumps({"status": "failed", "error": error}))
    assert sweep_main([str(sweep)]) == 1
    with open(sweep / "sweep_results.csv", newline="") as file:
        rows = {row["run"]: row for row in csv.DictReader(file)}
    assert sorted(rows) == sorted(f"'{name}" for name in names)
    for name, error in names.items():
        row = rows[f"'{name}"]
        assert row["error"] == (f"'{error}" if error.startswith(FORMULA_STARTS) else error)
        assert row["overrides"].startswith("'+x=@") or row["overrides"].startswith("model.")
    markdown = (sweep / "sweep_results.md").read_text()
    assert "`=cmd\\|' -C calc'!A0`" in markdown  # the markdown table quotes it as code: unchanged


@given(st.text())
def test_a_sweep_csv_cell_is_the_one_line_text_less_any_formula(text):
    cell = csv_cell(text)
    assert not cell.startswith(FORMULA_STARTS)
    assert cell.removeprefix("'") == one_line_text(text, 2000) or cell == one_line_text(text, 2000)


# --- data that is not what it says --------------------------------------------------------------


ROWS = 100


@pytest.fixture(scope="module")
def documents(tmp_path_factory) -> tuple[pa.Table, int]:
    """The sample's first ROWS documents, and the tokens estimated from their text."""
    table = pq.read_table(bundled_sample_path()).slice(0, ROWS)
    plain = tmp_path_factory.mktemp("plain") / "plain.parquet"
    pq.write_table(table, plain)
    return table, estimate_train_tokens([inspect_parquet(plain, "text")], "text", 0.005)


@pytest.mark.parametrize(
    "token_count",
    [
        pa.array([None] + [10] * (ROWS - 1), pa.int64()),
        pa.array([float("nan")] + [10.0] * (ROWS - 1)),
        pa.array(["10"] * ROWS),
        pa.array([-950] * ROWS, pa.int64()),
    ],
    ids=["null", "NaN", "text", "negative"],
)
def test_a_token_count_column_that_is_no_count_is_estimated_from_the_text_instead(
    tmp_path, documents, token_count, caplog
):
    # Before: a traceback during setup (null, NaN, text), or "~-760000.00T unique training tokens".
    table, from_text = documents
    counted = tmp_path / "counted.parquet"
    pq.write_table(table.append_column("token_count", token_count), counted)
    assert estimate_train_tokens([inspect_parquet(counted, "text")], "text", 0.005) == from_text > 50_000
    assert f"{counted}: its token_count column is not a whole, non-negative count in every row" in caplog.text


def test_a_token_id_beyond_the_vocabulary_is_refused_in_one_line_and_leaves_no_run_folder(tmp_path):
    # Before: an IndexError traceback after the step-0 evaluation (on a GPU, a device-side
    # assert), and the run folder stayed.
    shards = tmp_path / "shards"
    shards.mkdir()
    tokens = np.random.default_rng(0).integers(0, 50257, 20_000)
    tokens[12_345] = 60_000
    write_llm_c_shard(shards / "train_000000.bin", tokens)
    write_llm_c_shard(shards / "val_000000.bin", np.arange(2_000) % 50257)
    run_dir = tmp_path / "outputs" / "run"
    data = ["data=token_shards", f"data.paths={shards}", "data.num_workers=0"]
    result = run_cli(*SMALL, *data, "trainer.max_steps=3", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {shards / 'train_000000.bin'} holds token id 60000 (token 12,345), beyond GPT-2's 50257 ids: it "
        "does not hold GPT-2 tokens; make shards with fineweb-gpt-tokenize"
    )
    assert "Traceback" not in result.stderr
    assert not run_dir.exists()


def test_the_tokenizer_refuses_an_out_that_is_a_file_and_a_shard_size_that_makes_a_flood_of_files(tmp_path, capsys):
    sample = str(bundled_sample_path())
    taken = tmp_path / "taken"
    taken.write_text("mine\n")
    err = exited_with_one_line({"error": catch_exit(tokenize_main, [sample, "--out", str(taken)])}, capsys)
    assert err == f"error: --out {taken} exists and is not a folder; choose a new or empty --out folder"
    assert taken.read_text() == "mine\n"

    out = tmp_path / "tokens"
    err = exited_with_one_line(
        {"error": catch_exit(tokenize_main, [sample, "--out", str(out), "--shard-tokens", "10"])}, capsys
    )
    assert err.startswith("error: --shard-tokens 10 would write about ")
    files = int(err.split("about ")[1].split(" shard")[0].replace(",", ""))
    assert 100_000 < files < 130_000  # the sample holds about 1.2M training tokens
    assert not out.exists()


def catch_exit(command, argv: list[str]) -> BaseException | None:
    try:
        command(argv)
    except SystemExit as stop:
        return stop
    return None
