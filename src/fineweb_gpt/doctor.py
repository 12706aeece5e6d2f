"""python -m fineweb_gpt.doctor RUN_DIR: what went right and wrong in a training run, and what to change.

    python -m fineweb_gpt.doctor outputs/2026-11-22/10-00-00
    python -m fineweb_gpt.doctor --nanogpt-log train.log --gpu rtx4070
    python -m fineweb_gpt.doctor --plan --model 124m --gpu-memory-gb 12 --tokens-per-step 524288

It prints a report, writes it as markdown (RUN_DIR/REPORT.md, or next to the log, or --out)
and plots train and val loss against tokens, with the learning rate, beside it.
"""

import argparse
import csv
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from fineweb_gpt.config_files import load_option
from fineweb_gpt.diagnose import Finding, RunRecord, diagnose, human_count, parse_nanogpt_log, plan_batch
from fineweb_gpt.errors import ConfigError
from fineweb_gpt.flops import gpu_table
from fineweb_gpt.run_folder import read_metrics


def summary_from_hydra_config(run_dir: Path) -> dict:
    """The summary keys a run folder's .hydra/config.yaml can give, for runs without run_summary.json."""
    cfg = OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml"))  # interpolations stay text
    model, optim, hw = cfg.get("model", {}), cfg.get("optim", {}), cfg.get("hw", {})
    max_steps = cfg.get("trainer", {}).get("max_steps")
    model_keys = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "dropout", "bias")
    summary = {
        **{key: model.get(key) for key in model_keys},
        **{key: optim.get(key) for key in ("lr", "min_lr", "warmup_steps", "weight_decay")},
        "micro_batch_size": hw.get("micro_batch_size"),
        "peak_flops": hw.get("peak_flops"),
        "tokens_per_step": cfg.get("total_batch_tokens"),
        "max_steps": max_steps if isinstance(max_steps, int) and max_steps > 0 else None,
    }
    hydra_file = run_dir / ".hydra" / "hydra.yaml"
    if hydra_file.is_file():
        summary["model_name"] = OmegaConf.load(hydra_file).hydra.runtime.choices.get("model")
    return summary


