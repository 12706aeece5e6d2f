"""Sweeps (Hydra multirun, Optuna), launchers and multi-process training, on the CPU."""

import csv
import json
import math
import os
from pathlib import Path

import pytest

from fineweb_gpt.sweep import main as sweep_main
from helpers import SMALL, run_cli

TINY = [*SMALL, "trainer.max_steps=3"]


def sweep_dir_of(tmp_path: Path) -> Path:
    [folder] = tmp_path.glob("outputs/multirun/*/*")
    return folder


def last(run_dir: Path, column: str) -> float:
    with open(run_dir / "csv" / "metrics.csv", newline="") as file:
        return [float(r[column]) for r in csv.DictReader(file) if r.get(column)][-1]


def read_table(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "sweep_results.csv", newline="") as file:
        return list(csv.DictReader(file))


def test_two_by_two_multirun_writes_a_table_from_each_runs_own_logs(tmp_path):
    result = run_cli("-m", *TINY, "model.n_embd=32,64", "optim.min_lr=1e-4,3e-4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = sweep_dir_of(tmp_path)
    rows = read_table(sweep_dir)
    assert len(rows) == 4
    assert sorted(r["overrides"] for r in rows) == sorted(
        f"model.n_embd={e} optim.min_lr={lr}" for e in (32, 64) for lr in ("0.0001", "0.0003")
    )
    for row in rows:
        run_dir = sweep_dir / row["run"]
        summary = json.loads((run_dir / "run_summary.json").read_text())
        assert row["status"] == "completed"
        assert int(row["params"]) == summary["num_params"]
        assert float(row["final_val_loss"]) == last(run_dir, "val/loss")
        assert int(row["tokens_seen"]) == last(run_dir, "data/tokens_seen") == 3 * 256
        link = run_dir / "checkpoints" / "last.ckpt"
        assert row["final_checkpoint"] == str((link.parent / os.readlink(link)).relative_to(run_dir))
    finals = [float(r["final_val_loss"]) for r in rows]
    assert finals == sorted(finals)  # best first
    markdown = (sweep_dir / "sweep_results.md").read_text()
    assert markdown.count("| completed |") == 4 and markdown in result.stdout

    # The same table, rebuilt later from the folder alone.
    (sweep_dir / "sweep_results.csv").unlink()
    assert sweep_main([str(sweep_dir)]) == 0
    assert read_table(sweep_dir) == rows


def test_an_invalid_combination_fails_alone_and_is_reported_by_name(tmp_path):
    result = run_cli("-m", *TINY, "model.n_embd=64,65", cwd=tmp_path)
    assert result.returncode == 1  # the sweep says it was not all good...
    rows = {r["overrides"]: r for r in read_table(sweep_dir_of(tmp_path))}
    assert rows["model.n_embd=64"]["status"] == "completed"  # ...but the valid run finished
    assert math.isfinite(float(rows["model.n_embd=64"]["final_val_loss"]))
    assert rows["model.n_embd=65"]["status"] == "failed"
    assert rows["model.n_embd=65"]["error"].startswith("model.n_embd=65 is not divisible by model.n_head=2")
    assert "(model.n_embd=65) failed: model.n_embd=65 is not divisible" in result.stdout + result.stderr


def run_choices(run_dir: Path) -> dict:
    """Which option of each config group a run of a sweep composed, as Hydra recorded it."""
    from omegaconf import OmegaConf

    return dict(OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.runtime.choices)


def test_hydras_sweep_functions_work_on_config_groups(tmp_path):
    result = run_cli("-m", *TINY, "model=choice(tiny,40m)", "optim=glob(*)", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = sweep_dir_of(tmp_path)
    rows = read_table(sweep_dir)
    assert sorted(r["overrides"] for r in rows) == sorted(
        f"model={m} optim={o}" for m in ("tiny", "40m") for o in ("adamw", "muon")
    )
    for row in rows:
        run_dir = sweep_dir / row["run"]
        choices = run_choices(run_dir)
        assert row["overrides"] == f"model={choices['model']} optim={choices['optim']}"
        assert json.loads((run_dir / "run_summary.json").read_text())["model_name"] == choices["model"]
        with open(run_dir / "csv" / "metrics.csv", newline="") as file:
            muon_rates = [r.get("train/lr_muon") for r in csv.DictReader(file) if r.get("train/loss")]
        assert len(muon_rates) == 3 and all(muon_rates) == (choices["optim"] == "muon")  # Muon's own rate
        assert row["status"] == "completed"


def checkpoint_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt") if not p.is_symlink())


def test_a_sweep_preset_keeps_only_each_runs_final_checkpoint(tmp_path):
    # Saves every step; runs of 3 and 4 steps (range() end excluded): each keeps its last save only.
    result = run_cli(
        "sweep=keep_final",
        *SMALL,
        "trainer.max_steps=range(3,5)",
        "callbacks.model_checkpoint.every_n_train_steps=1",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = sweep_dir_of(tmp_path)
    rows = sorted(read_table(sweep_dir), key=lambda r: r["overrides"])
    assert [r["overrides"] for r in rows] == ["trainer.max_steps=3", "trainer.max_steps=4"]
    for steps, row in zip((3, 4), rows):
        run_dir = sweep_dir / row["run"]
        assert checkpoint_files(run_dir) == [f"step{steps:06d}.ckpt"]
        assert (run_dir / "checkpoints" / "last.ckpt").resolve() == run_dir / "checkpoints" / f"step{steps:06d}.ckpt"
        assert row["final_checkpoint"] == f"checkpoints/step{steps:06d}.ckpt"
        assert int(row["tokens_seen"]) == steps * 256


def test_sweep_table_command_refuses_a_folder_without_runs(tmp_path, capsys):
    assert sweep_main([str(tmp_path)]) == 2
    assert "holds no sweep runs" in capsys.readouterr().err
    assert sweep_main([str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nope'} does not exist; give a sweep's folder: " + (
        "outputs/multirun/<date>/<time>\n"
    )


def fake_run(sweep_dir: Path, name: str, overrides: list[str], result: dict, val_losses=(), checkpoint=None) -> Path:
    """A run folder as a sweep leaves it, written by hand: no training needed to test the table."""
    run_dir = sweep_dir / name
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(json.dumps(overrides))  # JSON is YAML
    (run_dir / "result.json").write_text(json.dumps(result))
    (run_dir / "csv").mkdir()
    rows = [f"{step},{loss}" for step, loss in enumerate(val_losses, 1)]
    (run_dir / "csv" / "metrics.csv").write_text("step,val/loss\n" + "\n".join(rows) + "\n")
    if checkpoint:
        (run_dir / "checkpoints").mkdir()
        (run_dir / "checkpoints" / checkpoint).write_bytes(b"weights")
        (run_dir / "checkpoints" / "last.ckpt").symlink_to(checkpoint)
    return run_dir


def test_the_table_says_where_each_final_checkpoint_is_and_sorts_nan_last(tmp_path):
    fake_run(tmp_path, "0", ["optim.lr=1"], {"status": "completed"}, [6.0, "nan"], "step000002.ckpt")
    fake_run(tmp_path, "1", ["optim.lr=2"], {"status": "completed"}, [6.0, 5.0])
    assert sweep_main([str(tmp_path)]) == 0
    rows = read_table(tmp_path)
    assert [(r["run"], r["final_checkpoint"]) for r in rows] == [("1", "none"), ("0", "checkpoints/step000002.ckpt")]
    assert rows[1]["best_val_loss"] == "6.0"  # the lowest finite one


def test_links_planted_where_the_table_goes_are_refused_and_their_targets_untouched(tmp_path, capsys):
    fake_run(tmp_path, "0", ["optim.lr=1"], {"status": "completed"}, [5.0])
    outside = tmp_path.parent / f"{tmp_path.name}-startup.pth"
    outside.write_text("precious\n")
    (tmp_path / "sweep_results.csv").symlink_to(outside)
    with pytest.raises(SystemExit) as stopped:
        sweep_main([str(tmp_path)])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"{tmp_path / 'sweep_results.csv'} is a link" in error
    assert outside.read_text() == "precious\n" and not (tmp_path / "sweep_results.md").exists()


def test_what_run_folders_say_is_quoted_and_cannot_add_rows_or_markup(tmp_path):
    evil = "model.n_embd=32|x\n| injected | row |"
    fake_run(tmp_path, "0", [evil, "seed=1"], {"status": "failed\n# heading", "error": "boom\n<img src=x>"}, [5.0])
    fake_run(tmp_path, "1", ["model.n_embd=64", "seed=2"], {"status": "completed"}, [4.0])
    assert sweep_main([str(tmp_path)]) == 1
    lines = (tmp_path / "sweep_results.md").read_text().splitlines()
    assert len(lines) == 4 and all(line.startswith("| ") and line.endswith(" |") for line in lines[2:])
    assert "`model.n_embd=32\\|x \\| injected \\| row \\| seed=1`" in lines[3]
    assert "| unknown |" in lines[3] and "`boom <img src=x>`" in lines[3]  # a status no run writes is not trusted


def test_grid_preset_expands_to_the_documented_eight_runs_and_each_composes(make_config):
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    def jobs(overrides: list[str]) -> set[frozenset[str]]:
        [batch] = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(overrides), None)
        return {frozenset(job) for job in batch}

    from hydra.core.hydra_config import HydraConfig

    cfg = make_config("sweep=grid")  # the preset composes with the rest of the config
    assert cfg.callbacks.model_checkpoint.save_top_k == 1  # keep_final: the final checkpoint only
    preset = [f"{key}={value}" for key, value in HydraConfig.get().sweeper.params.items()]
    readme = ["model.n_embd=384,768", "model.dropout=0.0,0.1", "optim.min_lr=6e-5,3e-5"]
    assert jobs(preset) == jobs(readme) and len(jobs(preset)) == 8
    for job in jobs(preset):
        cfg = make_config(*job)
        assert {f"model.n_embd={cfg.model.n_embd}", f"model.dropout={cfg.model.dropout}"} <= set(job)


def test_optuna_preset_runs_trials_and_reports_the_best(tmp_path):
    from omegaconf import OmegaConf

    lr_range = "optim.lr=interval(0.001,0.002)"  # the command line narrows the preset's own range
    result = run_cli("sweep=optuna", "hydra.sweeper.n_trials=2", *TINY, "model.n_embd=32", lr_range, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = sweep_dir_of(tmp_path)
    best = (sweep_dir / "optimization_results.yaml").read_text()
    assert "optim.lr" in best and "model.dropout" in best
    rows = read_table(sweep_dir)
    assert len(rows) == 2 and all(r["status"] == "completed" for r in rows)
    rates = [OmegaConf.load(sweep_dir / r["run"] / ".hydra" / "config.yaml").optim.lr for r in rows]
    assert all(0.001 <= lr <= 0.002 for lr in rates) and rates[0] != rates[1]
    assert all(checkpoint_files(sweep_dir / r["run"]) == ["step000003.ckpt"] for r in rows)  # the final one only


def test_slurm_launcher_composes_with_tasks_per_gpu(make_config):
    from hydra import compose, initialize_config_dir

    from helpers import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "hydra/launcher=slurm",
                "hydra.launcher.gpus_per_node=4",
                "hydra.launcher.nodes=2",
                "hydra.launcher.partition=gpu",
                "hydra.launcher.account=lab",
                "trainer=ddp",
            ],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 4, 4)
    assert (launcher.partition, launcher.account, launcher.signal_delay_s) == ("gpu", "lab", 120)
    assert cfg.trainer.strategy == "ddp"


@pytest.mark.slow
def test_submitit_local_executor_runs_the_sweep(tmp_path):
    result = run_cli(
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=5",
        *TINY,
        "model.n_embd=32",
        "optim.min_lr=1e-4,3e-4",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_table(sweep_dir_of(tmp_path))
    assert len(rows) == 2 and all(r["status"] == "completed" for r in rows)


def test_fsdp_preset_builds_a_strategy_that_shards_per_block(make_config):
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import FSDPStrategy

    from fineweb_gpt.model import Block

    strategy = instantiate(make_config("trainer=fsdp").trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {Block}


def metric_rows(run_dir: Path) -> dict[int, dict]:
    """Step -> that step's training metrics (train/loss, grad_norm, tokens_seen, ...)."""
    with open(run_dir / "csv" / "metrics.csv", newline="") as file:
        return {int(r["step"]): r for r in csv.DictReader(file) if r.get("train/loss")}


@pytest.mark.slow
def test_fsdp_on_two_processes_trains_like_ddp_and_resumes_exactly(tmp_path):
    import torch

    shape = [
        "hw=cpu",
        "model.n_layer=2",
        "model.n_head=2",
        "model.n_embd=32",
        "model.block_size=32",
        "hw.micro_batch_size=2",
        "total_batch_tokens=256",
        "data.val_tokens=256",
        "trainer.devices=2",
        "trainer.max_steps=6",
        "optim.warmup_steps=2",
        "val_every_steps=3",
    ]
    on_cpu = "trainer.strategy._target_=cpu_fsdp.CPUFSDPStrategy"  # tests/cpu_fsdp.py
    tests = Path(__file__).parent
    runs = {}
    for name, extra in (("ddp", ["trainer=ddp"]), ("fsdp", ["trainer=fsdp", on_cpu])):
        result = run_cli(*shape, *extra, f"hydra.run.dir={tmp_path / name}", cwd=tests)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = metric_rows(tmp_path / name)
    # Sharding changes where the sums happen, not what is computed: the same losses and norms.
    assert sorted(runs["fsdp"]) == sorted(runs["ddp"]) == [1, 2, 3, 4, 5, 6]
    for step, ddp in runs["ddp"].items():
        fsdp = runs["fsdp"][step]
        assert float(fsdp["train/loss"]) == pytest.approx(float(ddp["train/loss"]), abs=1e-4)
        assert float(fsdp["train/grad_norm"]) == pytest.approx(float(ddp["train/grad_norm"]), rel=1e-3)
        assert fsdp["data/tokens_seen"] == ddp["data/tokens_seen"] == str(step * 256)
    assert float(runs["fsdp"][6]["train/loss"]) < float(runs["fsdp"][1]["train/loss"])

    # Rank 0 writes one full checkpoint, with the plain model's keys, that resumes exactly.
    saved = tmp_path / "fsdp" / "checkpoints" / "step000003.ckpt"
    state = torch.load(saved, weights_only=True)["state_dict"]
    assert "model.blocks.1.attn.qkv.weight" in state and state["model.blocks.1.attn.qkv.weight"].shape == (96, 32)
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    (resumed / "checkpoints" / saved.name).write_bytes(saved.read_bytes())
    result = run_cli(*shape, "trainer=fsdp", on_cpu, "resume=auto", f"hydra.run.dir={resumed}", cwd=tests)
    assert result.returncode == 0, result.stderr[-3000:]
    after = metric_rows(resumed)
    assert sorted(after) == [4, 5, 6]
    for step in after:
        for key in ("train/loss", "train/grad_norm", "data/tokens_seen"):
            assert after[step][key] == runs["fsdp"][step][key]


@pytest.mark.parametrize(
    "overrides, culprit",
    [
        (["hw=cpu", "trainer.devices=2"], "on the CPU; use trainer=ddp trainer.devices=2"),
        (["hw=cpu", "trainer.strategy._target_=cpu_fsdp.CPUFSDPStrategy", "trainer.devices=1"], "1 process"),
    ],
)
def test_fsdp_that_cannot_shard_is_refused_in_one_line(make_config, overrides, culprit):
    from fineweb_gpt.errors import ConfigError
    from fineweb_gpt.training import train

    with pytest.raises(ConfigError, match=culprit) as error:
        train(make_config("trainer=fsdp", *overrides))
    assert "\n" not in str(error.value)


def test_sweep_runs_are_separate_wandb_runs_grouped_by_the_sweep(tmp_path):
    result = run_cli(
        "-m", *TINY, "model.n_embd=32", "optim.min_lr=1e-4,3e-4", "logger=wandb", "logger.offline=true", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = sweep_dir_of(tmp_path)
    run_files = sorted(sweep_dir.glob("*/wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 2 and len({f.name for f in run_files}) == 2  # two runs, two ids
    group = str(sweep_dir.relative_to(tmp_path)).encode()
    for name, run_file in zip(("optim.min_lr=0.0001", "optim.min_lr=0.0003"), run_files):
        data = run_file.read_bytes()
        assert group in data and name.encode() in data
