import csv
import math
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fineweb_gpt.errors import ConfigError
from fineweb_gpt.optimization import learning_rate
from fineweb_gpt.plan import count_devices, gradient_accumulation, plan_run
from fineweb_gpt.training import train
from helpers import CONF_DIR, SMALL, quiet_cpu_trainer, recorded_batches, run_cli


def test_accumulation_is_derived_from_the_token_budget():
    assert gradient_accumulation(524288, 8, 1024, 1) == 64
    assert gradient_accumulation(524288, 8, 1024, 4) == 16
    assert gradient_accumulation(4096, 4, 256, 1) == 4


def test_accumulation_that_cannot_divide_is_refused_with_a_valid_suggestion():
    with pytest.raises(ConfigError, match=r"total_batch_tokens=524288 .* 12 x 1024 x 1 = 12288") as err:
        gradient_accumulation(524288, 12, 1024, 1)
    suggested = int(re.search(r"use total_batch_tokens=(\d+)", str(err.value)).group(1))
    assert suggested % 12288 == 0 and abs(suggested - 524288) < 12288


def test_device_counts_follow_lightning_forms():
    assert count_devices(2, "cpu") == 2
    assert count_devices([0, 1, 3], "gpu") == 3
    assert count_devices("0,1", "gpu") == 2
    assert count_devices("auto", "cpu") == 1


def test_learning_rate_warms_up_then_decays_to_min():
    values = [learning_rate(s, 1e-3, 1e-4, warmup_steps=10, decay_steps=100) for s in range(120)]
    assert values[0] == pytest.approx(1e-4) and values[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(values[:10], values[1:10]))
    assert all(a >= b for a, b in zip(values[9:100], values[10:100]))
    assert values[55] == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-2)  # half way through the cosine
    assert values[100:] == [pytest.approx(1e-4)] * 20


def group_options():
    for group in sorted(p for p in CONF_DIR.iterdir() if p.is_dir()):
        for option in sorted(group.glob("*.yaml")):
            yield f"{group.name}={option.stem}"


@pytest.mark.parametrize("override", list(group_options()))
def test_every_config_group_option_plans_or_says_why_in_one_line(make_config, override):
    cfg = make_config(override)
    group, _, option = override.partition("=")
    try:
        plan = plan_run(cfg, {group: option})
    except ConfigError as err:  # a GPU profile on this CPU machine, a data option without its path
        assert "\n" not in str(err)
        assert "needs a CUDA GPU" in str(err) or "has no value" in str(err) or "trainer=fsdp" in str(err)
    else:
        tokens = plan["grad_accum"] * cfg.hw.micro_batch_size * cfg.data.block_size * plan["world_size"]
        assert cfg.total_batch_tokens == plan["tokens_per_step"] == tokens


def test_quickstart_defaults_compose_to_a_short_cpu_sized_run(make_config):
    cfg = make_config()
    assert cfg.total_batch_tokens == 4096 and cfg.trainer.max_steps > 0
    assert make_config("model=124m").total_batch_tokens == 524288


