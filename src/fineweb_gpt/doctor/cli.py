"""fineweb-gpt-doctor LOG_OR_RUN_FOLDER: what went right and wrong in a training run, and what to change.

    fineweb-gpt-doctor outputs/2026-11-22/10-00-00           # a fineweb_gpt run folder
    fineweb-gpt-doctor train.log --gpu rtx4070                # nanoGPT's console output
    fineweb-gpt-doctor log124M/main.log --tokens-per-step 524288 --model 124m   # llm.c
    fineweb-gpt-doctor --plan --model 124m --gpu-memory-gb 12 --tokens-per-step 524288

The format is told from the content (--format forces one). The report is printed and
written as markdown with its plot beside it: into a run folder you own as REPORT.md and
REPORT.png; for a log file, or a run folder you cannot write to, into the current folder as
<name>.doctor.md (or wherever --out says). Reports are never written through a link.
"""

import argparse
import os
import sys
from pathlib import Path

from fineweb_gpt.config_files import load_option
from fineweb_gpt.doctor.checks import diagnose
from fineweb_gpt.doctor.memory import plan_batch
from fineweb_gpt.doctor.plot import plot_losses
from fineweb_gpt.doctor.record import SOURCE_NAMES, RunRecord, sanitized
from fineweb_gpt.doctor.report import render_markdown, render_text
from fineweb_gpt.doctor.sources import FORMATS, read_run
from fineweb_gpt.errors import ConfigError, UserError, exit_with
from fineweb_gpt.flops import gpu_table, human_count, size_in_name
from fineweb_gpt.model_config import MODEL_KEYS, GPTConfig
from fineweb_gpt.safe_files import check_target, write_atomically

REPORT_NAME = "REPORT.md"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fineweb-gpt-doctor", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", nargs="?", type=Path, help="a run folder, a metrics CSV, or a training log")
    parser.add_argument("--nanogpt-log", type=Path, help="a nanoGPT console log (the same as SOURCE --format nanogpt)")
    parser.add_argument("--format", choices=FORMATS, help="read SOURCE as this format, not as its content says")
    parser.add_argument("--out", type=Path, help="where to write the markdown report (the plot goes beside it)")
    parser.add_argument("--log-x", action="store_true", help="plot tokens on a log scale")
    parser.add_argument("--gpu", help="the GPU the run was on, a hw profile name (nanoGPT's MFU assumes an A100)")
    parser.add_argument("--gpu-memory-gb", type=float, help="the GPU's memory, for the batch plan (default: the GPU's)")
    parser.add_argument("--train-tokens", type=int, help="unique tokens in the training data, if the run lacks it")
    parser.add_argument("--tokens-per-step", type=int, help="tokens per optimizer step, if the log lacks it")
    parser.add_argument("--params", help="the model's parameter count (124M, 40.56M), if the log lacks it")
    parser.add_argument("--model", help="the model preset the run matches (tiny, 40m, 124m): its shape and size")
    parser.add_argument("--max-steps", type=int, help="the run's planned optimizer steps, if the log lacks them")
    parser.add_argument("--plan", action="store_true", help="only plan micro-batch and accumulation for a GPU")
    parser.add_argument("--gpus", type=int, default=1, help="--plan: data-parallel GPUs")
    parser.add_argument("--compile", action="store_true", help="--plan: for compiled training (hw.compile=true)")
    args = parser.parse_args(argv)
    if args.nanogpt_log is not None:
        if args.source is not None:
            parser.error("give SOURCE or --nanogpt-log FILE, not both")
        args.source, args.format = args.nanogpt_log, "nanogpt"
    if not args.plan and args.source is None:
        parser.error("give a run folder or a training log (or --plan)")
    return args


def gpu_named(name: str):
    if name not in gpu_table():
        raise ConfigError(f"--gpu {name} is not a hw profile with a GPU; choose one of {', '.join(gpu_table())}")
    return gpu_table()[name]


