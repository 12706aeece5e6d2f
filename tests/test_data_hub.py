"""Hub files through snapshot_download, and data=hf_stream through `datasets`, as users run them.

No test reaches the network. The Hub download tests swap only huggingface_hub's HTTP client
for one that serves a local folder as the dataset repository (fake_hub.py): listing,
downloading, the cache, HF_HOME and offline mode are huggingface_hub's own. The hf_stream
tests use local parquet files through the very call a Hub dataset takes
(`load_dataset("parquet", data_files=..., streaming=True)` instead of a repository name).
"""

import hashlib
import json
import os
import sys
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader

from fake_hub import COMMIT, FAKE_HUB, requests, serving
from fineweb_gpt.data import FineWebDataModule, HubStreamDataModule, bundled_sample_path, read_documents
from fineweb_gpt.data.holdout import is_validation_document
from fineweb_gpt.data.hub_files import download_hub_files
from fineweb_gpt.data.tokens import tokenize_documents
from fineweb_gpt.errors import ConfigError
from fineweb_gpt.tokenizer import END_OF_TEXT_ID
from helpers import SMALL, run_cli

TESTS = Path(__file__).parent


def write_repo(root: Path) -> Path:
    """A FineWeb-like dataset repository: two sample shards a folder down, and files not asked for."""
    sample = pq.read_table(bundled_sample_path())
    for i in range(2):
        (root / "sample" / "10BT").mkdir(parents=True, exist_ok=True)
        pq.write_table(sample.slice(i * 300, 300), root / "sample" / "10BT" / f"00{i}_00000.parquet")
    (root / "data").mkdir()
    pq.write_table(sample.slice(600, 200), root / "data" / "other.parquet")
    (root / "README.md").write_text("a dataset card")
    return root


@pytest.fixture
def fake_hub(tmp_path):
    """The Hub, online, serving a local repository to this process; returns (request log, repo)."""
    repo, log = write_repo(tmp_path / "repo"), tmp_path / "requests.log"
    with serving(repo, log):
        yield log, repo


