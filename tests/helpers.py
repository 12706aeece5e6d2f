"""What the tests share: the small-run overrides, a CLI runner, and callbacks that plant failures.

Tests and the training runs they start (`+callbacks.x._target_=helpers.BatchRecorder`) import
this module: run_cli starts `python -m fineweb_gpt.train` in the tests folder, so it is found.
"""

import fcntl
import hashlib
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import lightning as L
import torch

from fineweb_gpt.config_files import config_dir

CONF_DIR = config_dir()
TESTS_DIR = Path(__file__).resolve().parent

TERMINAL_COLUMNS = 120  # the width of run_in_terminal's terminal

# A model small enough to train for real in seconds on a CPU: 256 tokens per step in 2 micro-batches.
# Later overrides of the same key win, so a test adds what it needs after these.
SMALL = [
    "hw=cpu",
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=32",
    "hw.micro_batch_size=4",
    "total_batch_tokens=256",
    "data.val_tokens=256",
    "optim.warmup_steps=1",
]


def lightning_module(model_config: dict, optimizer: str = "adamw", **optim):
    """A GPTLightningModule with the optimizer's settings from conf/optim/<optimizer>.yaml, as a
    run gets them, and `optim` overriding some."""
    from fineweb_gpt.config_files import load_option
    from fineweb_gpt.lit_module import GPTLightningModule

    return GPTLightningModule(model_config=model_config, optim={**load_option("optim", optimizer), **optim})


def quiet_cpu_trainer(**kwargs) -> L.Trainer:
    """A Lightning Trainer on the CPU that writes nothing: no logs, checkpoints, bars or summary."""
    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return L.Trainer(accelerator="cpu", **quiet, **kwargs)


def cli_env(env: dict | None = None) -> dict:
    """The environment a test's command runs in: offline, unbuffered, the tests folder on the
    path (so callbacks from this module can be added with +callbacks.<name>._target_=helpers.X).
    An `env` value of None removes that variable."""
    pythonpath = os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH")) if p)
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": pythonpath,
        **(env or {}),
    }
    return {key: value for key, value in env.items() if value is not None}


def run_cli(
    *args: str, cwd: Path, timeout: int = 600, env: dict | None = None, own_process_group: bool = False
) -> subprocess.CompletedProcess:
    """Run `python -m fineweb_gpt.train ARGS` the way a user does, in cli_env(env).
    own_process_group: start it in a process group of its own, as a terminal or SLURM job step
    does, so that a signal to the group reaches it and its DataLoader workers, not the tests."""
    return subprocess.run(
        [sys.executable, "-m", "fineweb_gpt.train", *args],
        cwd=cwd,
        env=cli_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=own_process_group,
    )


def run_in_terminal(*args: str, cwd: Path, timeout: float = 600, module: str = "fineweb_gpt.train") -> tuple[int, str]:
    """Run `python -m MODULE ARGS` (by default the training command) with a terminal (TERMINAL_COLUMNS wide)
    as its stdin, stdout and stderr, as in tmux or an ssh session; returns (exit code, everything
    it wrote)."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 50, TERMINAL_COLUMNS, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=cli_env({"TERM": "xterm"}),
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
    )
    os.close(terminal)
    output, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([controller], [], [], 0.5)[0]:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # the terminal closed: the process and its children are gone
                break
            if not chunk:
                break
            output += chunk
        elif process.poll() is not None:
            break
    os.close(controller)
    return process.wait(timeout=max(1.0, deadline - time.monotonic())), output.decode(errors="replace")


class BatchRecorder(L.Callback):
    """Appends each trained micro-batch's step, checksum, token count and loss to a file per rank."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        digest = hashlib.sha1(batch.cpu().numpy().tobytes()).hexdigest()
        loss = float(outputs["loss"]) * trainer.accumulate_grad_batches  # Lightning divides it
        tokens = batch.shape[0] * (batch.shape[1] - 1)
        with open(f"{self.path}.rank{trainer.global_rank}", "a") as f:
            f.write(f"{trainer.global_step} {digest} {tokens} {loss!r}\n")


def recorded_batches(path) -> list[tuple[int, str, int, float]]:
    """(optimizer steps done after the micro-batch, checksum, tokens, loss) of every rank's file."""
    rows = []
    for file in sorted(Path(path).parent.glob(Path(path).name + ".rank*")):
        for line in file.read_text().splitlines():
            step, digest, tokens, loss = line.split()
            rows.append((int(step), digest, int(tokens), float(loss)))
    return rows


