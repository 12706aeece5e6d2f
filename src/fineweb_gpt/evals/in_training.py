"""HellaSwag during training: scored every eval.hellaswag_every_steps optimizer steps and at the last
step, with a few samples from a fixed prompt beside it (build-nanogpt does both).

It runs at the end of the step's last micro-batch, after the run monitor has timed the step, so its
time stays out of perf/step_time_ms, as validation's does. Under DDP rank r scores examples r,
r + world_size, ... and the counts are summed across ranks. It scores and samples with the plain
model, never the compiled one (the weights are the same): a compiled model recompiles for every
new batch shape, and build-nanogpt turned compile off because it broke both.
"""

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch

from fineweb_gpt.errors import ConfigError
from fineweb_gpt.evals.hellaswag import Scores, load_examples, rank_share, score_examples
from fineweb_gpt.run.names import SAMPLES_FILE
from fineweb_gpt.safe_files import write_atomically
from fineweb_gpt.tokenizer import END_OF_TEXT_ID, gpt2_tokenizer

log = logging.getLogger("fineweb_gpt")
AUTO_INTERVAL = 1000  # eval.hellaswag_every_steps=auto on a GPU for a GPT-2-sized model
AUTO_MIN_PARAMS = 100e6  # below this, a model scores about chance for most of its run


def hellaswag_interval(setting, num_params: int, on_gpu: bool, sharded: bool) -> int | None:
    """eval.hellaswag_every_steps as the run uses it: a number, null (never), or auto: every 1000
    steps for a model of 100M parameters or more on a GPU (124m), else never."""
    if setting == "auto":
        return AUTO_INTERVAL if on_gpu and num_params >= AUTO_MIN_PARAMS and not sharded else None
    if setting is not None and sharded:
        raise ConfigError(
            f"eval.hellaswag_every_steps={setting} does not work with trainer=fsdp yet (each rank would run a "
            "different number of forward passes); use eval.hellaswag_every_steps=null and score the final "
            "checkpoint with fineweb-gpt-eval task=hellaswag"
        )
    return setting


class HellaSwagCallback(L.Callback):
    """Scores HellaSwag at every `every_steps`-th optimizer step and the last one; logs
    eval/hellaswag_acc, _acc_norm, _examples and _time_ms to every logger, with data/tokens_seen."""

    def __init__(
        self,
        every_steps: int,
        path: str | None = None,
        examples: int | None = None,
        batch_size: int = 8,
        tokens_seen: Callable[[], int] = lambda: 0,
        run_dir: str | None = None,
        samples: int = 4,
        sample_prompt: str = "Hello, I'm a language model,",
        sample_tokens: int = 32,
    ):
        self.every_steps, self.path, self.limit, self.batch_size = every_steps, path, examples, batch_size
        self.tokens_seen = tokens_seen  # the run monitor's count, for the row's x-axis
        self.run_dir = Path(run_dir) if run_dir else None
        self.samples, self.sample_prompt, self.sample_tokens = samples, sample_prompt, sample_tokens
        self.examples = None
        self.last_step: int | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.examples is None:
            self.examples = load_examples(self.path, self.limit)

    def on_train_start(self, trainer, pl_module) -> None:
        self.last_step = trainer.global_step  # a resumed run starts part way

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self.last_step:  # still accumulating
            return
        self.last_step = step
        if step % self.every_steps == 0 or 0 < trainer.max_steps <= step:
            self.evaluate(trainer, pl_module, step)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> Scores:
        model, was_training = pl_module.model, pl_module.model.training
        started = time.perf_counter()
        model.eval()
        try:
            share = rank_share(len(self.examples), trainer.global_rank, trainer.world_size)
            context = trainer.precision_plugin.forward_context()
            mine = score_examples(model, self.examples, self.batch_size, pl_module.device, context, indices=share)
            counts = torch.tensor(mine.counts(), dtype=torch.long, device=pl_module.device)
            scores = Scores.from_counts(trainer.strategy.reduce(counts, reduce_op="sum").tolist())
            texts = self.generate(trainer, model, pl_module.device) if trainer.is_global_zero else []
        finally:
            model.train(was_training)
        seconds = time.perf_counter() - started
        metrics = {
            "eval/hellaswag_acc": scores.acc,
            "eval/hellaswag_acc_norm": scores.acc_norm,
            "eval/hellaswag_examples": scores.examples,
            "eval/hellaswag_time_ms": 1000 * seconds,
            "data/tokens_seen": self.tokens_seen(),
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        if trainer.is_global_zero:
            cut = f", {scores.cut:,} contexts cut to fit the block" if scores.cut else ""
            log.info(
                "step %d/%d: HellaSwag acc_norm %.4f (acc %.4f), %s examples%s, %.1f s",
                step,
                trainer.max_steps,
                scores.acc_norm,
                scores.acc,
                f"{scores.examples:,}",
                cut,
                seconds,
            )
            self.record_samples(trainer, step, texts)
        return scores

    @torch.no_grad()
    def generate(self, trainer: L.Trainer, model, device) -> list[str]:
        """`samples` continuations of the fixed prompt, from the same seed at every evaluation."""
        if not self.samples:
            return []
        tokenizer = gpt2_tokenizer()
        # An empty prompt starts a fresh document, as fineweb-gpt-sample does.
        prompt = tokenizer.encode_ordinary(self.sample_prompt)[-(model.config.block_size - 1) :] or [END_OF_TEXT_ID]
        idx = torch.tensor([prompt] * self.samples, dtype=torch.long, device=device)
        generator = torch.Generator(device=device).manual_seed(42)
        tokens = min(self.sample_tokens, model.config.block_size - len(prompt))
        with trainer.precision_plugin.forward_context():
            out = model.generate(idx, tokens, temperature=1.0, top_k=50, generator=generator)
        return [tokenizer.decode(row.tolist()) for row in out]

    def record_samples(self, trainer: L.Trainer, step: int, texts: list[str]) -> None:
        """Appended to <run folder>/samples.jsonl, and a table in W&B."""
        if not texts:
            return
        if self.run_dir:
            path = self.run_dir / SAMPLES_FILE
            earlier = path.read_text(encoding="utf-8") if path.is_file() else ""  # a few kB: rewritten whole
            lines = [json.dumps({"step": step, "sample": i, "text": text}) + "\n" for i, text in enumerate(texts)]
            write_atomically(path, earlier + "".join(lines))
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.log_text(
                    key="samples",
                    columns=["step", "sample", "text"],
                    data=[[step, i, t] for i, t in enumerate(texts)],
                    step=step,
                )


def hellaswag_callbacks(settings, every_steps: int | None, run_dir: str, metrics) -> list[HellaSwagCallback]:
    """The HellaSwag callback for the config's eval group, if the plan scores it; its examples are
    read (or downloaded) now, so that a missing file is refused before training starts."""
    if not every_steps:
        return []
    callback = HellaSwagCallback(
        every_steps,
        path=settings.hellaswag_path,
        examples=settings.hellaswag_examples,
        batch_size=settings.hellaswag_batch_size,
        tokens_seen=lambda: metrics.tokens_seen,
        run_dir=run_dir,
        samples=settings.samples,
        sample_prompt=settings.sample_prompt,
        sample_tokens=settings.sample_tokens,
    )
    callback.examples = load_examples(callback.path, callback.limit)
    log.info("HellaSwag: %s examples every %d steps and at the last", f"{len(callback.examples):,}", every_steps)
    return [callback]