def apply_options(run: RunRecord, args: argparse.Namespace) -> RunRecord:
    """What the user knows that the run's files may not say."""
    summary = dict(run.summary)
    if args.gpu is not None:
        gpu = gpu_named(args.gpu)
        # Logged MFU stays measured against the old peak; peak_flops is the real GPU's.
        summary["mfu_peak_flops"] = summary.get("mfu_peak_flops") or summary.get("peak_flops")
        summary.update(hw_name=gpu.name, peak_flops=gpu.peak_flops)
    if args.gpu_memory_gb is not None:
        summary["gpu_memory_gb"] = args.gpu_memory_gb
    if args.train_tokens is not None:
        summary.update(unique_train_tokens=args.train_tokens, unique_train_tokens_estimated=False)
    if args.model is not None:
        model = GPTConfig(**load_option("model", args.model)).to_dict()
        summary.update({key: model[key] for key in MODEL_KEYS if key != "dropout"})
        summary.setdefault("model_name", args.model)
        summary["num_params"] = None  # counted from the preset's shape
    if args.params is not None:
        count = size_in_name(args.params) or (float(args.params) if args.params.replace(".", "", 1).isdigit() else None)
        if not count:
            raise ConfigError(f"--params {args.params} is not a parameter count; give one like 124M or 40560000")
        summary["num_params"] = count
    if args.tokens_per_step is not None:
        summary["tokens_per_step"] = args.tokens_per_step
    if args.max_steps is not None:
        summary.update(max_steps=args.max_steps, plan_source="--max-steps")
    return RunRecord(sanitized(summary), run.rows)


def report_path(args: argparse.Namespace) -> tuple[Path, str]:
    """(the report's path, a note on where it went): beside a run folder's files when the user
    owns the folder, otherwise in the current folder, never silently next to someone else's files."""
    if args.out is not None:
        return args.out, ""
    source = args.source
    if source.is_dir():
        writable = os.access(source, os.W_OK) and source.stat().st_uid == os.getuid()
        if writable:
            return source / REPORT_NAME, ""
        name = Path.cwd() / f"{source.resolve().name or 'run'}.doctor.md"
        return name, f" (written here: {source} is not a folder of yours)"
    return Path.cwd() / f"{source.stem or 'log'}.doctor.md", ""


def run_plan(args: argparse.Namespace) -> None:
    memory_gb = args.gpu_memory_gb or (gpu_named(args.gpu).memory_gb if args.gpu else None)
    if memory_gb is None:
        raise ConfigError("--plan needs the GPU's memory: --gpu-memory-gb 12 (or --gpu rtx4070)")
    name, tokens_per_step = args.model or "124m", args.tokens_per_step or 524288
    model = GPTConfig(**load_option("model", name))
    plan = plan_batch(model, memory_gb, tokens_per_step, args.gpus, args.compile)
    compile_flag = " hw.compile=true" if args.compile else ""
    print(f"model={name}: {plan.describe()}")
    print(f"fineweb_gpt: hw.micro_batch_size={plan.micro_batch} total_batch_tokens={tokens_per_step}{compile_flag}")
    print(f"nanoGPT: --batch_size={plan.micro_batch} --gradient_accumulation_steps={plan.grad_accum * args.gpus}")
    if not args.compile:
        compiled = plan_batch(model, memory_gb, tokens_per_step, args.gpus, True)
        print(
            f"compiled (hw.compile=true): micro-batch {compiled.micro_batch} x gradient accumulation "
            f"{compiled.grad_accum}, about {compiled.memory.describe()}"
        )


def plot_title(run: RunRecord, source: Path) -> str:
    """`outputs/2026-11-22/10-00-00: tiny, 7.23M parameters`: which run, which model."""
    model = [str(run.get("model_name"))] if run.get("model_name") else []
    if run.num_params:
        model.append(f"{human_count(run.num_params)} parameters")
    return f"{source}: {', '.join(model)}" if model else str(source)


def run_doctor(args: argparse.Namespace) -> None:
    run = apply_options(read_run(args.source, args.format), args)
    findings = diagnose(run)
    report, where = report_path(args)
    folder = report.parent
    folder.mkdir(parents=True, exist_ok=True)
    plot_name = report.with_suffix(".png").name
    title = f"{SOURCE_NAMES.get(run.source, run.source)} {args.source}"
    markdown = render_markdown(title, run, findings, plot_name)
    for name in (report.name, plot_name):  # refuse before writing either
        check_target(folder, name)
    write_atomically(folder / plot_name, plot_losses(run, args.log_x, plot_title(run, args.source)))
    write_atomically(folder / report.name, markdown + "\n")
    print(render_text(title, run, findings) if sys.stdout.isatty() else markdown)
    print(f"Report: {report}{where}\nPlot: {folder / plot_name}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run_plan(args) if args.plan else run_doctor(args)
    except UserError as err:
        exit_with(err)
    return 0
