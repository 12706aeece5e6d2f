"""HellaSwag as build-nanogpt scores it: checked against a one-row-at-a-time reference written
here, on files in the published format, the Hub's copy through a fake HTTP layer, and the
split across DDP ranks."""

import json
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.nn import functional as F

from fake_hub import COMMIT, FAKE_HUB, requests, serving
from fineweb_gpt.errors import ConfigError
from fineweb_gpt.evals import hellaswag
from fineweb_gpt.evals.hellaswag import (
    Example,
    Scores,
    rank_share,
    read_examples,
    score_examples,
    synthetic_examples,
)
from fineweb_gpt.model import GPT, GPTConfig
from fineweb_gpt.tokenizer import gpt2_tokenizer

BLOCK = 96  # short enough that the longer synthetic contexts are cut


def published_row(i: int, example: Example, label=None) -> dict:
    """A row as hellaswag_val.jsonl has it (label an int there, a string in the Hub's copy)."""
    return {
        "ind": i,
        "activity_label": "Synthetic",
        "ctx_a": example.context,
        "ctx_b": "",
        "ctx": example.context,
        "split": "val",
        "split_type": "indomain",
        "label": example.label if label is None else label(example.label),
        "endings": list(example.endings),
        "source_id": f"synthetic~{i}",
    }


def write_published(path: Path, examples: list[Example]) -> Path:
    path.write_text("".join(json.dumps(published_row(i, e)) + "\n" for i, e in enumerate(examples)))
    return path


def write_hub_parquet(path: Path, examples: list[Example]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([published_row(i, e, label=str) for i, e in enumerate(examples)]), path)
    return path


def reference_choices(model: GPT, examples: list[Example]) -> tuple[list[int], list[int], int]:
    """Each example's ending with the lowest summed and the lowest mean loss, one row at a time:
    the context's tokens, then the ending's (encoded with its leading space), the last block + 1
    tokens kept; and how many examples had a row cut."""
    encoder, block = gpt2_tokenizer(), model.config.block_size
    chosen, chosen_norm, cut = [], [], 0
    for example in examples:
        sums, means, was_cut = [], [], False
        for ending in example.endings:
            context, ending_tokens = encoder.encode_ordinary(example.context), encoder.encode_ordinary(" " + ending)
            row = context + ending_tokens
            was_cut |= len(row) > block + 1
            row = row[-(block + 1) :]
            scored = min(len(ending_tokens), len(row) - 1)
            positions = range(len(row) - scored - 1, len(row) - 1)  # those that predict an ending token
            with torch.no_grad():
                logits = model(torch.tensor([row[:-1]]))[0][0, list(positions), :50257]
            log_probs = F.log_softmax(logits, dim=-1)
            losses = [-float(log_probs[k, row[j + 1]]) for k, j in enumerate(positions)]
            sums.append(sum(losses))
            means.append(sum(losses) / len(losses))
        chosen.append(min(range(4), key=sums.__getitem__))
        chosen_norm.append(min(range(4), key=means.__getitem__))
        cut += was_cut
    return chosen, chosen_norm, cut


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=BLOCK)).eval()


@pytest.fixture(scope="module")
def examples() -> list[Example]:
    return synthetic_examples(12, seed=1)


def test_scores_equal_a_row_by_row_reference(model, examples):
    chosen, chosen_norm, cut = reference_choices(model, examples)
    for batch_size in (1, 5):
        scores = score_examples(model, examples, batch_size=batch_size)
        assert [scores.chosen[i] for i in range(len(examples))] == chosen
        assert [scores.chosen_norm[i] for i in range(len(examples))] == chosen_norm
        labels = [e.label for e in examples]
        assert scores.acc == sum(c == y for c, y in zip(chosen, labels)) / len(examples)
        assert scores.acc_norm == sum(c == y for c, y in zip(chosen_norm, labels)) / len(examples)
        assert scores.examples == len(examples) and scores.cut == cut
    assert 0 < cut < len(examples)  # some contexts were cut from the left, some fitted
    assert chosen != chosen_norm  # the two rules disagree somewhere, so each is checked