class SlowValidation(L.Callback):
    """Makes every validation batch take `seconds` longer."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_validation_batch_end(self, *args, **kwargs):
        time.sleep(self.seconds)


class PauseMidStep(L.Callback):
    """Makes the first micro-batch after `step` optimizer steps start `seconds` late: a slow
    moment part way through a gradient accumulation."""

    def __init__(self, step: int, seconds: float):
        self.step, self.seconds, self.paused = step, seconds, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and not self.paused:
            self.paused = True
            time.sleep(self.seconds)


class WaitForFile(L.Callback):
    """Holds the run before its first micro-batch until `path` exists (a test's cue)."""

    def __init__(self, path: str):
        self.path = path

    def on_train_start(self, trainer, pl_module):
        while not os.path.exists(self.path):
            time.sleep(0.1)


class PauseAfterRunStart:
    """A Hydra callback (+hydra.callbacks.pause._target_=helpers.PauseAfterRunStart): holds a
    single run once Hydra's run has started and its folder exists, before any of fineweb_gpt's
    checks, until `go` exists; touches `paused` when it starts waiting."""

    def __init__(self, paused: str, go: str):
        self.paused, self.go = paused, go

    def on_run_start(self, config, **kwargs) -> None:
        Path(self.paused).touch()
        while not os.path.exists(self.go):
            time.sleep(0.1)

    def __getattr__(self, name):  # Hydra's other callback hooks: nothing to do
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


class MidStepCollectives(L.Callback):
    """Counts, per rank, the collective calls (broadcast, all-reduce, barrier, ...) made while an
    optimizer step is part way through its gradient accumulation. Under NCCL each one makes the
    CPU wait for the GPU in the middle of the step. Writes the count to `path`.rank<N>."""

    NAMES = ("broadcast", "broadcast_object_list", "all_reduce", "all_gather", "all_gather_object", "barrier")

    def __init__(self, path: str):
        self.path, self.calls, self.mid_step = path, 0, False
        self.originals = {}

    def setup(self, trainer, pl_module, stage):
        import torch.distributed as dist

        for name in self.NAMES:
            self.originals[name] = original = getattr(dist, name)

            def counted(*args, _original=original, **kwargs):
                self.calls += self.mid_step
                return _original(*args, **kwargs)

            setattr(dist, name, counted)

    # Part way through a step: from a backward pass until the optimizer step that uses its gradients.
    def on_after_backward(self, trainer, pl_module):
        self.mid_step = True

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.mid_step = False

    def teardown(self, trainer, pl_module, stage):
        import torch.distributed as dist

        for name, original in self.originals.items():
            setattr(dist, name, original)
        Path(f"{self.path}.rank{trainer.global_rank}").write_text(str(self.calls))


class NoGPUWaitMidStep(L.Callback):
    """From optimizer step `after` on (compiling waits for the GPU while it tunes), makes any wait
    for the GPU between a backward pass and the optimizer step an error, through
    torch.cuda.set_sync_debug_mode. Writes how many backward passes it watched to `path`."""

    def __init__(self, path: str, after: int = 2):
        self.path, self.after, self.watched = path, after, 0

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step >= self.after:
            self.watched += 1
            torch.cuda.set_sync_debug_mode("error")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        torch.cuda.set_sync_debug_mode("default")

    def teardown(self, trainer, pl_module, stage):
        torch.cuda.set_sync_debug_mode("default")
        Path(self.path).write_text(str(self.watched))


class SignalAtStep(L.Callback):
    """Sends this process a signal once `step` optimizer steps are done (SIGKILL: a crash).

    first_micro_batch: send it after the first micro-batch of the next step instead, so
    the process dies half way through a gradient accumulation.
    times: send it that many times in a row (a second Ctrl-C).
    process_group: send it to the whole process group, DataLoader workers included, as SLURM
    and a terminal's Ctrl-C do.
    once_file: send it only if this file does not exist yet (and create it), so that a
    requeued job running the same command is not signalled again.
    """

    def __init__(
        self,
        step: int,
        signal_name: str = "SIGKILL",
        first_micro_batch: bool = False,
        times: int = 1,
        process_group: bool = False,
        once_file: str | None = None,
    ):
        self.step, self.signal_name, self.first_micro_batch = step, signal_name, first_micro_batch
        self.times, self.process_group, self.once_file = times, process_group, once_file
        self.sent = False
        self.micro_batches_after = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import signal

        if self.sent or trainer.global_step < self.step:
            return
        self.micro_batches_after += 1
        if self.first_micro_batch and self.micro_batches_after < 2:
            return
        self.sent = True
        if self.once_file:
            if Path(self.once_file).exists():
                return
            Path(self.once_file).touch()
        for _ in range(self.times):
            if self.process_group:
                os.killpg(os.getpgid(0), getattr(signal, self.signal_name))
            else:
                os.kill(os.getpid(), getattr(signal, self.signal_name))


class SignalDuringEvaluation(L.Callback):
    """Sends this process (or its process group) a signal part way through the evaluation of step
    `step` (0: the one before the first step), once: a kill -9 or a stop signal during an evaluation."""

    def __init__(self, step: int, signal_name: str = "SIGKILL", process_group: bool = False):
        self.step, self.signal_name, self.process_group, self.sent = step, signal_name, process_group, False

    def on_validation_batch_end(self, trainer, pl_module, *args, **kwargs):
        import signal

        if self.sent or trainer.global_step != self.step:
            return
        self.sent = True
        if self.process_group:
            os.killpg(os.getpgid(0), getattr(signal, self.signal_name))
        else:
            os.kill(os.getpid(), getattr(signal, self.signal_name))


class PoisonWeights(L.Callback):
    """Makes the loss non-finite from the step after `step`: a planted NaN."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.ln_final.weight.fill_(float("nan"))


class RunOutOfMemory(L.Callback):
    """Raises CUDA's out-of-memory error as a GPU would."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


class TornWrites(L.pytorch.plugins.TorchCheckpointIO):
    """A filesystem that writes in place: the `tear_at`-th checkpoint is cut in half and the process dies."""

    def __init__(self, tear_at: int):
        super().__init__()
        self.tear_at, self.saves = tear_at, 0

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        import io
        import signal

        self.saves += 1
        if self.saves < self.tear_at:
            return super().save_checkpoint(checkpoint, path, storage_options)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        Path(path).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        os.kill(os.getpid(), signal.SIGKILL)


class RecordPrecision(L.Callback):
    """Writes the precision Lightning trains in (its plugin's own setting) to `path`."""

    def __init__(self, path: str):
        self.path = path

    def on_train_start(self, trainer, pl_module):
        Path(self.path).write_text(f"{type(trainer.precision_plugin).__name__} {trainer.precision_plugin.precision}")
