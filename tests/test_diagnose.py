"""The doctor's checks on run records with known answers: each finding where it must fire, and
silence where it must not."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from doctor_fixtures import CHINCHILLA_STEPS_40M, TOKENS_PER_STEP, metric_rows, power_law, run_summary
from fineweb_gpt.config_files import load_option
from fineweb_gpt.doctor.checks import diagnose
from fineweb_gpt.doctor.forecast import fit_power_law, forecast_loss
from fineweb_gpt.doctor.memory import MEASURED_PEAK_GIB, modelled_memory_gib, plan_batch, training_memory
from fineweb_gpt.doctor.nanogpt_log import config_value
from fineweb_gpt.doctor.record import RunRecord, sanitized
from fineweb_gpt.doctor.reference import LLMC_GPT2_124M
from fineweb_gpt.errors import ConfigError
from fineweb_gpt.flops import gpt2_shaped, gpu_table, parameter_count
from fineweb_gpt.model import GPT, GPTConfig

RUN_TOKENS = CHINCHILLA_STEPS_40M * TOKENS_PER_STEP


def findings_by_check(summary: dict, rows: list[dict]) -> dict:
    return {f.check: f for f in diagnose(RunRecord(sanitized(summary), rows))}


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
    assert findings["token_budget"].title == "Tokens: 1.00x Chinchilla-optimal trained"
    assert findings["epochs"].title == f"Epochs: {RUN_TOKENS / 1.2e9:.2f} trained"
    assert findings["mfu"].title == "MFU 45%: fair"
    assert "continuing is worth it" in findings["forecast"].fix


@pytest.mark.parametrize(
    "n_layer, n_head, n_embd, bias, vocab_size",
    [(12, 12, 384, False, 50304), (12, 12, 768, False, 50304), (2, 2, 32, True, 50304), (3, 4, 64, True, 65)],
)
def test_a_logged_shape_is_counted_as_the_gpt2_model_of_that_shape(n_layer, n_head, n_embd, bias, vocab_size):
    model = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, bias=bias, vocab_size=vocab_size))
    assert parameter_count(gpt2_shaped(n_layer, n_embd, vocab_size, bias)) == model.num_params()


def test_124m_name_at_width_384_is_flagged_with_the_width_that_fixes_it():
    summary = run_summary(model_name="124m")  # the 40m shape: n_embd=384, 40.56M parameters
    finding = findings_by_check(summary, metric_rows(summary))["model_size"]
    assert finding.problem and "124.00M" in finding.evidence and "40.56M" in finding.evidence
    assert finding.fix.startswith("model.n_embd=768 gives 123.59M")


@pytest.mark.parametrize("name", ["40m", "tiny", "custom"])
def test_names_that_match_or_state_no_size_are_not_flagged(name):
    summary = run_summary(model_name=name)
    assert "model_size" not in findings_by_check(summary, metric_rows(summary))


def test_an_undertrained_run_gets_the_steps_that_reach_chinchilla_and_a_useful_smaller_model():
    params = parameter_count(gpt2_shaped(12, 768))
    steps = math.ceil(0.25 * 20 * params / TOKENS_PER_STEP)
    summary = run_summary(model_name="124m", num_params=params, n_embd=768, max_steps=steps)
    finding = findings_by_check(summary, metric_rows(summary))["token_budget"]
    assert finding.problem and "0.25x" in finding.title
    assert f"trainer.max_steps={math.ceil(20 * params / TOKENS_PER_STEP)}" in finding.fix
    width = int(finding.fix.split("model.n_embd=")[1].split(" ")[0])
    assert parameter_count(gpt2_shaped(12, width)) == pytest.approx(steps * TOKENS_PER_STEP / 20, rel=0.1)


def test_a_smoke_test_budget_gets_no_advice_to_shrink_the_model_to_nothing():
    # The quickstart: the 7.23M tiny model for 40 steps of 4,096 tokens, at about 1,900 tokens/s.
    params = parameter_count(gpt2_shaped(4, 128))
    summary = run_summary(
        model_name="tiny", num_params=params, n_layer=4, n_head=4, n_embd=128, block_size=256,
        tokens_per_step=4096, max_steps=40, unique_train_tokens=1_140_000,
    )  # fmt: skip
    rows = [{**r, "perf/tokens_per_sec": 1900.0} if "perf/tokens_per_sec" in r else r for r in metric_rows(summary)]
    finding = findings_by_check(summary, rows)["token_budget"]
    budget_model = 40 * 4096 / 20
    assert finding.problem and "smoke test" in finding.fix
    assert (
        "a model of about" not in finding.fix
        and f"would have {budget_model / 1e3:.2f}K parameters, too few" in finding.fix
    )
    hours = 20 * params / 1900 / 3600
    assert f"trainer.max_steps={math.ceil(20 * params / 4096)}" in finding.fix and f"about {hours:.1f} h" in finding.fix


def test_several_epochs_of_one_parquet_file_are_named_as_the_plateau_cause():
    summary = run_summary(unique_train_tokens=300_000_000)
    finding = findings_by_check(summary, metric_rows(summary))["epochs"]
    assert finding.problem and f"{RUN_TOKENS / 3e8:.2f} epochs" in finding.evidence
    assert "one parquet file" in finding.evidence and "plateau" in finding.evidence
    assert f"trainer.max_steps={3e8 // TOKENS_PER_STEP:.0f}" in finding.fix  # one epoch
    assert f"about {math.ceil(RUN_TOKENS / 3e8)} files" in finding.fix


def test_a_planned_second_epoch_is_flagged_before_it_happens_but_an_assumed_plan_is_not_judged():
    summary = run_summary(unique_train_tokens=600_000_000)
    early_rows = [row for row in metric_rows(summary) if row["step"] <= 500]  # 262M tokens seen so far
    finding = findings_by_check(summary, early_rows)["epochs"]
    assert finding.problem and finding.title.startswith(f"Repeated data planned: {RUN_TOKENS / 6e8:.1f} epochs")
    assumed = {**summary, "plan_source": "nanoGPT's default max_iters=600000, not in the log"}
    finding = findings_by_check(assumed, early_rows)["epochs"]
    assert not finding.problem and finding.title.startswith(f"Epochs: {500 * TOKENS_PER_STEP / 6e8:.2f} trained (plan:")


def test_overfitting_reports_the_lowest_step_and_the_rise():
    def val(tokens):
        return power_law(tokens) + 1.5 * max(0.0, tokens / RUN_TOKENS - 0.5) ** 2

    summary = run_summary()
    rows = metric_rows(summary, val_loss=val, train_loss=lambda t: power_law(t) - 0.2, noise=0.0)
    finding = findings_by_check(summary, rows)["overfitting"]
    evals = [row for row in rows if "val/loss" in row]
    best = min(evals, key=lambda row: row["val/loss"])
    assert finding.title == f"Overfitting since step {best['step']:,}"
    assert f"{evals[-1]['val/loss'] - best['val/loss']:+.4f} higher" in finding.evidence
    assert "forecast" not in findings_by_check(summary, rows)  # no extrapolating a rising curve


def test_plateau_reports_where_the_curve_flattened():
    summary = run_summary()
    findings = findings_by_check(summary, metric_rows(summary, val_loss=flat_after_half, noise=0.0))
    first_flat_eval = math.ceil(CHINCHILLA_STEPS_40M / 2 / 100) * 100  # evaluations every 100 steps
    assert findings["plateau"].title == f"Plateau since step {first_flat_eval:,}"
    # The schedule decayed to min_lr by the end without helping: the learning rate is not the cause.
    assert "learning_rate" not in findings
    assert "larger model" in findings["plateau"].fix


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("noise", [0.002, 0.01])
def test_a_steadily_falling_noisy_curve_is_never_a_plateau(seed, noise):
    summary = run_summary(max_steps=3000)
    findings = findings_by_check(summary, metric_rows(summary, eval_every=50, noise=noise, seed=seed))
    assert "plateau" not in findings and "learning_rate" not in findings


@pytest.mark.parametrize("flat_share", [0.12, 0.3, 0.6])
def test_a_clear_flattening_at_the_end_is_a_plateau_however_short(flat_share):
    knee = (1 - flat_share) * RUN_TOKENS
    summary = run_summary()

    def val(tokens):
        return power_law(min(tokens, knee))

    findings = findings_by_check(summary, metric_rows(summary, val_loss=val, eval_every=25, noise=0.002))
    start_tokens = int(findings["plateau"].title.split("step ")[1].replace(",", "")) * TOKENS_PER_STEP
    assert abs(start_tokens - knee) <= 0.02 * RUN_TOKENS


def test_learning_rate_that_never_decays_on_the_plateau_suggests_a_lower_min_lr():
    summary = run_summary(min_lr=6e-4)  # min_lr = lr: the schedule never decays
    rows = metric_rows(summary, val_loss=flat_after_half, constant_lr=True, noise=0.0)
    finding = findings_by_check(summary, rows)["learning_rate"]
    assert finding.problem and "the schedule never decays" in finding.evidence
    assert finding.fix.startswith("optim.min_lr=6e-05")


def test_plateau_with_the_decay_still_to_come_is_only_a_note():
    summary = run_summary(max_steps=3000)
    rows = [row for row in metric_rows(summary, val_loss=flat_after_half, noise=0.0) if row["step"] <= 1548]
    findings = findings_by_check(summary, rows)
    assert (
        not findings["learning_rate"].problem
        and "the run is at step 1,548 of 3,000" in findings["learning_rate"].evidence
    )
    assert "decay still to come" in findings["plateau"].fix


@pytest.mark.parametrize("dropout, gap, flagged", [(0.1, 0.05, True), (0.1, -0.05, False), (0.0, 0.05, False)])
def test_dropout_is_flagged_only_when_val_is_below_train(dropout, gap, flagged):
    summary = run_summary(dropout=dropout)
    findings = findings_by_check(summary, metric_rows(summary, train_gap=gap))
    assert ("dropout" in findings) == flagged
    if flagged:
        assert findings["dropout"].fix.startswith("model.dropout=0.0")


def test_mfu_measured_against_an_a100_is_re_expressed_on_the_real_gpu():
    summary = run_summary()
    rows = [{**row, "perf/mfu": 0.1107} if "perf/mfu" in row else row for row in metric_rows(summary)]
    summary.update(peak_flops=None, hw_name="rtx4070", mfu_reference="a100")  # as nanoGPT measures
    finding = findings_by_check(summary, rows)["mfu"]
    a100, rtx4070 = gpu_table()["a100"].peak_flops, gpu_table()["rtx4070"].peak_flops
    assert finding.title == f"MFU {0.1107 * a100 / rtx4070:.0%}: good"
    tokens_per_sec = 0.1107 * a100 / summary["flops_per_token"]
    assert f"about {tokens_per_sec:,.0f} tokens/s per GPU" in finding.evidence


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


# --- the reference curve ------------------------------------------------------------------------------


def test_the_reference_is_read_at_its_published_evaluations_and_between_them_in_log_tokens():
    assert LLMC_GPT2_124M.num_params == parameter_count(gpt2_shaped(12, 768, 50304, bias=True))
    assert LLMC_GPT2_124M.at(8000 * 524_288) == pytest.approx(3.4431)
    assert LLMC_GPT2_124M.at(19_560 * 524_288) == pytest.approx(3.2722)
    middle = math.sqrt(12_250 * 16_000) * 524_288  # halfway in log tokens between two evaluations
    assert LLMC_GPT2_124M.at(middle) == pytest.approx((3.3462 + 3.2882) / 2)
    assert LLMC_GPT2_124M.at(100e6) is None and LLMC_GPT2_124M.at(20e9) is None


@pytest.mark.parametrize(
    "offset, verdict", [(0.0, "on par"), (0.1, "behind it"), (0.3, "well behind it"), (-0.1, "ahead of it")]
)
def test_a_124m_run_is_judged_against_the_reference_at_equal_tokens(offset, verdict):
    steps = [1000, 2000, 4000, 8000]
    rows = [{"step": s, "val/loss": LLMC_GPT2_124M.at(s * 524_288) + offset} for s in steps]
    summary = {"model_name": "124m", "n_layer": 12, "n_head": 12, "n_embd": 768, "tokens_per_step": 524_288}
    finding = findings_by_check(summary, rows)["reference"]
    assert finding.title == f"Against GPT-2 124M trained by llm.c on FineWeb: {verdict} at 4.19B tokens"
    assert f"at 4.19B tokens, the reference was at 3.443, this run is at {3.4431 + offset:.3f}" in finding.evidence


# --- memory and the batch plan ----------------------------------------------------------------------


def test_memory_figures_are_the_measurements_where_measured_and_the_model_stays_near_them():
    for (compiled, n_layer, n_embd), peaks in MEASURED_PEAK_GIB.items():
        for micro_batch, gib in peaks.items():
            estimate = training_memory(gpt2_shaped(n_layer, n_embd), micro_batch, compiled=compiled)
            assert (estimate.gib, estimate.measured, estimate.compiled) == (gib, True, compiled)
            modelled = modelled_memory_gib(gpt2_shaped(n_layer, n_embd), micro_batch, compiled=compiled)
            # Compiled: one fit for two widths and peaks read two ways (reserved, allocated).
            assert modelled == pytest.approx(gib, abs=0.5 if compiled else 0.3)
    assert training_memory(gpt2_shaped(12, 768), 12).describe().endswith("(modelled, uncompiled)")
    # 124m at micro-batch 10 ran out of memory within 11 GiB, uncompiled; 40m at 32, compiled.
    assert modelled_memory_gib(gpt2_shaped(12, 768), 10) > 11
    assert modelled_memory_gib(gpt2_shaped(12, 384), 32, compiled=True) > 11


@pytest.mark.parametrize(
    "n_embd, tokens_per_step, micro_batch, grad_accum, largest",
    [
        (768, 524288, 8, 64, 8),  # 124m on 12 GB
        (384, 524288, 8, 64, 10),  # 40m: 10 fits but 512 sequences do not split into tens
        (384, 491520, 10, 48, 10),  # nanoGPT's 480 sequences per step do
    ],
)
def test_batch_plan_on_12_gb(n_embd, tokens_per_step, micro_batch, grad_accum, largest):
    plan = plan_batch(gpt2_shaped(12, n_embd), memory_gb=12, tokens_per_step=tokens_per_step)
    assert (plan.micro_batch, plan.grad_accum, plan.largest_fitting) == (micro_batch, grad_accum, largest)
    assert plan.memory.gib <= 12 - 1  # the CUDA context keeps 1 GiB


@pytest.mark.parametrize("n_embd", [768, 384])
def test_compiled_batch_plan_on_12_gb_is_the_measured_largest_micro_batch(n_embd):
    # hw=rtx4070: compiled, 16 for 124m (10.72 GiB) and for 40m (7.60 GiB; 32 ran out of memory).
    plan = plan_batch(gpt2_shaped(12, n_embd), memory_gb=12, tokens_per_step=524288, compiled=True)
    assert (plan.micro_batch, plan.grad_accum) == (16, 32)
    assert plan.memory.compiled and plan.memory.measured
    assert plan.memory.gib == MEASURED_PEAK_GIB[(True, 12, n_embd)][16] <= 12 - 1
    assert 16 <= plan.largest_fitting < 32
    assert load_option("hw", "rtx4070")["micro_batch_size"] == plan.micro_batch  # the profile trains at it


def test_a_micro_batch_the_run_trained_at_fits_whatever_the_model_says():
    assert modelled_memory_gib(gpt2_shaped(12, 384), 16) > 11  # uncompiled model: does not fit
    plan = plan_batch(gpt2_shaped(12, 384), memory_gb=12, tokens_per_step=524288, known_to_fit=16)
    assert plan.micro_batch == 16 and "the run trained at micro-batch 16" in plan.describe()


def test_a_micro_batch_measured_running_out_of_memory_is_never_proposed():
    # conf/hw/h100.yaml: uncompiled 124m at micro-batch 64 does not fit on the 80 GB card, 32 does.
    assert modelled_memory_gib(gpt2_shaped(12, 768), 64) < 79  # the linear model alone would say it fits
    plan = plan_batch(gpt2_shaped(12, 768), memory_gb=80, tokens_per_step=524288)
    assert plan.largest_fitting < 64 and (plan.micro_batch, plan.grad_accum) == (32, 16)


def test_batch_plan_refuses_what_cannot_fit_or_divide():
    with pytest.raises(ConfigError, match="more than the 1 GiB"):
        plan_batch(gpt2_shaped(12, 768), memory_gb=2, tokens_per_step=524288)
    with pytest.raises(ConfigError, match="not a multiple of block_size x GPUs = 1024"):
        plan_batch(gpt2_shaped(12, 768), memory_gb=12, tokens_per_step=1000)


# --- bounded, NaN-safe reading -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, value",
    [("5 * 8", 40), ("6e-4", 6e-4), ("'out-124m'", "out-124m"), ("out-124m", "out-124m"), ("True", True), ("-3", -3)],
)
def test_config_values_are_read_like_nanogpts_configurator(text, value):
    assert config_value(text) == value


@pytest.mark.parametrize("text", ['"x" * 99999999999', "[0] * 10**12", "10**10**10", "9" * 30 + " * " + "9" * 30])
def test_config_values_never_build_what_a_crafted_line_asks(text):
    value = config_value(text)
    assert isinstance(value, str) and len(value) <= 200


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(run_summary())), st.one_of(st.floats(), st.integers(), st.text())))
def test_any_summary_values_leave_the_checks_standing(changes):
    summary = run_summary()
    rows = metric_rows(summary, eval_every=300)
    findings = diagnose(RunRecord(sanitized({**summary, **changes}), rows))
    assert all(f.title and "\n" not in f.title + f.evidence + f.fix for f in findings)
