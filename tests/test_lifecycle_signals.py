"""DataLoader workers and the stop signals that SLURM and a terminal's Ctrl-C send to every process
of a job (issue 19, item 2). The runs stopped this way are in test_reliability.py."""

import os
import signal
import time

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from fineweb_gpt.run.stop_signals import ignore_stop_signals


class WorkerPids(IterableDataset):
    """Yields, forever, the pid of the worker process that produced the item."""

    def __iter__(self):
        while True:
            yield torch.tensor(os.getpid())


def next_items(iterator, count: int) -> set[int]:
    return {int(next(iterator)) for _ in range(count)}


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT"])
def test_dataloader_workers_given_ignore_stop_signals_survive_the_stop_signals(signal_name):
    loader = DataLoader(WorkerPids(), batch_size=None, num_workers=2, worker_init_fn=ignore_stop_signals)
    iterator = iter(loader)
    workers = next_items(iterator, 8)
    assert len(workers) == 2
    for pid in workers:
        os.kill(pid, getattr(signal, signal_name))
    time.sleep(0.5)
    assert next_items(iterator, 8) == workers  # the same two workers go on producing
    del iterator


@pytest.mark.library_behaviour  # ours: the tests above and below
def test_without_it_a_stop_signal_kills_a_worker_and_the_loader_fails():
    # What SLURM's signal to the whole job step did to a run before (issue 19, item 2).
    iterator = iter(DataLoader(WorkerPids(), batch_size=None, num_workers=2))
    workers = next_items(iterator, 8)
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(RuntimeError, match="DataLoader worker .* exited unexpectedly|killed by signal"):
        next_items(iterator, 8)


def test_the_projects_loaders_workers_survive_the_stop_signals():
    # Every DataLoader of a run is made by data.loader.make_loader: its workers ignore the stop
    # signals whatever the data source.
    from fineweb_gpt.data.loader import make_loader

    iterator = iter(make_loader(WorkerPids(), num_workers=2))
    workers = next_items(iterator, 8)
    assert len(workers) == 2
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGINT)
    time.sleep(0.5)
    assert next_items(iterator, 8) == workers
    del iterator


def test_it_keeps_lightnings_worker_seeding(monkeypatch):
    # Setting a worker_init_fn turns off the one Lightning adds under seed_everything(workers=True).
    from functools import partial

    for variable in ("PL_SEED_WORKERS", "PL_GLOBAL_SEED"):  # seed_everything sets them; put them back after
        monkeypatch.setenv(variable, os.environ.get(variable, "0"))

    from lightning.fabric.utilities.seed import pl_worker_init_function, seed_everything

    class RandomDraws(IterableDataset):
        def __iter__(self):
            yield torch.rand(3)

    def draws(init_fn):
        seed_everything(1234, workers=True)
        return torch.stack(list(DataLoader(RandomDraws(), batch_size=None, num_workers=2, worker_init_fn=init_fn)))

    assert torch.equal(draws(ignore_stop_signals), draws(partial(pl_worker_init_function, rank=0)))
    assert not torch.equal(draws(ignore_stop_signals), draws(None))  # the seeding is really there
