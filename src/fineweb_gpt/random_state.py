"""The one way a run captures and restores its random streams: dropout's (torch, CUDA) in
every checkpoint, and all four at the start of each step for a save part way through one."""

import random

import numpy as np
import torch

ALL_STREAMS = ("torch", "cuda", "numpy", "python")


def capture_rng_states(streams: tuple[str, ...] = ALL_STREAMS) -> dict:
    """The current state of each named stream."""
    capture = {
        "torch": torch.get_rng_state,
        "cuda": lambda: torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": np.random.get_state,
        "python": random.getstate,
    }
    return {stream: capture[stream]() for stream in streams}


def restore_rng_states(states: dict) -> None:
    """Put back the streams `states` holds (a checkpoint's may hold only torch and CUDA's; CUDA's
    only where this machine has a GPU)."""
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if "numpy" in states:
        np.random.set_state(states["numpy"])
    if "python" in states:
        random.setstate(states["python"])