def test_hub_files_download_once_with_the_same_pattern_meaning_online_and_offline(fake_hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    log, repo = fake_hub
    cache = tmp_path / "cache"
    # `*` crosses `/` (huggingface_hub's fnmatch): sample/*.parquet names the shards a folder down.
    files = download_hub_files("HuggingFaceFW/fineweb", "sample/*.parquet", str(cache))
    assert [f.relative_to(f.parents[2]).as_posix() for f in files] == [
        "sample/10BT/000_00000.parquet",
        "sample/10BT/001_00000.parquet",
    ]
    assert [f.read_bytes() for f in files] == [(repo / "sample/10BT" / f.name).read_bytes() for f in files]
    downloads = [r for r in requests(log) if r.startswith("GET") and "/resolve/" in r]
    assert sorted(r.rsplit("/", 1)[-1] for r in downloads) == ["000_00000.parquet", "001_00000.parquet"]

    again = download_hub_files("HuggingFaceFW/fineweb", "sample/*.parquet", str(cache))
    assert again == files
    assert [r for r in requests(log) if r.startswith("GET") and "/resolve/" in r] == downloads  # nothing new

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    log.unlink()
    assert download_hub_files("HuggingFaceFW/fineweb", "sample/*.parquet", str(cache)) == files
    assert download_hub_files("HuggingFaceFW/fineweb", "sample/*.parquet", str(cache), local_only=True) == files
    assert requests(log) == []


def test_pattern_matching_nothing_is_one_line(fake_hub, tmp_path):
    with pytest.raises(ConfigError, match=r"no parquet files of dataset HuggingFaceFW/fineweb match sample/20BT/\*"):
        download_hub_files("HuggingFaceFW/fineweb", "sample/20BT/*", str(tmp_path / "cache"))


def test_offline_without_cache_is_one_clear_line(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError) as raised:
        download_hub_files("HuggingFaceFW/fineweb", "sample/10BT/00[0-3]_00000.parquet", str(tmp_path))
    message = str(raised.value)
    assert message.startswith(
        "cannot get sample/10BT/00[0-3]_00000.parquet of dataset HuggingFaceFW/fineweb from the Hugging Face Hub"
    )
    assert "\n" not in message and "data.hf_repo" in message


@pytest.mark.slow
def test_two_ranks_download_once_into_hf_home_then_train_offline(tmp_path):
    """One process per node lists and downloads (prepare_data); the other rank asks the cache only."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FAKE_HUB)
    repo, log, hf_home = write_repo(tmp_path / "repo"), tmp_path / "requests.log", tmp_path / "hf_home"
    hub = ["data=multi_shard", "data.hf_repo=HuggingFaceFW/fineweb", "data.hf_files=sample/*.parquet"]
    online = {"HF_HUB_OFFLINE": "0", "HF_HOME": str(hf_home), "FAKE_HUB_REPO": str(repo), "FAKE_HUB_LOG": str(log)}
    online["PYTHONPATH"] = os.pathsep.join([str(site), *sys.path])
    ddp = ["trainer=ddp", "trainer.devices=2", "total_batch_tokens=256", "trainer.max_steps=2"]
    first = run_cli(*SMALL, *hub, *ddp, f"hydra.run.dir={tmp_path / 'first'}", cwd=tmp_path, env=online)
    assert first.returncode == 0, first.stderr[-3000:]
    listed = [r for r in requests(log) if "/revision/" in r or "/tree/" in r]
    assert len(listed) == 2  # the repository was listed once (revision, tree) for the two ranks
    snapshot = hf_home / "hub" / "datasets--HuggingFaceFW--fineweb" / "snapshots" / COMMIT
    assert sorted(p.name for p in snapshot.rglob("*.parquet")) == ["000_00000.parquet", "001_00000.parquet"]
    summary = json.loads((tmp_path / "first" / "run_summary.json").read_text())
    assert [Path(f).name for f in summary["data_files"]] == ["000_00000.parquet", "001_00000.parquet"]

    offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home)}  # and no Hub at all: the cache alone
    second = run_cli(
        *SMALL, *hub, "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'second'}", cwd=tmp_path, env=offline
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads((tmp_path / "second" / "run_summary.json").read_text())["data_files"] == summary["data_files"]


# --- data=hf_stream on local parquet files ---------------------------------------------------

BLOCK = 32
VAL_FRACTION = 0.05


def write_shards(folder: Path, count: int = 3, rows: int = 200, row_group_size: int = 50) -> list[Path]:
    sample = pq.read_table(bundled_sample_path())
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pq.write_table(sample.slice(i * rows, rows), folder / f"00{i}_00000.parquet", row_group_size=row_group_size)
    return sorted(folder.glob("*.parquet"))


def hub_stream(files, num_workers=0, micro_batch_size=1, block_size=BLOCK) -> HubStreamDataModule:
    dm = HubStreamDataModule(
        block_size=block_size,
        micro_batch_size=micro_batch_size,
        dataset="parquet",
        data_files=[str(f) for f in files],
        val_fraction=VAL_FRACTION,
        val_tokens=512,
        num_workers=num_workers,
        rows_per_chunk=16,
        seed=5,
    )
    dm.setup("fit")
    return dm


def training_tokens(files) -> np.ndarray:
    keys, texts = read_documents(files, "text")
    return tokenize_documents([t for k, t in zip(keys, texts) if not is_validation_document(k, VAL_FRACTION)])


def test_hf_stream_gives_every_token_once_per_epoch_across_2_ranks_x_2_workers(tmp_path):
    files, block = write_shards(tmp_path / "shards"), 256
    dm = hub_stream(files, num_workers=2, block_size=block)
    seen, finished = {}, set()
    for rank in (0, 1):
        dm.world_size = 2
        stream = dm.train_stream(rank)
        for batch in DataLoader(stream, batch_size=None, num_workers=2):
            if batch["position"]["epoch"] > 0:
                finished.add(batch["stream"])
                if finished >= {2 * rank, 2 * rank + 1}:
                    break
            else:
                seen.setdefault(batch["stream"], []).append(batch["windows"][0].numpy().copy())
    assert sorted(seen) == [0, 1, 2, 3]  # every worker of every rank got its own row groups
    windows = np.concatenate([np.stack(w) for w in seen.values()])
    source = training_tokens(files)
    assert not Counter(windows.ravel().tolist()) - Counter(source.tolist())  # nothing twice, nothing held out
    assert 0 <= len(source) - windows.size < 4 * (block + 1)  # at most one partial window per stream


def test_hf_stream_holds_out_the_same_validation_set_as_the_parquet_path(tmp_path):
    files = write_shards(tmp_path / "shards")
    parquet = FineWebDataModule(
        block_size=BLOCK, micro_batch_size=4, paths=[str(f) for f in files], val_fraction=VAL_FRACTION, val_tokens=512
    )
    parquet.setup("validate")
    stream = hub_stream(files)
    assert len(stream.val_windows) == 512 // BLOCK
    assert np.array_equal(stream.val_windows.tokens, parquet.val_windows.tokens)
    assert stream.files == files and stream.unique_train_tokens == parquet.unique_train_tokens


@pytest.mark.parametrize(
    "num_workers, stop_after, files, rows, row_group_size",
    [
        (0, 9, 2, 40, 10),
        (2, 9, 2, 40, 10),
        (2, 300, 2, 8, 4),  # 16 documents: the run resumes in a later epoch
        (2, 9, 1, 40, 40),  # one row group for two workers: datasets' "examples" split
    ],
)
def test_hf_stream_resumes_with_the_same_batches(tmp_path, num_workers, stop_after, files, rows, row_group_size):
    files = write_shards(tmp_path / "shards", count=files, rows=rows, row_group_size=row_group_size)

    def consume(dm, loader, count):
        return [dm.on_before_batch_transfer(next(loader), 0).clone() for _ in range(count)]

    uninterrupted = hub_stream(files, num_workers, micro_batch_size=4)
    reference = consume(uninterrupted, iter(uninterrupted.train_dataloader()), stop_after + 30)
    first = hub_stream(files, num_workers, micro_batch_size=4)
    consumed = consume(first, iter(first.train_dataloader()), stop_after)
    torch.save(first.state_dict(), tmp_path / "state.ckpt")
    resumed = hub_stream(files, num_workers, micro_batch_size=4)
    resumed.load_state_dict(torch.load(tmp_path / "state.ckpt", weights_only=True))
    continued = consume(resumed, iter(resumed.train_dataloader()), 30)
    for a, b in zip(reference, consumed + continued, strict=True):
        assert torch.equal(a, b)
    if stop_after == 300:
        assert min(p["epoch"] for p in first.positions.values()) >= 1


@pytest.mark.parametrize(
    "data_files",
    [
        "{d}/*.parquet",  # a glob
        "[{d}/000_00000.parquet,{d}/001_00000.parquet]",  # a list
        "{{train:[{d}/000_00000.parquet,{d}/001_00000.parquet]}}",  # files per split, as load_dataset takes them
    ],
)
def test_hf_stream_data_files_as_typed_on_the_command_line(make_config, tmp_path, data_files):
    files = write_shards(tmp_path / "shards", count=2)
    data = ["data=hf_stream", "data.dataset=parquet", "data.data_files=" + data_files.format(d=tmp_path / "shards")]
    cfg = make_config(*SMALL, *data)
    datamodule = instantiate(cfg.data, micro_batch_size=cfg.hw.micro_batch_size)
    datamodule.setup("validate")
    assert datamodule.files == files
    assert next(iter(datamodule.val_dataloader())).shape == (4, 33)


def test_hf_stream_text_column_that_is_not_text_is_refused(tmp_path):
    path = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3], "body": ["a", "b", "c"]}), path)
    with pytest.raises(ConfigError, match=r"data\.dataset=parquet: column 'text' holds Value\('int64'\), not text"):
        hub_stream([path])


class WindowRecorder(L.Callback):
    """Appends every trained micro-batch's windows to <path>.rank<N> (int32)."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with open(f"{self.path}.rank{trainer.global_rank}", "ab") as f:
            f.write(batch.cpu().numpy().astype(np.int32).tobytes())


def recorded_windows(path: Path, rank: int) -> np.ndarray:
    return np.fromfile(f"{path}.rank{rank}", dtype=np.int32).reshape(-1, BLOCK + 1)


def ngrams(windows: np.ndarray, n: int = 8) -> Counter:
    """Runs of n tokens inside one document (documents come in another order than in the files)."""
    runs = (tuple(w[i : i + n].tolist()) for w in windows for i in range(len(w) - n + 1))
    return Counter(run for run in runs if END_OF_TEXT_ID not in run)


def test_hf_stream_trains_from_the_command_line_with_2_workers(tmp_path):
    write_shards(tmp_path / "shards")
    result = run_cli(
        *SMALL,
        "data=hf_stream",
        "data.dataset=parquet",
        f"data.data_files={tmp_path / 'shards'}/*.parquet",
        "data.num_workers=2",
        "trainer.max_steps=3",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert sorted(checkpoint["HubStreamDataModule"]["positions"]) == [0, 1]  # both workers fed the run
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert len(summary["data_files"]) == 3 and summary["unique_train_tokens"] > 100_000


@pytest.mark.slow
def test_hf_stream_two_ranks_never_train_a_document_twice(tmp_path):
    # Documents of random words: any 8 tokens in a row occur once in the data, so a document
    # (or a part of one) trained twice shows as an 8-gram seen twice.
    rng = np.random.default_rng(0)
    words = [hashlib.sha1(str(i).encode()).hexdigest()[: rng.integers(3, 9)] for i in range(5000)]
    docs = [" ".join(rng.choice(words, size=rng.integers(20, 80))) for _ in range(400)]
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(2):
        part = slice(i * 200, (i + 1) * 200)
        table = pa.table({"text": docs[part], "id": [f"doc{j}" for j in range(400)][part]})
        pq.write_table(table, folder / f"part{i}.parquet", row_group_size=25)
    record = tmp_path / "windows"
    result = run_cli(
        *SMALL,
        "trainer=ddp",
        "trainer.devices=2",
        "data=hf_stream",
        "data.dataset=parquet",
        f"data.data_files={folder}/*.parquet",
        "data.num_workers=2",
        "data.val_fraction=0.05",
        "trainer.max_steps=12",
        "+callbacks.recorder._target_=test_data_hub.WindowRecorder",
        f"+callbacks.recorder.path={record}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [recorded_windows(record, rank) for rank in (0, 1)]
    assert [len(r) for r in ranks] == [12 * 4, 12 * 4]  # 12 steps of one micro-batch of 4 windows per rank
    keys = [f"doc{j}" for j in range(400)]
    source = tokenize_documents([d for d, k in zip(docs, keys) if not is_validation_document(k, 0.05)])
    assert len(source) > 3 * sum(r.size for r in ranks)  # well inside the first epoch of every stream
    trained = ngrams(np.concatenate(ranks))
    assert max(trained.values()) == 1  # no document, nor a part of one, trained twice
    assert not trained - ngrams(source[None, :])  # every window is training text: nothing held out
    assert json.loads((tmp_path / "run" / "run_summary.json").read_text())["world_size"] == 2
