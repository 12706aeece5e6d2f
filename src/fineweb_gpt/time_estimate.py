"""How long a run will take on this machine, said before it trains, and the evaluation sized to it.

The plan knows the FLOPs of a step (6N + 12 L H Q T per token, flops.py) and of an evaluation
(the forward pass alone: a third of that per token); a matrix multiply shaped like the model's
head, timed on the run's device in its precision, gives this machine's rate. Training reaches
0.4 to 1 times that rate (measured on a 2-core CPU for the tiny, 40m and 124m models; attention,
the elementwise work and the optimizer run slower, small models' multiplies too), so the
estimate is the FLOPs at TRAINING_EFFICIENCY of the measured rate: good to within a factor of
two, which is what "this run takes days" needs. The first steps' measurement (StepMetrics)
replaces it once the run trains.

On the CPU, where runs are short and slow, the default validation size (a data source's
data.val_tokens, unless the command sets it) shrinks so that a run's evaluations take about a
tenth of its time.
"""

import time

from fineweb_gpt.config_files import group_options, load_option, set_on_command_line

CPU_EVALUATION_SHARE = 0.1  # of the run's time, that evaluations take on the CPU by default
EVALUATION_FLOPS = 1 / 3  # per token, of training's: the forward pass alone (2N + 4 L H Q T)
TRAINING_EFFICIENCY = 0.7  # of the head-shaped multiply's rate, that training reaches (0.4 to 1 measured)
DAYS_WORTH_WARNING = 24 * 3600  # seconds: a run longer than this is warned about before it starts
MEASURING_SECONDS = 0.05  # the shortest multiply that is timed; the measurement takes a few of them


def evaluation_count(max_steps: int, val_every_steps: int) -> int:
    """Evaluations of a fresh run: before its first step, every val_every_steps, and at its last."""
    return 1 + max_steps // val_every_steps + (1 if max_steps % val_every_steps else 0)


def tokens_for_share(share: float, planned_tokens: int, evaluations: int) -> int:
    """Validation tokens per evaluation that make `evaluations` of them `share` of the run's time."""
    return int(share / (1 - share) / EVALUATION_FLOPS * planned_tokens / evaluations)


def evaluation_plan(cfg, data_option: str | None, max_steps: int, tokens_per_step: int, cpu: bool) -> dict:
    """How many evaluations a fresh run makes, and data.val_tokens as it will use it. A value the
    command line sets (or that differs from the source's) is kept; the data source's default (its
    conf/data file's) is lowered on the CPU to about a tenth of the run's time, never below one
    window."""
    data = cfg.data
    evaluations = evaluation_count(max_steps, cfg.val_every_steps)
    planned_tokens = max_steps * tokens_per_step
    asked = data.get("val_tokens")
    default = (
        data_option in group_options("data")
        and load_option("data", data_option).get("val_tokens") == asked
        and not set_on_command_line("data.val_tokens")
    )
    val_tokens = asked
    if cpu and default:
        share_cap = max(data.block_size, tokens_for_share(CPU_EVALUATION_SHARE, planned_tokens, evaluations))
        val_tokens = share_cap if asked is None else min(asked, share_cap)
    return {"evaluations": evaluations, "val_tokens": val_tokens, "val_tokens_asked": asked}


def interval_for_share(max_steps: int, evaluations_allowed: int) -> int | None:
    """The smallest val_every_steps that makes at most `evaluations_allowed` evaluations; None when
    even the two that always happen (before the first step, after the last) are too many."""
    if evaluations_allowed < 2:
        return None
    interval = max(1, -(-max_steps // (evaluations_allowed - 1)))
    while evaluation_count(max_steps, interval) > evaluations_allowed:
        interval += 1
    return interval


# --- the machine's rate ----------------------------------------------------------------------


def matmul_rate(device, width: int, vocab_size: int, dtype) -> float:
    """FLOPS of (rows x width) @ (width x vocab_size) on `device` in `dtype`, the shape of the
    model's head: 256 rows on a CPU (a fraction of a second even for 124m), 4096 on a GPU, the
    multiply repeated until it has run MEASURING_SECONDS; the better of two such timings."""
    import torch

    rows = 4096 if device.type == "cuda" else 256
    rate = 2 * rows * width * vocab_size / seconds_per_multiply(device, rows, width, vocab_size, dtype)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the multiply's memory goes back before the model arrives
    return rate


def seconds_per_multiply(device, rows: int, width: int, columns: int, dtype) -> float:
    import torch

    a = torch.randn(rows, width, device=device, dtype=dtype)
    b = torch.randn(width, columns, device=device, dtype=dtype)
    a @ b  # the first call pays for the library's set-up

    def timed(repeats: int) -> float:
        synchronize(device)
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        synchronize(device)
        return (time.perf_counter() - started) / repeats

    repeats, seconds = 1, timed(1)
    while seconds * repeats < MEASURING_SECONDS:
        repeats *= 2
        seconds = timed(repeats)
    return min(seconds, timed(repeats))  # a busy machine's hiccup is not its rate


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def precision_dtype(precision: str):
    import torch

    if "bf16" in str(precision):
        return torch.bfloat16
    if str(precision).startswith("16"):
        return torch.float16
    return torch.float32


def run_time(plan: dict, matmul_flops: float, val_tokens_scored: int) -> dict:
    """Seconds a step, an evaluation and the whole run (steps and evaluations) should take, from
    the plan's FLOPs at the measured rate; each process trains its share of a step."""
    rate = matmul_flops * TRAINING_EFFICIENCY
    step = plan["flops_per_token"] * plan["tokens_per_step"] / plan["world_size"] / rate
    evaluation = plan["flops_per_token"] * EVALUATION_FLOPS * val_tokens_scored / plan["world_size"] / rate
    return {
        "measured_matmul_flops": matmul_flops,
        "estimated_step_seconds": step,
        "estimated_evaluation_seconds": evaluation,
        "estimated_run_seconds": plan["max_steps"] * step + plan["evaluations"] * evaluation,
    }


def describe_seconds(seconds: float) -> str:
    """3 s, 4 min, 2.5 h, 196 days: a person's unit."""
    if seconds < 90:
        return f"{seconds:.2g} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:,.0f} days"