def read_run_folder(run_dir: Path) -> RunRecord:
    if not run_dir.is_dir():
        raise ConfigError(f"run folder {run_dir} does not exist; give the run folder fineweb_gpt.train printed")
    metrics = run_dir / "csv" / "metrics.csv"
    if not metrics.is_file():
        raise ConfigError(
            f"{run_dir} has no csv/metrics.csv; give a run folder written by fineweb_gpt.train with logger=csv "
            "(or a nanoGPT log with --nanogpt-log)"
        )
    summary_file = run_dir / "run_summary.json"
    if summary_file.is_file():
        try:
            summary = json.loads(summary_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{summary_file} is not valid JSON ({err}); restore it or delete it") from err
    elif (run_dir / ".hydra" / "config.yaml").is_file():
        try:
            summary = summary_from_hydra_config(run_dir)
        except Exception as err:  # YAML and OmegaConf raise many kinds for a damaged file
            raise ConfigError(f"{run_dir / '.hydra'} holds a config that cannot be read ({err})") from err
    else:
        raise ConfigError(f"{run_dir} has neither run_summary.json nor .hydra/config.yaml; give the whole run folder")
    try:
        rows = read_metrics(metrics)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ConfigError(f"{metrics} cannot be read as CSV ({err}); give the CSVLogger's metrics.csv") from err
    if not any("train/loss" in row or "val/loss" in row for row in rows):
        raise ConfigError(f"{metrics} holds no train/loss or val/loss values yet; wait for the first logged step")
    return RunRecord({"source": "fineweb_gpt", **summary}, rows)


def read_nanogpt_log(path: Path) -> RunRecord:
    try:
        text = path.read_text(errors="replace")
    except OSError as err:
        raise ConfigError(
            f"nanoGPT log {path} cannot be read ({err.strerror}); give the file holding its console output"
        ) from err
    return parse_nanogpt_log(text, str(path))


def apply_options(run: RunRecord, gpu: str | None, gpu_memory_gb: float | None, train_tokens: int | None) -> None:
    """What the user knows that the run's files may not say."""
    if gpu is not None:
        # MFU columns stay measured against the old peak (nanoGPT: an A100); peak_flops is the real GPU.
        run.summary["mfu_peak_flops"] = run.get("mfu_peak_flops") or run.get("peak_flops")
        run.summary.update(hw_name=gpu, peak_flops=gpu_table()[gpu].peak_flops)
    if gpu_memory_gb is not None:
        run.summary["gpu_memory_gb"] = gpu_memory_gb
    if train_tokens is not None:
        run.summary.update(unique_train_tokens=train_tokens, unique_train_tokens_estimated=False)


def describe_run(run: RunRecord) -> list[str]:
    """The facts a report starts with, as markdown table rows."""
    lines = []
    if run.num_params:
        shape = ", ".join(f"{k}={run.get(k)}" for k in ("n_layer", "n_head", "n_embd", "block_size") if run.get(k))
        lines.append(f"| model | {run.get('model_name', '?')}: {human_count(run.num_params)} parameters ({shape}) |")
    steps = max((int(row["step"]) for row in run.rows if "step" in row), default=0)
    lines.append(f"| trained | {steps:,} steps, {human_count(run.tokens_seen)} tokens |")
    val = run.points("val/loss")
    if val:
        last, best = val[-1], min(val, key=lambda p: p.value)
        lowest = f"lowest {best.value:.4f} at step {best.step}"
        lines.append(f"| val loss | {last.value:.4f} at step {last.step} ({lowest}) |")
    hardware = " ".join(str(run.get(key)) for key in ("hw_name", "device_name") if run.get(key))
    if hardware:
        lines.append(f"| hardware | {hardware} |")
    return lines


def render_finding(finding: Finding) -> list[str]:
    lines = [f"### {finding.title}", "", finding.evidence + "."]
    if finding.fix:
        lines += ["", f"**{'Fix' if finding.problem else 'Next'}:** {finding.fix}."]
    return lines + [""]


def render_markdown(title: str, run: RunRecord, findings: list[Finding], plot_name: str) -> str:
    problems = [f for f in findings if f.problem]
    notes = [f for f in findings if not f.problem]
    out = [f"# Run doctor: {title}", "", "| | |", "|---|---|", *describe_run(run), ""]
    out += [f"![train and val loss against tokens, learning rate on the right axis]({plot_name})", ""]
    out += [f"## Problems ({len(problems)})" if problems else "## No problems found", ""]
    out += [line for finding in problems for line in render_finding(finding)]
    if notes:
        out += ["## Notes", ""] + [line for finding in notes for line in render_finding(finding)]
    return "\n".join(out)


def plot_losses(run: RunRecord, path: Path, log_x: bool) -> None:
    """Train and val loss against tokens seen, the learning rate on a second axis."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    figure = Figure(figsize=(9, 5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    # A log axis cannot show the evaluation before training, at 0 tokens.
    train, val, lr = (
        [p for p in run.points(c) if p.tokens > 0 or not log_x] for c in ("train/loss", "val/loss", "train/lr")
    )
    lines = axes.plot([p.tokens for p in train], [p.value for p in train], lw=1, alpha=0.6, label="train loss")
    lines += axes.plot([p.tokens for p in val], [p.value for p in val], "o-", ms=3, label="val loss")
    axes.set_xlabel("tokens seen")
    axes.set_ylabel("loss (nats per token)")
    axes.xaxis.set_major_formatter(EngFormatter())
    if log_x:
        axes.set_xscale("log")
    else:
        # On a linear axis the first steps' drop from ~10.8 would flatten the rest of the curve.
        later = [p.value for p in train + val if p.tokens >= 0.1 * run.tokens_seen]
        if later:
            low, high = min(later), max(later)
            axes.set_ylim(low - 0.1 * (high - low) - 0.01, high + 0.5 * (high - low) + 0.01)
    if lr:
        lr_axes = axes.twinx()
        lines += lr_axes.plot([p.tokens for p in lr], [p.value for p in lr], "--", color="gray", label="learning rate")
        lr_axes.set_ylabel("learning rate")
    axes.legend(lines, [line.get_label() for line in lines], loc="upper right")
    axes.grid(alpha=0.3)
    figure.savefig(path, dpi=120)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fineweb_gpt.doctor", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", nargs="?", type=Path, help="a run folder written by fineweb_gpt.train")
    parser.add_argument("--nanogpt-log", type=Path, help="a nanoGPT console log instead of a run folder")
    parser.add_argument("--out", type=Path, help="where to write the markdown report (the plot goes beside it)")
    parser.add_argument("--log-x", action="store_true", help="plot tokens on a log scale")
    parser.add_argument(
        "--gpu", choices=sorted(gpu_table()), help="the GPU the run was on (nanoGPT's MFU assumes an A100)"
    )
    parser.add_argument("--gpu-memory-gb", type=float, help="GPU memory for the batch plan (default: the GPU's)")
    parser.add_argument("--train-tokens", type=int, help="unique tokens in the training data, if the run lacks it")
    parser.add_argument("--plan", action="store_true", help="only plan micro-batch and accumulation")
    parser.add_argument("--model", default="124m", help="--plan: a model preset (tiny, 40m, 124m)")
    parser.add_argument("--tokens-per-step", type=int, default=524288, help="--plan: tokens per optimizer step")
    parser.add_argument("--gpus", type=int, default=1, help="--plan: data-parallel GPUs")
    args = parser.parse_args(argv)
    if not args.plan and (args.run_dir is None) == (args.nanogpt_log is None):
        parser.error("give either RUN_DIR or --nanogpt-log FILE (or --plan)")
    return args


def run_plan(args: argparse.Namespace) -> None:
    memory_gb = args.gpu_memory_gb or (gpu_table()[args.gpu].memory_gb if args.gpu else None)
    if memory_gb is None:
        raise ConfigError("--plan needs the GPU's memory: --gpu-memory-gb 12 (or --gpu rtx4070)")
    model = load_option("model", args.model)
    plan = plan_batch(
        model["n_layer"],
        model["n_embd"],
        model["block_size"],
        memory_gb,
        args.tokens_per_step,
        model["vocab_size"],
        args.gpus,
        model["bias"],
    )
    print(f"model={args.model}: {plan.describe()}")
    print(f"fineweb_gpt: hw.micro_batch_size={plan.micro_batch} total_batch_tokens={args.tokens_per_step}")
    print(f"nanoGPT: --batch_size={plan.micro_batch} --gradient_accumulation_steps={plan.grad_accum * args.gpus}")


def run_doctor(args: argparse.Namespace) -> None:
    if args.nanogpt_log is not None:
        run, title = read_nanogpt_log(args.nanogpt_log), f"nanoGPT log {args.nanogpt_log}"
        report = args.out or args.nanogpt_log.parent / "REPORT.md"
    else:
        run, title = read_run_folder(args.run_dir), f"run {args.run_dir}"
        report = args.out or args.run_dir / "REPORT.md"
    apply_options(run, args.gpu, args.gpu_memory_gb, args.train_tokens)
    findings = diagnose(run)
    plot = report.with_suffix(".png")
    report.parent.mkdir(parents=True, exist_ok=True)
    plot_losses(run, plot, args.log_x)
    markdown = render_markdown(title, run, findings, plot.name)
    report.write_text(markdown)
    print(markdown)
    print(f"Report: {report}\nPlot: {plot}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.plan:
            run_plan(args)
        else:
            run_doctor(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
