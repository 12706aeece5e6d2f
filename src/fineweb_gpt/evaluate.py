"""fineweb-gpt-eval ckpt=PATH: a checkpoint's loss and perplexity on any data the trainer reads,
or its HellaSwag accuracy (task=hellaswag).

    fineweb-gpt-eval ckpt=outputs/2026-11-22/10-00-00/checkpoints/last.ckpt
    python -m fineweb_gpt.evaluate ckpt=... data=single_parquet data.path=/data/held_out.parquet split=all
    python -m fineweb_gpt.evaluate ckpt=... task=hellaswag [hellaswag.path=hellaswag_val.jsonl]

split=val (the default) scores the source's held-out documents exactly as training evaluates
them: the same windows, the same mean over them. So a run's checkpoint, scored on the run's
data config, gives the run's last val/loss. split=all scores every document of the source.
The model comes from the checkpoint alone; data.block_size is its context unless set.
The result is printed on one line and written as JSON beside the checkpoint (or to out=PATH).
task=hellaswag scores HellaSwag's validation set as build-nanogpt and llm.c do (evals/hellaswag.py).
"""

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from fineweb_gpt.command_line import run_hydra_command
from fineweb_gpt.config_files import build, hydra_choices
from fineweb_gpt.data.settings import check_source_keys
from fineweb_gpt.errors import ConfigError, OutOfMemory, UserError, exit_with
from fineweb_gpt.evals.hellaswag import HUB_REPO, load_examples, score_examples
from fineweb_gpt.model import GPT
from fineweb_gpt.run.checkpoint_files import checkpoint_file, load_gpt
from fineweb_gpt.safe_files import write_atomically

SPLITS = {"val": "held-out documents", "all": "every document"}
TASKS = ("loss", "hellaswag")


def check_options(cfg: DictConfig) -> tuple[str, Path]:
    """The command's own options, checked before anything is read: (device, where the JSON goes)."""
    if OmegaConf.is_missing(cfg, "ckpt"):
        raise ConfigError("ckpt is required: ckpt=outputs/<date>/<time>/checkpoints/last.ckpt")
    missing = [key for key in cfg.data if OmegaConf.is_missing(cfg.data, key)]
    if missing:
        raise ConfigError(f"data.{missing[0]} has no value; set it on the command line, e.g. data.path=/data/x.parquet")
    if cfg.task not in TASKS:
        raise ConfigError(f"task={cfg.task} is not one of loss (the data's loss), hellaswag")
    examples = cfg.hellaswag.examples
    if examples is not None and (isinstance(examples, bool) or not isinstance(examples, int) or examples < 1):
        raise ConfigError(f"hellaswag.examples={examples} must be a whole number of at least 1, or null for all")
    check_source_keys(cfg.data, hydra_choices().get("data"))
    if cfg.split not in SPLITS:
        raise ConfigError(f"split={cfg.split} is not one of val (held-out documents), all (every document)")
    if isinstance(cfg.batch_size, bool) or not isinstance(cfg.batch_size, int) or cfg.batch_size < 1:
        raise ConfigError(f"batch_size={cfg.batch_size} must be a whole number of at least 1, e.g. batch_size=8")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device={cfg.device} is not one of auto, cpu, cuda")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but this machine has no CUDA GPU; use device=cpu")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    ckpt = checkpoint_file(str(cfg.ckpt))  # before its folder is checked for the results
    suffix = "eval" if cfg.task == "loss" else cfg.task
    out = Path(str(cfg.out)) if cfg.out else ckpt.with_name(f"{ckpt.stem}.{suffix}.json")
    if not os.access(out.parent, os.W_OK):
        raise ConfigError(f"cannot write {out} (its folder is missing or read-only); give out=PATH")
    return device, out


def set_data_options(data: DictConfig, split: str, context: int) -> None:
    """The checkpoint's context as data.block_size unless the user set one; split=all holds out every document."""
    if OmegaConf.is_interpolation(data, "block_size"):  # ${model.block_size}: this command has no model group
        data.block_size = context
    block_size = data.block_size
    if isinstance(block_size, bool) or not isinstance(block_size, int) or not 1 <= block_size <= context:
        raise ConfigError(
            f"data.block_size={block_size} must be a whole number from 1 to the checkpoint's context, {context}; "
            "leave it out to use the context"
        )
    if split == "all":
        if "val_fraction" not in data:  # token shards keep their held-out tokens in shards of their own
            raise ConfigError(
                "split=all needs a source of documents (parquet or hf_stream); for token shards "
                "score their validation shards whole with split=val data.val_tokens=null"
            )
        data.val_fraction, data.val_tokens = 1.0, None


def describe_source(data: DictConfig) -> str:
    if data.get("bundled_sample"):
        return "the bundled sample"
    if data.get("hf_repo"):
        return f"{data.hf_repo}/{data.hf_files}"
    if data.get("dataset"):  # data=hf_stream
        name = f" ({data.name})" if data.get("name") else ""
        return f"{data.dataset}{name}, {data.get('data_files') or data.split}"
    paths = data.get("paths") or data.get("path")
    return ", ".join(map(str, paths)) if OmegaConf.is_list(paths) else str(paths)


