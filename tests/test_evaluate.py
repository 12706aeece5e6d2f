"""fineweb-gpt-eval, run as a user runs it: from another folder, offline, on a run's checkpoint."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from fineweb_gpt.config_files import load_option
from fineweb_gpt.data import FineWebDataModule, bundled_sample_path, is_validation_document, read_documents
from fineweb_gpt.data.tokens import tokenize_documents
from fineweb_gpt.errors import ConfigError
from fineweb_gpt.evaluate import evaluate
from fineweb_gpt.run.names import METRICS_FILE
from fineweb_gpt.run.run_files import read_metrics
from fineweb_gpt.sample import load_model
from fineweb_gpt.tokenizer import END_OF_TEXT_ID, gpt2_tokenizer
from helpers import CONF_DIR, SMALL, TESTS_DIR, run_cli

REPO = TESTS_DIR.parent
STEPS = 4


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A small run on the bundled sample: 4 steps, evaluated at steps 0, 2 and 4."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    done = run_cli(*SMALL, f"trainer.max_steps={STEPS}", "val_every_steps=2", f"hydra.run.dir={run_dir}", cwd=TESTS_DIR)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def eval_command() -> list[str]:
    """fineweb-gpt-eval as installed; where this environment was installed before it existed, its
    entry point from pyproject.toml, run the way the installed script runs it."""
    installed = shutil.which("fineweb-gpt-eval")
    if installed:
        return [installed]
    entry = re.search(r'^fineweb-gpt-eval = "(.+):(.+)"$', (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    module, function = entry.groups()
    launcher = f"import sys; from {module} import {function}; sys.argv[0] = 'fineweb-gpt-eval'; sys.exit({function}())"
    return [sys.executable, "-c", launcher]


def run_eval(*args: str, cwd: Path, command: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    command = command or [sys.executable, "-m", "fineweb_gpt.evaluate"]
    return subprocess.run([*command, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_eval_reproduces_the_runs_final_val_loss(trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    # The run's data config (SMALL); its 8 windows in batches of 3, 3 and 2, weighted as Lightning does.
    done = run_eval(f"ckpt={ckpt}", "data.val_tokens=256", "batch_size=3", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((trained_run / "checkpoints" / "last.eval.json").read_text())
    final = [row for row in read_metrics(trained_run / METRICS_FILE) if "val/loss" in row][-1]
    assert final["step"] == result["step"] == STEPS
    assert result["loss"] == pytest.approx(final["val/loss"], abs=1e-5)
    assert result["perplexity"] == pytest.approx(final["val/ppl"], rel=1e-4)
    assert (result["tokens"], result["windows"], result["block_size"]) == (256, 8, 32)
    assert done.stdout.count("\n") == 1 and f"loss {result['loss']:.4f}" in done.stdout
    assert "256 tokens in 8 windows of 32" in done.stdout and "(checkpoint step 4)" in done.stdout
    assert os.listdir(tmp_path) == []  # nothing left in the folder it ran from


def test_console_script_scores_the_bundled_sample_by_default(trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "step000004.ckpt"
    done = run_eval(f"ckpt={ckpt}", cwd=tmp_path, command=eval_command())
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((trained_run / "checkpoints" / "step000004.eval.json").read_text())
    # data=sample holds out 1% of its documents, fewer tokens than its 16384: every whole window of them.
    keys, texts = read_documents([bundled_sample_path()], "text")
    fraction = load_option("data", "sample")["val_fraction"]
    held_out = tokenize_documents([t for k, t in zip(keys, texts) if is_validation_document(k, fraction)])
    windows = len(held_out) // 33
    assert (result["tokens"], result["windows"], result["split"]) == (32 * windows, windows, "val")
    assert result["step"] == STEPS and 32 * windows < 16384
    assert result["data"]["bundled_sample"] is True and result["data"]["block_size"] == 32
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert result["checkpoint"] == str(ckpt.resolve())
    assert done.stdout.startswith("held-out documents of the bundled sample: loss ")
    assert done.stderr == ""  # the progress bar only in a terminal: a log file would get every redraw
    assert os.listdir(tmp_path) == []


def write_parquet(path: Path, texts: list[str]) -> None:
    pq.write_table(pa.table({"id": [f"doc-{i}" for i in range(len(texts))], "text": texts}), path)


def test_split_all_scores_every_document_of_a_parquet_file(trained_run, tmp_path):
    texts = pq.read_table(bundled_sample_path(), columns=["text"]).column("text").to_pylist()[100:106]
    data_file = tmp_path / "never_trained_on.parquet"
    write_parquet(data_file, texts)
    out = tmp_path / "scores" / "held_out.json"
    out.parent.mkdir()
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    args = [f"ckpt={ckpt}", "data=single_parquet", f"data.path={data_file}", "split=all", f"out={out}"]
    done = run_eval(*args, "batch_size=64", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())

    # Every document, each followed by <|endoftext|>, cut into windows of 33 tokens: 32 inputs, 32 targets.
    encoder = gpt2_tokenizer()
    tokens = torch.tensor([t for text in texts for t in (*encoder.encode_ordinary(text), END_OF_TEXT_ID)])
    windows = tokens[: len(tokens) // 33 * 33].view(-1, 33)
    model = load_model(ckpt)
    with torch.no_grad():
        losses = [model(w[:, :-1], w[:, 1:])[1] * len(w) for w in windows.split(50)]
    assert (result["windows"], result["tokens"]) == (len(windows), len(windows) * 32)
    assert result["loss"] == pytest.approx(float(sum(losses)) / len(windows), abs=1e-5)
    assert result["source"] == str(data_file) and done.stdout.startswith(f"every document of {data_file}: ")


@pytest.fixture
def compose_eval():
    def _compose(*overrides: str):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("eval", overrides=list(overrides), return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)  # the command's choices (data=...), as the app sets them
        with open_dict(cfg):
            del cfg.hydra
        return cfg

    yield _compose
    GlobalHydra.instance().clear()


def test_bad_input_is_refused_before_any_scoring(compose_eval, trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(ckpt.read_bytes()[:5000])
    cases = {
        (): "ckpt is required",
        (f"ckpt={tmp_path / 'none.ckpt'}",): f"ckpt={tmp_path / 'none.ckpt'} does not exist",
        (f"ckpt={damaged}",): f"ckpt={damaged} is damaged (",
        (f"ckpt={tmp_path}",): f"ckpt={tmp_path} is a folder",
        (f"ckpt={tmp_path}/none/checkpoints/last.ckpt",): f"no checkpoint here, {tmp_path}/none/checkpoints is missing",
        (f"ckpt={trained_run}",): f"ckpt={trained_run} is a folder; give ckpt={trained_run}/checkpoints/last.ckpt",
        (f"ckpt={ckpt}", "data=single_parquet"): "data.path has no value",
        (f"ckpt={ckpt}", "data=single_parquet", f"data.path={tmp_path}/no.parquet"): "no.parquet does not exist",
        (f"ckpt={ckpt}", "data.block_size=64"): "data.block_size=64 must be a whole number from 1 to the checkpoint's",
        (f"ckpt={ckpt}", "split=train"): "split=train is not one of val",
        (f"ckpt={ckpt}", "batch_size=0"): "batch_size=0 must be a whole number of at least 1",
        (f"ckpt={ckpt}", f"out={tmp_path}/missing/x.json"): "cannot write",
    }
    for overrides, message in cases.items():
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            evaluate(compose_eval(*overrides))


def test_command_line_errors_are_one_line(trained_run, tmp_path):
    for args, message in (
        ([f"ckpt={tmp_path / 'none.ckpt'}"], f"error: ckpt={tmp_path / 'none.ckpt'} does not exist"),
    ):
        done = run_eval(*args, cwd=tmp_path)
        assert done.returncode == 2 and done.stdout == ""
        assert done.stderr.count("\n") == 1 and done.stderr.startswith(message)


def test_training_refuses_a_source_with_every_document_held_out():
    module = FineWebDataModule(block_size=32, micro_batch_size=4, bundled_sample=True, val_fraction=1.0)
    with pytest.raises(ConfigError, match="data.val_fraction=1 holds out every document"):
        module.setup("fit")
