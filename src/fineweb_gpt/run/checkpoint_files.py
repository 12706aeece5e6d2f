"""Reading checkpoints: the one loader (memory-mapped, weights only) that resume, sample,
evaluate and export use, and what a folder of them holds."""

import os
import pickle
from pathlib import Path

import torch

from fineweb_gpt.errors import ConfigError, one_line
from fineweb_gpt.model import GPT, GPTConfig
from fineweb_gpt.run.names import CHECKPOINTS
from fineweb_gpt.safe_files import is_regular_file, kind_of, regular_file
from fineweb_gpt.tokenizer import GPT2_RANKS_SHA256


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint's contents on the CPU, memory-mapped (weights are not read until used)."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def checkpoint_step(path: Path) -> tuple[int | None, str | None]:
    """(its optimizer step, None) if the checkpoint loads, else (None, why not)."""
    try:
        checkpoint = read_checkpoint(path)
        if "state_dict" not in checkpoint or "global_step" not in checkpoint:
            return None, "not a training checkpoint"
        return int(checkpoint["global_step"]), None
    except Exception as err:  # every way a file can be damaged or unreadable
        return None, why_unreadable(path, err)


def saved_checkpoints(folder: Path) -> tuple[dict[str, int], dict[str, str]]:
    """The folder's checkpoints: {path: step} of those that load, {path: why} of those that do not.
    last.ckpt counts as its target; a link that leads nowhere or out of the folder does not load."""
    loadable, damaged = {}, {}
    folder = Path(folder)
    for path in sorted(folder.glob("*.ckpt")):
        if path.is_symlink():
            target = Path(os.path.realpath(path))
            if not target.exists():
                damaged[str(path)] = f"links to {os.readlink(path)}, which is missing"
            elif target.parent != folder.resolve():
                damaged[str(path)] = f"links outside the folder, to {os.readlink(path)}"
            continue  # a link inside the folder: its target is read as itself
        if not is_regular_file(path):  # a named pipe would make the loader wait for ever
            damaged[str(path)] = f"not a regular file ({kind_of(os.stat(path).st_mode)})"
            continue
        step, problem = checkpoint_step(path)
        if problem is None:
            loadable[str(path)] = step
        else:
            damaged[str(path)] = problem
    return loadable, damaged


ZIP_START = b"PK\x03\x04"  # torch.save writes a zip archive


def why_unreadable(path: Path, err: Exception) -> str:
    """Why torch.load refused a file, in a few words; never torch's advice to load it with
    weights_only=False, which would run whatever code the file holds."""
    with open(path, "rb") as file:
        if file.read(4) != ZIP_START:
            return "not a checkpoint (not a file torch.save writes)"
    if isinstance(err, pickle.UnpicklingError):
        return "not a checkpoint (it holds objects other than tensors and plain values)"
    return f"damaged ({one_line(err, limit=200).split('. ')[0]})"


def checkpoint_file(path: str | Path) -> Path:
    """`path` if it is a file, else a one-line ConfigError that says what is there instead: a run
    folder (and its checkpoint), a folder without checkpoints, nothing."""
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():  # a named pipe or a device is said to be one
            return regular_file(path, "give a .ckpt from training", name=f"ckpt={path}")
        if path.is_dir():
            last = path / CHECKPOINTS / "last.ckpt"
            hint = f"ckpt={last}" if last.is_file() else "a checkpoint such as <run folder>/checkpoints/last.ckpt"
            raise ConfigError(f"ckpt={path} is a folder; give {hint}")
        folder = path.parent
        found = sorted(p.name for p in folder.glob("*.ckpt")) if folder.is_dir() else []
    except OSError as err:  # a name too long for the filesystem, a folder we may not enter, ...
        raise ConfigError(f"ckpt={path} cannot be read ({err.strerror}); give a .ckpt from training") from err
    if found:
        raise ConfigError(f"ckpt={path} does not exist; {folder} holds {', '.join(found[:4])}")
    where = "holds none" if folder.is_dir() else "is missing"
    raise ConfigError(
        f"ckpt={path} does not exist: no checkpoint here, {folder} {where} (that run saved none); "
        "give a checkpoint of a run that saved one"
    )


def load_gpt(path: str | Path, device: str = "cpu") -> tuple[GPT, dict]:
    """The GPT saved in a fineweb_gpt checkpoint, in eval mode, and the checkpoint itself,
    after checking that it is whole, names the bundled tokenizer and holds finite weights."""
    path = checkpoint_file(path)
    try:
        checkpoint = read_checkpoint(path)
    except Exception as err:  # a damaged file fails inside the unpickler in many ways (IndexError, EOFError, ...)
        raise ConfigError(f"ckpt={path} is {why_unreadable(path, err)}; give a .ckpt from training") from err
    if not isinstance(checkpoint, dict) or "model_config" not in checkpoint.get("hyper_parameters", {}):
        raise ConfigError(f"ckpt={path} holds no model config; give a checkpoint written by fineweb_gpt.train")
    if "tokenizer" not in checkpoint:
        raise ConfigError(f"ckpt={path} does not name its tokenizer; use a checkpoint saved by fineweb_gpt.train")
    tokenizer_hash = checkpoint["tokenizer"].get("ranks_sha256")
    if tokenizer_hash != GPT2_RANKS_SHA256:
        raise ConfigError(
            f"ckpt={path} was trained with tokenizer ranks sha256 {tokenizer_hash}, not the bundled GPT-2 ranks "
            f"{GPT2_RANKS_SHA256}, so its token ids would decode to the wrong text; sample it with the code that "
            "trained it"
        )
    model = GPT(GPTConfig(**checkpoint["hyper_parameters"]["model_config"]))
    # The LightningModule holds the GPT as `model`, so its weights are saved under "model.".
    weights = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise ConfigError(
            f"ckpt={path} holds weights that do not fit its own model config ({str(err).splitlines()[0]}); "
            "give a checkpoint written by fineweb_gpt.train"
        ) from err
    damaged = next((name for name, w in weights.items() if not torch.isfinite(w).all()), None)
    if damaged:
        raise ConfigError(f"ckpt={path} holds non-finite weights (nan or inf in {damaged}); use an earlier checkpoint")
    return model.to(device).eval(), checkpoint
