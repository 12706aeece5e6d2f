"""The one place every training and validation DataLoader is made.

What all DataLoader workers must do (e.g. how they treat stop signals) is set here once,
through worker_init_fn, for every data source.
"""

import torch
from torch.utils.data import DataLoader, Dataset

from fineweb_gpt.run.stop_signals import ignore_stop_signals


def make_loader(dataset: Dataset, *, num_workers: int = 0, batch_size: int | None = None, evaluation=False):
    """A DataLoader over `dataset` in its own order: training streams batch themselves (batch_size=None).
    Its workers ignore the stop signals: the training process decides when to save and stop.
    evaluation: its iterations draw nothing from the run's random stream (each DataLoader iteration
    draws a seed), so a run resumed from a checkpoint saved before an evaluation draws what the
    uninterrupted run drew: dropout continues bit for bit."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        worker_init_fn=ignore_stop_signals,
        generator=torch.Generator() if evaluation else None,
    )