def test_published_jsonl_and_the_hubs_parquet_read_alike(examples, tmp_path):
    jsonl = write_published(tmp_path / "hellaswag_val.jsonl", examples)
    parquet = write_hub_parquet(tmp_path / "0000.parquet", examples)
    assert read_examples(jsonl) == read_examples(parquet) == examples
    assert read_examples(jsonl, limit=5) == read_examples(parquet, limit=5) == examples[:5]


def test_bad_files_are_refused_in_one_line(tmp_path):
    row = published_row(0, synthetic_examples(1)[0])
    cases = {
        "missing.jsonl": None,
        "no_endings.jsonl": {k: v for k, v in row.items() if k != "endings"},
        "label.jsonl": {**row, "label": 7},
        "three.jsonl": {**row, "endings": row["endings"][:3]},
        "text.jsonl": "not json",
    }
    messages = {
        "missing.jsonl": "does not exist",
        "no_endings.jsonl": "line 1 has no 'endings' field",
        "label.jsonl": "line 1: label 7 is not a number from 0 to 3",
        "three.jsonl": "endings a list of 4 texts",
        "text.jsonl": "cannot be read",
    }
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_text(content if isinstance(content, str) else json.dumps(content) + "\n")
        with pytest.raises(ConfigError, match=messages[name]) as raised:
            read_examples(path)
        assert "\n" not in str(raised.value) and str(path) in str(raised.value)


def test_rank_shares_cover_every_example_once_and_their_counts_add_up(model, examples):
    whole = score_examples(model, examples, batch_size=4)
    shares = [rank_share(len(examples), rank, 3) for rank in range(3)]
    assert sorted(i for share in shares for i in share) == list(range(len(examples)))
    assert shares[1] == [1, 4, 7, 10]  # rank r takes r, r + world_size, ...
    # What each rank scores, then the sum the strategy's all-reduce makes of their counts.
    counts = [score_examples(model, examples, batch_size=4, indices=share).counts() for share in shares]
    summed = Scores.from_counts(torch.tensor(counts).sum(0).tolist())
    assert (summed.acc, summed.acc_norm, summed.examples, summed.cut) == (
        whole.acc,
        whole.acc_norm,
        whole.examples,
        whole.cut,
    )


def test_eval_command_downloads_the_hubs_copy_once_into_hf_home(model, examples, tmp_path):
    """fineweb-gpt-eval task=hellaswag with no file: the Hub's parquet copy, into HF_HOME, then offline."""
    from helpers import TESTS_DIR, cli_env

    ckpt = save_checkpoint(model, tmp_path / "model.ckpt")
    repo, log, hf_home = tmp_path / "hub", tmp_path / "requests.log", tmp_path / "hf_home"
    write_hub_parquet(repo / hellaswag.HUB_FILE, examples)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FAKE_HUB)
    env = cli_env(
        {"HF_HUB_OFFLINE": "0", "HF_HOME": str(hf_home), "FAKE_HUB_REPO": str(repo), "FAKE_HUB_LOG": str(log)}
    )
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(TESTS_DIR), *sys.path])
    done = run(
        [sys.executable, "-m", "fineweb_gpt.evaluate", f"ckpt={ckpt}", "task=hellaswag", "batch_size=6"], tmp_path, env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "model.hellaswag.json").read_text())
    scores = score_examples(model, examples)
    assert (result["acc"], result["acc_norm"], result["examples"]) == (scores.acc, scores.acc_norm, len(examples))
    assert result["contexts_cut"] == scores.cut and result["source"] == "Rowan/hellaswag (validation)"
    assert done.stdout.startswith(f"HellaSwag: acc {scores.acc:.4f}, acc_norm {scores.acc_norm:.4f}, 12 examples")
    assert "HellaSwag:" not in done.stderr and "\r" not in done.stderr  # no progress bar outside a terminal
    cached = hf_home / "hub" / "datasets--Rowan--hellaswag" / "snapshots" / COMMIT / hellaswag.HUB_FILE
    assert read_examples(cached) == examples
    assert [r for r in requests(log) if r.startswith("GET") and "/resolve/" in r] == [
        f"GET /datasets/Rowan/hellaswag/resolve/{hellaswag.HUB_REVISION}/{hellaswag.HUB_FILE}"
    ]

    # Offline, the cache alone answers, with no request.
    from huggingface_hub import constants

    log.unlink()
    with serving(repo, log):
        constants.HF_HUB_OFFLINE = True
        assert hellaswag.download_validation_set(cache_dir=str(hf_home / "hub")) == cached
    assert requests(log) == []


