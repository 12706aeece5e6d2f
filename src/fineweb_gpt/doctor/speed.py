"""MFU against the GPU the run was really on, with evaluation and compile steps left out.

Logs measure MFU against whatever peak their trainer assumed (nanoGPT: an A100's, on every
GPU). The doctor turns that back into what was measured, tokens per second per GPU, and
puts it through the project's one MFU formula (flops.model_flops_utilization) with the
right GPU's peak; a run that logged only its throughput goes through the same formula.
"""

import numpy as np

from fineweb_gpt.doctor.record import Finding, RunRecord, finite
from fineweb_gpt.flops import GPU, flops_per_token, gpu_for_device, gpu_table, model_flops_utilization

MFU_LOW = 0.30
MFU_GOOD = 0.50
OUTLIER_FACTOR = 3.0  # step times this far above the median include evaluation or compilation


def gpu_of(run: RunRecord) -> GPU | None:
    """The run's GPU from its hw profile name, or from the device name ('NVIDIA GeForce RTX 4070')."""
    if run.get("hw_name") in gpu_table():
        return gpu_table()[run.summary["hw_name"]]
    return gpu_for_device(str(run.get("device_name", "")))


def split_step_times(run: RunRecord) -> tuple[list[dict], list[dict]]:
    """(typical, outlier) rows among those with a step time. Outliers include an evaluation
    (nanoGPT's iteration after a 'step N:' line) or compilation: not slowness."""
    timed = [row for row in run.rows if finite(row.get("perf/step_time_ms")) and row["perf/step_time_ms"] > 0]
    if not timed:
        return [], []
    median = float(np.median([row["perf/step_time_ms"] for row in timed]))
    is_outlier = [bool(row.get("includes_eval")) or row["perf/step_time_ms"] > OUTLIER_FACTOR * median for row in timed]
    return (
        [row for row, outlier in zip(timed, is_outlier) if not outlier],
        [row for row, outlier in zip(timed, is_outlier) if outlier],
    )


def run_flops_per_token(run: RunRecord) -> float | None:
    if run.get("flops_per_token"):
        return run.summary["flops_per_token"]
    shape = [run.get(key) for key in ("n_layer", "n_head", "n_embd", "block_size")]
    return flops_per_token(run.num_params, *shape) if run.num_params and all(shape) else None


def measured_against(run: RunRecord) -> tuple[float | None, str]:
    """The peak the logged MFU divides by, and how to name it."""
    if run.get("mfu_reference") == "a100" and not run.get("mfu_peak_flops"):
        return gpu_table()["a100"].peak_flops, "nanoGPT's fixed reference, an A100's"
    if run.get("mfu_peak_flops"):
        names = {"nanogpt": "nanoGPT's fixed reference, an A100's", "llmc": "llm.c's own table's"}
        return run.summary["mfu_peak_flops"], names.get(run.source, "the run's configured")
    return run.get("peak_flops"), "the run's configured"


def per_gpu_tokens_per_sec(run: RunRecord, rows: list[dict], per_token: float) -> tuple[float | None, float | None]:
    """(tokens/s per GPU, the logged MFU's median) from what the log measured."""
    logged = [row["perf/mfu"] for row in rows if finite(row.get("perf/mfu")) and row["perf/mfu"] >= 0]
    reference, _ = measured_against(run)
    if logged and reference:  # nanoGPT prints -100% until it has measured
        median = float(np.median(logged))
        return median * reference / per_token, median
    rates = [row["perf/tokens_per_sec"] for row in rows if finite(row.get("perf/tokens_per_sec"))]
    rates = [rate for rate in rates if rate > 0]
    return (float(np.median(rates)) / run.get("world_size", 1), None) if rates else (None, None)


def check_mfu(run: RunRecord) -> Finding | None:
    if "cpu" in (run.get("hw_name"), run.get("device_name")):
        return None  # MFU is a GPU's measure; a CPU has no peak in the hw profiles
    typical, outliers = split_step_times(run)
    rows = typical if typical else run.rows
    per_token = run_flops_per_token(run)
    if not per_token:
        return None
    rate, logged = per_gpu_tokens_per_sec(run, rows, per_token)
    if rate is None:
        return None
    gpu = gpu_of(run)
    peak = run.get("peak_flops") or (gpu.peak_flops if gpu else None)
    reference, against = measured_against(run)
    timing = ""
    if typical:
        median_ms = np.median([r["perf/step_time_ms"] for r in typical])
        timing = f"; median step {median_ms:.0f} ms over {len(typical)} steps"
        if outliers:
            slowest = max(r["perf/step_time_ms"] for r in outliers)
            timing += (
                f", leaving out {len(outliers)} that include evaluation or compilation (up to {slowest:.0f} ms, "
                "not slowness)"
            )
    if peak is None:
        said = "the GPU is not known"
        if logged is not None:
            said = f"the log says {logged:.2%} against {against} {reference / 1e12:.0f} TFLOPS"
        evidence = f"about {rate:,.0f} tokens/s per GPU; {said}" + timing
        return Finding("mfu", False, "MFU: GPU unknown", evidence, f"pass --gpu (one of {', '.join(gpu_table())})")
    real = model_flops_utilization(per_token, rate, peak)
    gpu_name = run.get("hw_name") or (gpu.name if gpu else "this GPU")
    evidence = f"median MFU {real:.1%} of {gpu_name}'s {peak / 1e12:.1f} TFLOPS, about {rate:,.0f} tokens/s per GPU"
    if logged is not None and reference and abs(reference - peak) > 1e-6 * peak:
        evidence += f" (the log says {logged:.2%}, measured against {against} {reference / 1e12:.0f} TFLOPS)"
    evidence += timing
    compile_fix = run.setting("compile")
    if real > 1:
        fix = f"MFU cannot exceed 100%: the run was not on {gpu_name}; pass the right --gpu"
        return Finding("mfu", True, "MFU above 100%: wrong GPU", evidence, fix)
    if real < MFU_LOW:
        fix = f"compile the model ({compile_fix}) and use the largest micro-batch that fits (see Batch plan)"
        if run.get("compile"):
            fix = "use the largest micro-batch that fits (see Batch plan), and check that data loading keeps up"
        if "bf16" not in str(run.get("precision", "bf16")).lower():
            fix += f"; train in bf16 (this run used {run.get('precision')})"
        return Finding("mfu", True, f"Low MFU: {real:.0%}", evidence, fix)
    if real >= MFU_GOOD:
        return Finding("mfu", False, f"MFU {real:.0%}: good", evidence + ": the GPU is kept busy")
    fix = "the largest micro-batch that fits (see Batch plan) may add some"
    if not run.get("compile"):
        fix = f"compiling ({compile_fix}) and " + fix
    return Finding("mfu", False, f"MFU {real:.0%}: fair", evidence, fix)