def test_training_steps_the_schedule_once_per_optimizer_step(make_config, tmp_path):
    cfg = make_config(*SMALL, "trainer.max_steps=3", "val_every_steps=2", "optim.warmup_steps=1")
    final_val = train(cfg)  # accumulation: 256 / (4 x 32) = 2 micro-batches per step
    assert math.isfinite(final_val)
    # Plain data only: sample and doctor load checkpoints with weights_only=True.
    checkpoint = torch.load(Path(cfg.run_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["tokenizer"]["name"] == "gpt2" and checkpoint["tokenizer"]["end_of_text_id"] == 50256
    assert checkpoint["global_step"] == 3
    assert checkpoint["lr_schedulers"][0]["last_epoch"] == 3
    assert all(state["step"] == 3 for state in checkpoint["optimizer_states"][0]["state"].values())
    expected_lr = learning_rate(3, cfg.optim.lr, cfg.optim.min_lr, 1, 3)
    assert checkpoint["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(expected_lr)
    assert checkpoint["hyper_parameters"]["model_config"]["n_embd"] == 32  # the checkpoint rebuilds its model

    with open(Path(cfg.run_dir) / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    val_losses = [float(r["val/loss"]) for r in rows if r["val/loss"]]
    assert len(val_losses) == 3  # before training, after step 2, after the last step
    assert val_losses[-1] == pytest.approx(final_val)


def test_a_warmup_longer_than_the_run_is_fitted_to_it(make_config):
    cfg = make_config(*SMALL, "trainer.max_steps=4", "val_every_steps=4", "optim.warmup_steps=200")
    train(cfg)  # warms up over a tenth of 4 steps: none
    checkpoint = torch.load(Path(cfg.run_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["optim"]["warmup_steps"] == 0
    with open(Path(cfg.run_dir) / "csv" / "metrics.csv") as f:
        rates = {int(r["step"]): float(r["train/lr"]) for r in csv.DictReader(f) if r["train/lr"]}
    assert rates == {s: pytest.approx(learning_rate(s, cfg.optim.lr, cfg.optim.min_lr, 0, 4)) for s in (1, 2, 3, 4)}


def test_fast_dev_run_through_the_command_line(tmp_path):
    result = run_cli("trainer.fast_dev_run=true", "hw=cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tiny: 7.23M parameters (nanoGPT count)" in result.stdout + result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a CUDA GPU")
def test_gpu_profile_without_gpu_stops_before_reading_data(tmp_path):
    # The data path does not exist: the hw refusal must come first, before any data is touched.
    result = run_cli("model=124m", "hw=rtx4070", "data=single_parquet", "data.path=/nowhere/x.parquet", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == "error: hw=rtx4070 needs a CUDA GPU and this machine has none; use hw=cpu (or hw=auto)"
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "outputs").exists()  # a refused command leaves no run folder


def test_missing_data_path_is_one_line(tmp_path):
    result = run_cli("data=single_parquet", "hw=cpu", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: data.path has no value")
    assert not (tmp_path / "outputs").exists()


def test_bad_input_file_is_one_line_naming_it(tmp_path):
    bad = tmp_path / "000_00000.parquet"
    bad.write_bytes(b"not parquet at all")
    result = run_cli("data=single_parquet", f"data.path={bad}", "hw=cpu", cwd=tmp_path)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {bad} is not a readable parquet file")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "outputs").exists()  # refused while the data was opened, before training


def test_the_readmes_first_run_is_what_no_arguments_plan(make_config):
    """The README's first run and summary block (on a CPU) are what the defaults plan."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    cfg = make_config("hw=cpu")
    plan = plan_run(cfg, {"model": "tiny", "hw": "cpu"})
    summary = r"([\d,]+) tokens per optimizer step = micro-batch (\d+) x block (\d+) x accumulation (\d+)"
    batch = re.search(summary, readme)
    numbers = [int(group.replace(",", "")) for group in batch.groups()]
    assert numbers == [plan["tokens_per_step"], plan["micro_batch_size"], cfg.data.block_size, plan["grad_accum"]]
    steps = int(re.search(r"plan +([\d,]+) steps", readme).group(1))
    assert steps == plan["max_steps"] and f"trains {steps}\noptimizer steps" in readme
    assert f"{plan['num_params'] / 1e6:.1f}M-parameter `tiny`" in readme


@pytest.mark.slow
def test_no_argument_run_trains_and_saves(tmp_path):
    """The README's first command, cut to 8 of its 40 steps (the whole run takes about two
    minutes on 2 CPU cores; what it plans is checked above)."""
    result = run_cli("trainer.max_steps=8", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    run_dirs = sorted(tmp_path.glob("outputs/[0-9]*/*"))
    assert len(run_dirs) == 1 and (tmp_path / "outputs" / "latest").resolve() == run_dirs[0]
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}/\d{2}-\d{2}-\d{2}", "/".join(run_dirs[0].parts[-2:]))
    assert f"Run folder: {run_dirs[0]}" in output
    assert (run_dirs[0] / "checkpoints" / "last.ckpt").is_file()

    with open(run_dirs[0] / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    train_losses = [float(r["train/loss"]) for r in rows if r["train/loss"]]
    val_losses = [float(r["val/loss"]) for r in rows if r["val/loss"]]
    assert val_losses[0] == pytest.approx(math.log(50304), abs=0.15)
    assert val_losses[-1] < val_losses[0] - 1.5  # 10.84 -> 9.10 at step 8 on 2 CPU cores
    assert sum(train_losses[-3:]) / 3 < sum(train_losses[:3]) / 3 - 1.0  # 10.69 -> 9.36


def test_every_trainer_argument_can_be_set_from_the_command_line():
    import inspect

    import lightning as L

    trainer_args = set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}
    listed = set(OmegaConf.load(CONF_DIR / "trainer" / "default.yaml")) - {"_target_"}
    # logger and callbacks come from the logger= and callbacks= groups.
    assert listed == trainer_args - {"logger", "callbacks"}


def test_gradients_are_clipped_to_the_trainer_norm():
    import lightning as L

    from helpers import lightning_module

    torch.manual_seed(0)
    module = lightning_module(dict(block_size=8, n_layer=1, n_head=1, n_embd=16), lr=1e-3)
    norms_at_step = []

    class NormAtStep(L.Callback):
        def on_train_start(self, trainer, pl_module):
            def record(optimizer, args, kwargs):
                grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
                norms_at_step.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

            trainer.optimizers[0].register_step_post_hook(record)  # grads are clipped in place

    trainer = quiet_cpu_trainer(
        max_steps=3,
        gradient_clip_val=0.05,
        callbacks=[NormAtStep()],
    )
    windows = torch.randint(0, 50257, (12, 9))
    trainer.fit(module, torch.utils.data.DataLoader(windows, batch_size=4))
    assert module.grad_norm.item() > 0.05  # the norm before clipping is what gets logged...
    assert norms_at_step == [pytest.approx(0.05, rel=1e-3)] * 3  # ...and the optimizer sees the clipped one


def test_resumed_run_trains_on_the_same_batches_as_an_uninterrupted_one(make_config, tmp_path):
    def run(name, max_steps, ckpt_path=None):
        record = tmp_path / f"{name}.txt"
        cfg = make_config(
            *SMALL,
            f"trainer.max_steps={max_steps}",
            "val_every_steps=3",
            "optim.warmup_steps=1",
            "data.num_workers=2",
            "data.rows_per_chunk=16",
            "+callbacks.recorder._target_=helpers.BatchRecorder",
            f"+callbacks.recorder.path={record}",
            f"ckpt_path={ckpt_path}" if ckpt_path else "ckpt_path=null",
        )
        cfg.run_dir = str(tmp_path / name)
        train(cfg)
        return [(step, digest) for step, digest, _, _ in recorded_batches(record)], Path(cfg.run_dir)

    uninterrupted, _ = run("uninterrupted", 8)
    first_half, first_dir = run("first", 5)
    second_half, _ = run("resumed", 8, ckpt_path=first_dir / "checkpoints" / "last.ckpt")
    assert len(uninterrupted) == 16  # 8 steps x 2 micro-batches
    assert first_half + second_half == uninterrupted


def write_shards(directory: Path, count: int) -> list[Path]:
    import pyarrow.parquet as pq

    from fineweb_gpt.data import bundled_sample_path

    sample = pq.read_table(bundled_sample_path())
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        paths.append(directory / f"{i:03d}_00000.parquet")
        pq.write_table(sample.slice(i * 200, 200), paths[-1], row_group_size=50)
    return paths


@pytest.mark.parametrize("data_args", ["single", "glob", "folder"])
def test_trains_on_user_parquet_files(make_config, tmp_path, data_args):
    shards = write_shards(tmp_path / "fineweb", 3)
    args = {
        "single": ["data=single_parquet", f"data.path={shards[0]}"],
        "glob": ["data=multi_shard", f"data.paths=['{tmp_path}/fineweb/00[0-1]_00000.parquet']"],
        "folder": ["data=multi_shard", f"data.paths=[{tmp_path}/fineweb]"],
    }[data_args]
    cfg = make_config(*SMALL, *args, "data.num_workers=2", "trainer.max_steps=2", "optim.warmup_steps=1")
    assert math.isfinite(train(cfg))
    checkpoint = torch.load(Path(cfg.run_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    streams = checkpoint["FineWebDataModule"]["positions"]
    assert sorted(streams) == [0, 1]  # both workers fed the run


def test_multi_shard_without_files_is_one_line(tmp_path):
    result = run_cli("data=multi_shard", "hw=cpu", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: no training data given")


def damage_text_pages(path: Path) -> None:
    """Scramble the middle of every text column chunk; the footer stays intact."""
    import pyarrow.parquet as pq

    metadata = pq.ParquetFile(path).metadata
    raw = bytearray(path.read_bytes())
    for group in range(metadata.num_row_groups):
        column = metadata.row_group(group).column(0)
        start = (column.dictionary_page_offset or column.data_page_offset) + 50
        for i in range(start, start + column.total_compressed_size // 2):
            raw[i] = (raw[i] * 7 + 13) % 256
    path.write_bytes(bytes(raw))


def write_damaged_sample(tmp_path: Path) -> Path:
    import pyarrow.parquet as pq

    from fineweb_gpt.data import bundled_sample_path

    path = tmp_path / "000_00000.parquet"
    pq.write_table(pq.read_table(bundled_sample_path()), path, row_group_size=100, compression="zstd")
    damage_text_pages(path)
    return path


def test_file_damaged_inside_is_reported_in_one_line(tmp_path):
    path = write_damaged_sample(tmp_path)
    result = run_cli(*SMALL, "data=single_parquet", f"data.path={path}", "data.num_workers=2", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {path} could not be read (")


def test_damage_met_by_a_dataloader_worker_keeps_its_one_line(tmp_path):
    from torch.utils.data import DataLoader

    from fineweb_gpt.data import DataSettings, TokenWindowStream, inspect_parquet
    from fineweb_gpt.errors import one_line

    path = write_damaged_sample(tmp_path)
    settings = DataSettings(32, 4, "text", 0.05, 1024, num_workers=1, rows_per_chunk=64, seed=0)
    stream = TokenWindowStream([inspect_parquet(path, "text")], settings)
    with pytest.raises(ConfigError) as raised:
        next(iter(DataLoader(stream, batch_size=None, num_workers=1)))
    assert "Original Traceback" in str(raised.value)  # what a worker's exception looks like in the trainer
    assert one_line(raised.value).startswith(f"{path} could not be read (")
