import math

import numpy as np
import pytest

from doctor_fixtures import (
    CHINCHILLA_STEPS_40M,
    TOKENS_PER_STEP,
    metric_rows,
    power_law,
    run_summary,
)
from fineweb_gpt.diagnose import (
    MEASURED_PEAK_GIB,
    PADDED_VOCAB_SIZE,
    RunRecord,
    diagnose,
    fit_power_law,
    forecast_loss,
    mfu_on_gpu,
    param_count,
    plan_batch,
    training_memory_gib,
)
from fineweb_gpt.errors import ConfigError
from fineweb_gpt.flops import gpu_table
from fineweb_gpt.model import GPT, GPTConfig

RUN_TOKENS = CHINCHILLA_STEPS_40M * TOKENS_PER_STEP


def findings_by_check(summary: dict, rows: list[dict]) -> dict:
    return {f.check: f for f in diagnose(RunRecord(summary, rows))}


def problems(summary: dict, rows: list[dict]) -> set[str]:
    return {check for check, f in findings_by_check(summary, rows).items() if f.problem}


def flat_after_half(tokens: float) -> float:
    """Val loss falling steeply to 4.0 at half the run, then flat."""
    return 4.0 + 2.0 * max(0.0, 1 - tokens / (0.5 * RUN_TOKENS))


def test_healthy_run_has_no_problems():
    summary = run_summary()
    findings = findings_by_check(summary, metric_rows(summary))
    assert [f.title for f in findings.values() if f.problem] == []
    # ...and still says what it measured.
    assert "1.00x" in findings["token_budget"].evidence
    assert findings["epochs"].title == f"Epochs: {RUN_TOKENS / 1.2e9:.2f}"
    assert findings["mfu"].title == "MFU 45%: fair"
    assert "continuing is worth it" in findings["forecast"].fix


@pytest.mark.parametrize(
    "n_layer, n_head, n_embd, bias, vocab_size",
    [(12, 12, 384, False, 50304), (12, 12, 768, False, 50304), (2, 2, 32, True, 50304), (3, 4, 64, True, 65)],
)
def test_parameter_count_formula_matches_the_model(n_layer, n_head, n_embd, bias, vocab_size):
    model = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, bias=bias, vocab_size=vocab_size))
    assert param_count(n_layer, n_embd, vocab_size, bias) == model.num_params()


def test_124m_name_at_width_384_is_flagged_with_the_width_that_fixes_it():
    summary = run_summary(model_name="124m")  # the 40m shape: n_embd=384, 40.56M parameters
    finding = findings_by_check(summary, metric_rows(summary))["model_size"]
    assert finding.problem
    assert "124.00M" in finding.evidence and "40.56M" in finding.evidence
    assert finding.fix.startswith("model.n_embd=768 gives 123.59M")


@pytest.mark.parametrize("name", ["40m", "tiny", "custom"])
def test_names_that_match_or_state_no_size_are_not_flagged(name):
    summary = run_summary(model_name=name)
    assert "model_size" not in findings_by_check(summary, metric_rows(summary))


def test_undertrained_run_gets_the_steps_that_reach_chinchilla():
    params = param_count(12, 768)
    steps = math.ceil(0.25 * 20 * params / TOKENS_PER_STEP)
    summary = run_summary(model_name="124m", num_params=params, n_embd=768, max_steps=steps)
    finding = findings_by_check(summary, metric_rows(summary))["token_budget"]
    assert finding.problem and "0.25x" in finding.title
    assert f"trainer.max_steps={math.ceil(20 * params / TOKENS_PER_STEP)}" in finding.fix


def test_several_epochs_of_one_parquet_file_are_named_as_the_plateau_cause():
    summary = run_summary(unique_train_tokens=300_000_000)
    finding = findings_by_check(summary, metric_rows(summary))["epochs"]
    assert finding.problem and f"{RUN_TOKENS / 3e8:.2f} epochs" in finding.evidence
    assert "one parquet file" in finding.evidence and "plateau" in finding.evidence
    assert f"trainer.max_steps={3e8 // TOKENS_PER_STEP:.0f}" in finding.fix  # one epoch
    assert f"about {math.ceil(RUN_TOKENS / 3e8)} files" in finding.fix


def test_a_planned_second_epoch_is_flagged_before_it_happens():
    summary = run_summary(unique_train_tokens=600_000_000)
    early_rows = [row for row in metric_rows(summary) if row["step"] <= 500]  # 262M tokens seen so far
    assert "epochs" in problems(summary, early_rows)


def test_overfitting_reports_the_lowest_step_and_the_rise():
    def val(tokens):
        return power_law(tokens) + 1.5 * max(0.0, tokens / RUN_TOKENS - 0.5) ** 2

    summary = run_summary()
    rows = metric_rows(summary, val_loss=val, train_loss=lambda t: power_law(t) - 0.2, noise=0.0)
    finding = findings_by_check(summary, rows)["overfitting"]
    evals = [row for row in rows if "val/loss" in row]
    best = min(evals, key=lambda row: row["val/loss"])
    assert finding.title == f"Overfitting since step {best['step']}"
    assert f"{evals[-1]['val/loss'] - best['val/loss']:+.4f} higher" in finding.evidence
    assert "forecast" not in findings_by_check(summary, rows)  # no extrapolating a rising curve


