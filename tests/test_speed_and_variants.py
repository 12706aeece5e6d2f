"""The fast path's switches and the variants that learn more per token: they must train, and
change nothing they should not (parameter counts, losses with compile on or off)."""

import io
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fineweb_gpt.errors import ConfigError
from fineweb_gpt.model import GPT, GPTConfig, KVCache
from fineweb_gpt.optimization import CombinedOptimizer
from fineweb_gpt.training import train
from helpers import CONF_DIR, SMALL  # noqa: F401

# Long enough for the variants' losses to part: two layers, 30 steps, a higher learning rate.
VARIANT_RUN = [
    *SMALL,
    "model.n_layer=2",
    "data.val_tokens=512",
    "optim.lr=3e-3",
    "optim.warmup_steps=2",
    "trainer.max_steps=30",
    "val_every_steps=30",
]


@pytest.mark.parametrize("preset", ["40m", "124m"])
def test_modern_architecture_keeps_the_presets_parameter_count(preset):
    config = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / f"{preset}.yaml"))
    gpt2 = GPT(GPTConfig(**config)).num_params()
    modern = GPT(GPTConfig(**{**config, "arch": "modern"}))
    # SwiGLU's three matrices hold what GELU's two did; only QK-norm's gains (2 x head size per layer) are new.
    assert modern.num_params() - gpt2 == config["n_layer"] * 2 * (config["n_embd"] // config["n_head"])
    assert modern.position_embedding is None  # positions come from rotation inside attention
    assert not any(name.endswith("bias") for name, _ in modern.named_parameters())


def test_modern_generation_cache_matches_the_full_forward():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=24, n_layer=2, n_head=2, n_embd=32, arch="modern")).eval()
    idx = torch.randint(0, 50257, (2, 24))
    full = model.hidden_states(idx)
    caches = [KVCache(24) for _ in model.blocks]
    pieces = [model.hidden_states(idx[:, :10], caches)] + [
        model.hidden_states(idx[:, i : i + 1], caches) for i in range(10, 24)
    ]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_rotary_scores_depend_only_on_the_distance_between_positions():
    from fineweb_gpt.model import Rotary

    torch.manual_seed(0)
    rotary = Rotary(head_size=16, block_size=64)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(query_position: int, key_position: int) -> float:
        return (rotary(q, query_position) * rotary(k, key_position)).sum().item()

    assert score(9, 4) == pytest.approx(score(40, 35), abs=1e-5)  # both 5 apart
    assert score(9, 4) != pytest.approx(score(9, 8), abs=1e-3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(arch="llama"), "model.arch='llama' is not known"),
        (dict(arch="modern", bias=True), "model.bias=true with model.norm=rmsnorm (model.arch=modern's)"),
        (dict(arch="modern", n_embd=36, n_head=4), "head size n_embd / n_head = 9 must be even"),
    ],
)
def test_bad_architecture_settings_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        GPTConfig(**kwargs)


@pytest.mark.parametrize("variant", [["model.arch=modern"], ["optim=muon"], ["model.arch=modern", "optim=muon"]])
def test_modern_and_muon_variants_train(make_config, variant):
    cfg = make_config(*VARIANT_RUN, *variant)
    final = train(cfg)
    import csv

    with open(Path(cfg.run_dir) / "csv" / "metrics.csv", newline="") as file:
        val = [float(r["val/loss"]) for r in csv.DictReader(file) if r.get("val/loss")]
    assert val[0] == pytest.approx(math.log(50304), abs=0.2)
    assert final == val[-1] < val[0] - 0.5


def muon_module_and_optimizer(seed: int):
    import lightning as L

    from helpers import lightning_module

    torch.manual_seed(seed)
    module = lightning_module(dict(block_size=8, n_layer=2, n_head=2, n_embd=16), "muon")
    module.trainer = L.Trainer(accelerator="cpu", max_steps=10, logger=False)
    return module, module.configure_optimizers()["optimizer"]


def test_muon_takes_the_block_matrices_and_adamw_the_rest(make_config):
    module, optimizer = muon_module_and_optimizer(0)
    assert isinstance(optimizer, CombinedOptimizer)
    muon, adamw = optimizer.optimizers
    muon_params = {id(p) for g in muon.param_groups for p in g["params"]}
    block_matrices = {id(p) for p in module.model.blocks.parameters() if p.dim() == 2}
    assert muon_params == block_matrices
    adamw_params = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert id(module.model.token_embedding.weight) in adamw_params and not adamw_params & muon_params
    # One scheduler reaches both.
    assert optimizer.param_groups == muon.param_groups + adamw.param_groups


