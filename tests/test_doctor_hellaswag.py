"""The doctor and HellaSwag: build-nanogpt's log.txt, and a run folder's eval/hellaswag_* rows,
placed beside the published points for GPT-2 124M's size."""

import math

from doctor_fixtures import metric_rows, run_summary, write_run_folder
from fineweb_gpt.doctor.cli import main
from fineweb_gpt.doctor.sources import read_run
from fineweb_gpt.flops import gpt2_shaped, parameter_count


def build_nanogpt_log(steps: int, eval_every: int) -> str:
    """log/log.txt as build-nanogpt's train_gpt2.py appends it: a train line per step, val and
    hella lines at each evaluation (and at the last step)."""
    lines = []
    for step in range(steps):
        last = step == steps - 1
        if step % eval_every == 0 or last:
            lines.append(f"{step} val {3.0 + 8 / (1 + step / 50):.4f}")
            lines.append(f"{step} hella {0.25 + 0.0495 * step / (steps - 1):.4f}")
        lines.append(f"{step} train {3.1 + 8 / (1 + step / 50):.6f}")
    return "\n".join(lines) + "\n"


def test_build_nanogpt_log_is_read_with_its_settings_and_hellaswag(tmp_path, capsys):
    log = tmp_path / "log.txt"
    log.write_text(build_nanogpt_log(steps=1000, eval_every=250))
    run = read_run(log)
    assert run.source == "buildnanogpt" and run.get("tokens_per_step") == 524_288
    assert run.num_params == parameter_count(gpt2_shaped(12, 768, 50304, bias=True))
    assert [p.step for p in run.points("val/loss")] == [0, 250, 500, 750, 999]
    hella = run.points("eval/hellaswag_acc_norm")
    assert [(p.step, p.value) for p in hella][-1] == (999, 0.2995)
    assert len(run.points("train/loss")) == 1000

    report = tmp_path / "report.md"
    assert main([str(log), "--out", str(report)]) == 0
    text = report.read_text()
    assert "| source | build-nanogpt log |" in text and "| HellaSwag | acc_norm 0.2995 at step 999 |" in text
    assert "### HellaSwag 0.2995: at or above OpenAI's GPT-2 124M" in text
    assert "OpenAI's GPT-2 124M 0.2955 (+0.0040); GPT-3 Small (125M) 0.3370 (-0.0375)" in text
    assert "train_gpt2.py's default max_steps=19073, not in the log" in text


def test_a_run_folders_hellaswag_is_placed_beside_gpt2_only_at_its_size(tmp_path):
    for name, params, expected in (
        ("124m", 123.59e6, "### HellaSwag 0.2800: below OpenAI's GPT-2 124M"),
        ("40m", 40.56e6, "the published points are for 124M-parameter models"),
    ):
        summary = run_summary(model_name=name, num_params=params, max_steps=400)
        rows = metric_rows(summary, eval_every=200)
        rows += [{"step": 400, "eval/hellaswag_acc_norm": 0.28, "eval/hellaswag_acc": 0.27, "data/tokens_seen": 1}]
        run_dir = write_run_folder(tmp_path / name, summary, rows)
        assert main([str(run_dir), "--out", str(tmp_path / f"{name}.md")]) == 0
        text = (tmp_path / f"{name}.md").read_text()
        assert expected in text and "| HellaSwag | acc_norm 0.2800 at step 400 |" in text
        assert math.isclose(read_run(run_dir).points("eval/hellaswag_acc_norm")[-1].value, 0.28)