def test_plateau_reports_where_the_curve_flattened():
    summary = run_summary()
    findings = findings_by_check(summary, metric_rows(summary, val_loss=flat_after_half, noise=0.0))
    first_flat_eval = math.ceil(CHINCHILLA_STEPS_40M / 2 / 100) * 100  # evaluations every 100 steps
    assert findings["plateau"].title == f"Plateau since step {first_flat_eval}"
    # The schedule decayed to min_lr by the end without helping: the learning rate is not the cause.
    assert "learning_rate" not in findings
    assert "larger model" in findings["plateau"].fix


def test_learning_rate_still_high_on_the_plateau_suggests_a_lower_min_lr():
    summary = run_summary(min_lr=6e-4)  # min_lr = lr: the schedule never decays
    rows = metric_rows(summary, val_loss=flat_after_half, constant_lr=True, noise=0.0)
    finding = findings_by_check(summary, rows)["learning_rate"]
    assert finding.problem and "100% of its peak" in finding.evidence
    assert finding.fix.startswith("optim.min_lr=6e-05")


def test_plateau_with_the_decay_still_to_come_is_only_a_note():
    summary = run_summary(max_steps=3000)
    rows = [row for row in metric_rows(summary, val_loss=flat_after_half, noise=0.0) if row["step"] <= 1548]
    findings = findings_by_check(summary, rows)
    assert not findings["learning_rate"].problem
    assert "decay still to come" in findings["plateau"].fix


@pytest.mark.parametrize("dropout, gap, flagged", [(0.1, 0.05, True), (0.1, -0.05, False), (0.0, 0.05, False)])
def test_dropout_is_flagged_only_when_val_is_below_train(dropout, gap, flagged):
    summary = run_summary(dropout=dropout)
    findings = findings_by_check(summary, metric_rows(summary, train_gap=gap))
    assert ("dropout" in findings) == flagged
    if flagged:
        assert findings["dropout"].fix.startswith("model.dropout=0.0")


def test_nanogpt_mfu_on_an_a100_converts_to_the_rtx_4070():
    real = mfu_on_gpu(0.1107, gpu_table()["a100"].peak_flops, gpu_table()["rtx4070"].peak_flops)
    assert real == pytest.approx(0.592, abs=0.001)


def test_low_mfu_is_a_problem_and_good_mfu_is_not():
    summary = run_summary()
    assert "mfu" in problems(summary, metric_rows(summary, mfu=0.15))
    good = findings_by_check(summary, metric_rows(summary, mfu=0.55))["mfu"]
    assert not good.problem and good.title == "MFU 55%: good"


def test_mfu_is_computed_from_throughput_when_the_run_did_not_know_its_peak():
    summary = run_summary()
    rows = [{k: v for k, v in row.items() if k != "perf/mfu"} for row in metric_rows(summary, mfu=0.4)]
    summary.update(hw_name="auto", peak_flops=None)  # the device name still says RTX 4070
    assert findings_by_check(summary, rows)["mfu"].title == "MFU 40%: fair"


def test_curve_fit_recovers_a_known_power_law_and_predicts_within_its_interval():
    rng = np.random.default_rng(3)
    a, b, c = 3.0, 309.0, 0.3
    tokens = np.linspace(2e7, 1e9, 40)
    losses = a + b * tokens**-c + rng.normal(0, 0.01, tokens.size)
    fit = fit_power_law(tokens, losses)
    assert fit.a == pytest.approx(a, abs=0.1) and fit.c == pytest.approx(c, rel=0.1)
    forecast = forecast_loss(tokens, losses, [2e9, 4e9])
    for target, (predicted, low, high) in forecast.predictions.items():
        truth = a + b * target**-c
        assert low <= truth <= high and low < predicted < high
        assert high - low < 0.1  # and the interval is narrow enough to act on


def test_forecast_says_when_there_are_too_few_points():
    summary = run_summary()
    finding = findings_by_check(summary, metric_rows(summary, eval_every=500))["forecast"]
    assert "too few points" in finding.evidence


def test_memory_model_reproduces_the_measurements():
    for (n_layer, n_embd), peaks in MEASURED_PEAK_GIB.items():
        for micro_batch, gib in peaks.items():
            assert training_memory_gib(n_layer, n_embd, 1024, PADDED_VOCAB_SIZE, micro_batch) == pytest.approx(
                gib, abs=0.3
            )
    # 124m at micro-batch 10 ran out of memory within 11 GiB.
    assert training_memory_gib(12, 768, 1024, PADDED_VOCAB_SIZE, 10) > 11


@pytest.mark.parametrize(
    "n_embd, tokens_per_step, micro_batch, grad_accum, largest",
    [
        (768, 524288, 8, 64, 8),  # 124m on 12 GB
        (384, 524288, 8, 64, 10),  # 40m: 10 fits but 512 sequences do not split into tens
        (384, 491520, 10, 48, 10),  # nanoGPT's 480 sequences per step do
    ],
)
def test_batch_plan_on_12_gb(n_embd, tokens_per_step, micro_batch, grad_accum, largest):
    plan = plan_batch(12, n_embd, 1024, memory_gb=12, tokens_per_step=tokens_per_step)
    assert (plan.micro_batch, plan.grad_accum, plan.largest_fitting) == (micro_batch, grad_accum, largest)
    assert plan.peak_gib <= 12 - 1  # the CUDA context keeps 1 GiB


def test_batch_plan_refuses_what_cannot_fit_or_divide():
    with pytest.raises(ConfigError, match="more than the 1 GiB"):
        plan_batch(12, 768, 1024, memory_gb=2, tokens_per_step=524288)
    with pytest.raises(ConfigError, match="not a multiple of block_size x GPUs = 1024"):
        plan_batch(12, 768, 1024, memory_gb=12, tokens_per_step=1000)