@torch.no_grad()
def score(model: GPT, batches, device: str, batch_size: int) -> tuple[float, int, int]:
    """(mean loss over windows, windows, tokens per window) of (batch, block_size + 1) windows:
    each batch's mean weighted by its windows, as Lightning averages training's val/loss."""
    autocast = inference_context(device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    windows = block_size = 0
    try:
        with autocast:
            # disable=None: no bar where stderr is not a terminal (a log file would get every redraw).
            for batch in tqdm(batches, desc="scoring", unit="batch", file=sys.stderr, dynamic_ncols=True, disable=None):
                batch = batch.to(device, non_blocking=True)
                _, loss = model(batch[:, :-1], batch[:, 1:])
                loss_sum += loss.double() * batch.size(0)
                windows, block_size = windows + batch.size(0), batch.size(1) - 1
    except torch.cuda.OutOfMemoryError as err:
        raise OutOfMemory(f"CUDA out of memory at batch_size={batch_size}; use batch_size={batch_size // 2}") from err
    if windows == 0:
        raise ConfigError("the data gave no window to score; use more data or a smaller data.block_size")
    return float(loss_sum) / windows, windows, block_size


def inference_context(device: str):
    """bf16 autocast on CUDA (fp16 on GPUs without bf16), as training runs; fp32 on the CPU."""
    if device != "cuda":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)


def evaluate(cfg: DictConfig) -> tuple[dict, Path]:
    """Score cfg.ckpt on cfg.data (or HellaSwag): the results, and the JSON file they were written to."""
    device, out = check_options(cfg)
    examples = load_examples(cfg.hellaswag.path, cfg.hellaswag.examples) if cfg.task == "hellaswag" else None
    model, checkpoint = load_gpt(cfg.ckpt)
    step = checkpoint.get("global_step")
    del checkpoint  # optimizer state included: no need to hold it while scoring
    if device == "cuda":
        torch.set_float32_matmul_precision("high")  # as training does
    model.to(device)
    if examples is not None:
        return evaluate_hellaswag(cfg, model, examples, step, device, out)
    set_data_options(cfg.data, cfg.split, model.config.block_size)
    datamodule = build(cfg.data, micro_batch_size=cfg.batch_size)
    datamodule.prepare_data()
    datamodule.setup("validate")
    loss, windows, block_size = score(model, datamodule.val_dataloader(), device, cfg.batch_size)
    result = {
        "checkpoint": str(Path(cfg.ckpt).resolve()),
        "step": step,
        "split": cfg.split,
        "source": describe_source(cfg.data),
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),  # capped as the run's val/ppl is
        "tokens": windows * block_size,
        "windows": windows,
        "block_size": block_size,
        "device": device,
        "data": OmegaConf.to_container(cfg.data, resolve=True),
    }
    write_atomically(out, json.dumps(result, indent=2) + "\n")
    return result, out


def evaluate_hellaswag(cfg: DictConfig, model: GPT, examples: list, step, device: str, out: Path) -> tuple[dict, Path]:
    started = time.perf_counter()
    try:
        scores = score_examples(model, examples, cfg.batch_size, device, inference_context(device), progress=True)
    except torch.cuda.OutOfMemoryError as err:
        raise OutOfMemory(
            f"CUDA out of memory at batch_size={cfg.batch_size} examples; use batch_size={max(1, cfg.batch_size // 2)}"
        ) from err
    result = {
        "checkpoint": str(Path(cfg.ckpt).resolve()),
        "step": step,
        "task": "hellaswag",
        "source": str(Path(cfg.hellaswag.path).resolve()) if cfg.hellaswag.path else f"{HUB_REPO} (validation)",
        **scores.result(),
        "block_size": model.config.block_size,
        "seconds": time.perf_counter() - started,
        "device": device,
    }
    write_atomically(out, json.dumps(result, indent=2) + "\n")
    return result, out


def summary(result: dict, out: Path) -> str:
    if result.get("task") == "hellaswag":
        cut = (
            f", {result['contexts_cut']:,} contexts cut from the left to fit the block"
            if result["contexts_cut"]
            else ""
        )
        return (
            f"HellaSwag: acc {result['acc']:.4f}, acc_norm {result['acc_norm']:.4f}, {result['examples']:,} examples"
            f"{cut} in {result['seconds']:.1f} s (checkpoint step {result['step']}) -> {out}"
        )
    return (
        f"{SPLITS[result['split']]} of {result['source']}: loss {result['loss']:.4f}, perplexity "
        f"{result['perplexity']:.2f}, {result['tokens']:,} tokens in {result['windows']:,} windows of "
        f"{result['block_size']} (checkpoint step {result['step']}) -> {out}"
    )


def main(cfg: DictConfig) -> None:
    try:
        result, out = evaluate(cfg)
    except UserError as err:
        exit_with(err)
    print(summary(result, out))


def cli() -> None:
    """The console script and `python -m fineweb_gpt.evaluate`, from any folder."""
    run_hydra_command(main, "eval")


if __name__ == "__main__":
    cli()