def test_offline_without_a_cache_names_the_published_file(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError) as raised:
        hellaswag.download_validation_set(cache_dir=str(tmp_path))
    message = str(raised.value)
    assert message.startswith("cannot get HellaSwag's validation set (Rowan/hellaswag)") and "\n" not in message
    assert "hellaswag.path=hellaswag_val.jsonl" in message


def save_checkpoint(model: GPT, path: Path) -> Path:
    """A checkpoint as training writes one, for the command line to load."""
    from helpers import lightning_module

    module = lightning_module(model.config.to_dict())
    module.model.load_state_dict(model.state_dict())
    from fineweb_gpt.tokenizer import END_OF_TEXT_ID, GPT2_RANKS_SHA256

    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "global_step": 0,
            "tokenizer": {"name": "gpt2", "ranks_sha256": GPT2_RANKS_SHA256, "end_of_text_id": END_OF_TEXT_ID},
        },
        path,
    )
    return path


def run(command: list[str], cwd: Path, env: dict):
    import subprocess

    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_auto_scores_gpt2_sized_models_on_a_gpu_only(make_config):
    from fineweb_gpt.evals.in_training import hellaswag_interval
    from fineweb_gpt.plan import plan_run
    from helpers import SMALL

    assert hellaswag_interval("auto", 124e6, on_gpu=True, sharded=False) == 1000
    assert hellaswag_interval("auto", 124e6, on_gpu=False, sharded=False) is None
    assert hellaswag_interval("auto", 40e6, on_gpu=True, sharded=False) is None
    assert hellaswag_interval("auto", 124e6, on_gpu=True, sharded=True) is None
    assert hellaswag_interval(50, 7e6, on_gpu=False, sharded=False) == 50
    with pytest.raises(ConfigError, match="eval.hellaswag_every_steps=50 does not work with trainer=fsdp"):
        hellaswag_interval(50, 124e6, on_gpu=True, sharded=True)
    # Through the plan, from the command line: model=124m on the CPU scores nothing unless asked.
    assert plan_run(make_config("model=124m", "hw=cpu"), {})["hellaswag_every_steps"] is None
    assert plan_run(make_config(*SMALL, "eval.hellaswag_every_steps=5"), {})["hellaswag_every_steps"] == 5
    with pytest.raises(
        ConfigError, match=r"eval.hellaswag_every_steps=0 must be a whole number at least 1, or null, or"
    ):
        plan_run(make_config(*SMALL, "eval.hellaswag_every_steps=0"), {})


def test_its_time_stays_out_of_the_step_it_follows(make_config, tmp_path, monkeypatch):
    """The callback runs after StepMetrics has timed the step (train.py's order): scoring made
    seconds slower shows in eval/hellaswag_time_ms; were it inside the step, the step's
    perf/step_time_ms would be longer than the scoring's whole time."""
    import time

    from fineweb_gpt.evals import in_training
    from fineweb_gpt.run.names import METRICS_FILE
    from fineweb_gpt.run.run_files import read_metrics
    from fineweb_gpt.train import train
    from helpers import SMALL

    real_score = in_training.score_examples

    def slower_score(*args, **kwargs):
        time.sleep(3.0)  # longer than a tiny step takes, even on a busy machine
        return real_score(*args, **kwargs)

    monkeypatch.setattr(in_training, "score_examples", slower_score)
    data = write_published(tmp_path / "hellaswag_val.jsonl", synthetic_examples(4))
    cfg = make_config(
        *SMALL,
        "trainer.max_steps=2",
        "val_every_steps=2",
        "eval.hellaswag_every_steps=2",
        f"eval.hellaswag_path={data}",
        "eval.samples=0",
    )
    train(cfg)
    rows = read_metrics(Path(cfg.run_dir) / METRICS_FILE)
    [scored] = [row for row in rows if "eval/hellaswag_time_ms" in row]
    [step] = [row for row in rows if row["step"] == 2 and "perf/step_time_ms" in row]
    assert scored["step"] == 2 and scored["eval/hellaswag_time_ms"] >= 3000
    assert step["perf/step_time_ms"] < scored["eval/hellaswag_time_ms"]
    assert not (Path(cfg.run_dir) / "samples.jsonl").exists()  # eval.samples=0