def test_muon_and_adamw_state_resumes_from_a_checkpoint():
    # Two steps in a row must equal one step, a save and load into a fresh optimizer, and the
    # second step there: only if both inner optimizers' momenta came back.
    tokens = torch.randint(0, 50257, (4, 9))

    def step(module, optimizer):
        optimizer.zero_grad()
        module.model(tokens[:, :-1], tokens[:, 1:])[1].backward()
        optimizer.step()

    module, optimizer = muon_module_and_optimizer(0)
    step(module, optimizer)
    saved_weights, saved_state = io.BytesIO(), io.BytesIO()
    torch.save(module.state_dict(), saved_weights)
    torch.save(optimizer.state_dict(), saved_state)
    step(module, optimizer)

    resumed, fresh_optimizer = muon_module_and_optimizer(1)  # other weights, empty optimizer state
    step(resumed, fresh_optimizer)  # a different first step, so that only loading can make them agree
    for buffer in (saved_weights, saved_state):
        buffer.seek(0)
    resumed.load_state_dict(torch.load(saved_weights, weights_only=True))
    fresh_optimizer.load_state_dict(torch.load(saved_state, weights_only=True))
    step(resumed, fresh_optimizer)
    for name, weight in module.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], weight, rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_compile_gives_the_same_losses_on_the_cpu(make_config, tmp_path):
    """... and HellaSwag and the samples work compiled (build-nanogpt turned compile off for them)."""
    from fineweb_gpt.evals.hellaswag import synthetic_examples
    from fineweb_gpt.run.names import METRICS_FILE
    from fineweb_gpt.run.run_files import read_metrics
    from test_hellaswag import write_published

    hellaswag = write_published(tmp_path / "hellaswag_val.jsonl", synthetic_examples(8))
    losses, scored = {}, {}
    for compile_model in (False, True):
        cfg = make_config(
            *VARIANT_RUN,
            "trainer.max_steps=4",
            f"hw.compile={str(compile_model).lower()}",
            "eval.hellaswag_every_steps=2",
            f"eval.hellaswag_path={hellaswag}",
            "eval.samples=1",
        )
        cfg.run_dir = str(tmp_path / str(compile_model))
        losses[compile_model] = train(cfg)
        rows = read_metrics(Path(cfg.run_dir) / METRICS_FILE)
        scored[compile_model] = [(r["step"], r["eval/hellaswag_acc_norm"]) for r in rows if "eval/hellaswag_acc" in r]
        assert (Path(cfg.run_dir) / "samples.jsonl").read_text().count("\n") == 2  # steps 2 and 4
    assert losses[True] == pytest.approx(losses[False], abs=1e-4)
    assert [step for step, _ in scored[True]] == [step for step, _ in scored[False]] == [2, 4]
    for (_, compiled), (_, eager) in zip(scored[True], scored[False]):
        assert compiled == pytest.approx(eager, abs=1 / 8)  # the same weights, to a near tie at most


def test_where_compiling_cannot_work_the_run_says_so_once_and_trains_uncompiled(make_config, monkeypatch, caplog):
    import torch.utils._triton

    from fineweb_gpt import plan

    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: False)  # a GPU without Triton (Windows, say)
    with caplog.at_level("WARNING", logger="fineweb_gpt"):
        assert not plan.compiling_works("gpu")
    assert "Triton is not installed" in caplog.text and caplog.text.count("training uncompiled") == 1
    caplog.clear()
    monkeypatch.setattr(plan.shutil, "which", lambda name: None)  # a CPU machine without a C++ compiler
    cfg = make_config(*SMALL, "trainer.max_steps=1", "val_every_steps=1", "hw.compile=true")
    with caplog.at_level("WARNING", logger="fineweb_gpt"):
        assert math.isfinite(train(cfg))
    assert "there is no C++ compiler" in caplog.text and caplog.text.count("training uncompiled") == 1
    summary = (Path(cfg.run_dir) / "run_summary.json").read_text()
    assert '"compile": false' in summary


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: checks that training never waits for it")
@pytest.mark.parametrize("compile_model", [False, True])
def test_training_never_waits_for_the_gpu_between_micro_batches(make_config, tmp_path, compile_model):
    watched = tmp_path / "watched"
    shape = [
        a for a in VARIANT_RUN if not a.startswith(("hw=", "total_batch_tokens=", "trainer.max_steps=", "val_every"))
    ]
    cfg = make_config(
        *shape,
        "hw=auto",
        "total_batch_tokens=1024",  # 8 micro-batches of 4 x 32 per step
        "trainer.max_steps=6",
        "val_every_steps=3",
        f"hw.compile={str(compile_model).lower()}",
        "+callbacks.no_wait._target_=helpers.NoGPUWaitMidStep",
        f"+callbacks.no_wait.path={watched}",
    )
    final_val_loss = train(cfg)  # a wait mid-step raises "called a synchronizing CUDA operation"
    assert math.isfinite(final_val_loss)
    assert int(watched.read_text()) == 4 * 8  # steps 3 to 6 were watched, every micro-batch
