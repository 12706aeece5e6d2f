"""Each architecture choice its own switch, model.arch as presets, documents that don't see each
other, and Muon with queries, keys and values orthogonalised apart: what they compute, what
they count, what they refuse, and that every preset trains, resumes, samples and evaluates."""

import json
import math
from dataclasses import replace
from functools import cache

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

from fineweb_gpt.doctor.memory import modelled_memory_gib
from fineweb_gpt.doctor.record import RunRecord, sanitized
from fineweb_gpt.errors import ConfigError
from fineweb_gpt.flops import flops_per_token, model_flops_per_token, parameter_count
from fineweb_gpt.fused_head_loss import HeadCrossEntropy
from fineweb_gpt.model import (
    ARCHITECTURE_KEYS,
    CHOICES,
    GPT,
    PRESETS,
    GPTConfig,
    KVCache,
    document_block_mask,
    flex_attention,
    resolved_model_settings,
)
from fineweb_gpt.optimization import SplitMuon
from fineweb_gpt.run.checkpoint_files import load_gpt
from fineweb_gpt.run.resume_policy import compare_with_checkpoint
from fineweb_gpt.tokenizer import END_OF_TEXT_ID, PADDED_VOCAB_SIZE
from helpers import SMALL, TESTS_DIR, run_cli

OLD_MODERN_CHECKPOINT = TESTS_DIR / "data" / "modern_checkpoint_before_switches.ckpt"

# --- presets and switches -----------------------------------------------------------------------


SWITCH_KEYS = ("norm", "mlp", "positions", "qk_norm", "tied_head", "zero_init_proj", "logit_softcap", "doc_mask")


def test_gpt2_and_modern_presets_mean_what_they_meant_before_the_switches():
    def switches(config):
        return tuple(getattr(config, key) for key in SWITCH_KEYS)

    assert switches(GPTConfig(arch="gpt2")) == ("layernorm", "gelu", "learned", False, True, False, False, False)
    assert switches(GPTConfig(arch="modern")) == ("rmsnorm", "swiglu", "rotary", True, True, False, False, False)


def test_a_switch_set_on_the_command_line_wins_over_the_preset(make_config):
    cfg = make_config("model.arch=modern", "model.mlp=relu2", "model.logit_softcap=30")
    config = GPTConfig(**cfg.model)
    assert (config.mlp, config.logit_softcap, config.norm, config.positions) == ("relu2", 30, "rmsnorm", "rotary")
    assert config.to_dict()["mlp"] == "relu2" and None not in config.to_dict().values()


def test_a_checkpoint_written_before_the_switches_loads_with_equal_logits():
    # Written by the code before this change (model_config held arch only; see its keys below).
    model, checkpoint = load_gpt(OLD_MODERN_CHECKPOINT)
    assert set(checkpoint["hyper_parameters"]["model_config"]) == {
        "block_size", "vocab_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "arch"
    }  # fmt: skip
    assert model.config == GPTConfig(block_size=8, vocab_size=64, n_layer=1, n_head=2, n_embd=16, arch="modern")
    with torch.no_grad():
        logits, _ = model(checkpoint["tokens"])
    torch.testing.assert_close(logits, checkpoint["logits"], rtol=0, atol=1e-6)


def test_resume_compares_the_models_as_resolved():
    """What resume must compare: the checkpoint's model_config and the command's model group,
    each through resolved_model_settings."""
    old = torch.load(OLD_MODERN_CHECKPOINT, weights_only=True)["hyper_parameters"]["model_config"]
    command = {**old, **{key: None for key in PRESETS["modern"]}}  # the model group as composed: switches null
    checkpoint_settings = {"model": resolved_model_settings(old)}
    compare_with_checkpoint(checkpoint_settings, {"model": resolved_model_settings(command)}, "old.ckpt", 1)
    with pytest.raises(ConfigError, match=r"with model\.mlp=gelu \(the checkpoint has swiglu\): a checkpoint's"):
        changed = {"model": resolved_model_settings({**command, "mlp": "gelu"})}
        compare_with_checkpoint(checkpoint_settings, changed, "old.ckpt", 1)
    # The same switches by another preset's name are the same weights: only the name differs.
    same_weights = resolved_model_settings({**old, "arch": "gpt2", **PRESETS["modern"]})
    assert [k for k in ARCHITECTURE_KEYS if same_weights[k] != checkpoint_settings["model"][k]] == ["arch"]


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(mlp="geglu"), "model.mlp=geglu is not known; use model.mlp=gelu, model.mlp=swiglu or model.mlp=relu2"),
        (dict(norm="batchnorm"), "model.norm=batchnorm is not known; use model.norm=layernorm or model.norm=rmsnorm"),
        (dict(qk_norm="yes"), "model.qk_norm=yes must be true or false"),
        (dict(logit_softcap=0), "model.logit_softcap=0 must be a positive number such as 15, or false for none"),
        (dict(logit_softcap=True), "model.logit_softcap=true must be a positive number"),
        (dict(arch="modern", bias=True), "model.bias=true with model.norm=rmsnorm (model.arch=modern's): RMSNorm has"),
        (dict(norm="layernorm", mlp="swiglu", bias=True), "model.bias=true with model.mlp=swiglu: the SwiGLU MLP"),
        (dict(positions="rotary", n_embd=36, n_head=4), "model.positions=rotary rotates pairs of dimensions"),
        (dict(arch="llama"), "model.arch='llama' is not known; use model.arch=gpt2, model.arch=modern or model.arch"),
    ],
)
def test_a_setting_or_combination_that_cannot_work_is_refused_in_one_line(settings, message):
    with pytest.raises(ConfigError) as refused:
        GPTConfig(**settings)
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)


def test_a_combination_typed_on_the_command_line_is_refused_by_the_plan(make_config):
    from fineweb_gpt.plan import plan_run

    with pytest.raises(ConfigError) as refused:
        plan_run(make_config(*SMALL, "model.arch=modern", "model.bias=true"), {"hw": "cpu"})
    assert str(refused.value) == (
        "model.bias=true with model.norm=rmsnorm (model.arch=modern's): RMSNorm has no bias; set model.bias=false, "
        "or model.norm=layernorm"
    )


# --- one count for every switch ----------------------------------------------------------------

SWITCH_VALUES = {
    **{key: st.sampled_from(choices) for key, choices in CHOICES.items()},
    **{key: st.booleans() for key in ("qk_norm", "tied_head", "zero_init_proj", "doc_mask")},
    "logit_softcap": st.sampled_from([False, 15.0]),
    "arch": st.sampled_from(sorted(PRESETS)),
}


@st.composite
def small_configs(draw) -> GPTConfig:
    n_head = draw(st.integers(1, 4))
    chosen = {key: draw(st.one_of(st.none(), values)) for key, values in SWITCH_VALUES.items()}
    chosen["arch"] = chosen["arch"] or "gpt2"
    config = dict(
        n_layer=draw(st.integers(1, 3)),
        n_head=n_head,
        n_embd=n_head * 2 * draw(st.integers(1, 6)),  # an even head size, as rotary needs
        block_size=draw(st.integers(4, 40)),
        vocab_size=draw(st.integers(50, 300)),
        bias=draw(st.booleans()),
    )
    try:
        return GPTConfig(**config, **chosen)
    except ConfigError:  # biases with RMSNorm or SwiGLU: refused (tested above)
        return GPTConfig(**{**config, "bias": False}, **chosen)


@settings(max_examples=40, deadline=None)
@given(config=small_configs())
def test_the_parameter_count_is_the_built_models_for_every_switch(config):
    model = GPT(config)
    learned = config.block_size * config.n_embd if config.positions == "learned" else 0
    # nanoGPT's count: every parameter once (a tied head is the embedding), position embeddings excluded.
    assert parameter_count(config) == sum(p.numel() for p in model.parameters()) - learned
    assert parameter_count(config, position_embedding=True) == sum(p.numel() for p in model.parameters())
    # FLOPs per token: an untied embedding table is looked up, not multiplied by.
    looked_up = 0 if config.tied_head else config.vocab_size * config.n_embd
    attention = 12 * config.n_layer * config.n_embd * 64
    assert model_flops_per_token(config, 64) == 6 * (parameter_count(config) - looked_up) + attention


def test_the_doctor_counts_a_modern_run_from_its_settings_as_built():
    # Before: the doctor's formula said 7,226,496 for the tiny modern model, built it has 7,193,984.
    settings = dict(n_layer=4, n_head=4, n_embd=128, block_size=256, arch="modern")
    run = RunRecord(sanitized({**settings, "model_name": "tiny", "qk_norm": True}))
    assert run.num_params == GPT(GPTConfig(**settings)).num_params() == 7_193_984


def test_the_memory_model_counts_an_untied_head_in_the_state():
    tied = GPTConfig(n_layer=12, n_head=12, n_embd=768)
    untied = replace(tied, tied_head=False)
    extra = modelled_memory_gib(untied, 8) - modelled_memory_gib(tied, 8)
    assert extra * 2**30 == pytest.approx(16 * PADDED_VOCAB_SIZE * 768)  # weights, gradients, two moments
    assert flops_per_token(parameter_count(tied), 12, 12, 768, 1024) == model_flops_per_token(untied, 1024)


@pytest.mark.parametrize(
    "switches, measured_extra_gib",
    [  # peaks of the presets over gpt2's, measured apart from the single switches the model adds up
        (dict(arch="modern"), 2.07),
        (dict(arch="speedrun", tied_head=False, zero_init_proj=True, logit_softcap=15.0, doc_mask=True), 4.06),
    ],
)
def test_the_memory_model_adds_what_the_switches_were_measured_to_add(switches, measured_extra_gib):
    gpt2 = GPTConfig(n_layer=12, n_head=12, n_embd=768)
    model = GPTConfig(n_layer=12, n_head=12, n_embd=768, **switches)
    extra = modelled_memory_gib(model, 8) - modelled_memory_gib(gpt2, 8)
    assert extra == pytest.approx(measured_extra_gib, abs=0.2)
    # Twice the micro-batch: the state stays, the activations the switches add double.
    state = (parameter_count(model, position_embedding=True) - parameter_count(gpt2, position_embedding=True)) * 16
    extra_at_16 = modelled_memory_gib(model, 16) - modelled_memory_gib(gpt2, 16)
    assert extra_at_16 - state / 2**30 == pytest.approx(2 * (extra - state / 2**30))
    # Compiled, the capped logits are never whole and FlexAttention needs no boolean mask.
    capped = replace(gpt2, logit_softcap=15.0, doc_mask=True)
    assert modelled_memory_gib(capped, 8, compiled=True) == modelled_memory_gib(gpt2, 8, compiled=True)
    assert modelled_memory_gib(capped, 8) > modelled_memory_gib(gpt2, 8) + 0.9


# --- documents that don't see each other --------------------------------------------------------

WINDOW = 24


@cache
def doc_gpt(seed: int = 0, **switches) -> GPT:
    """A small GPT with all its weights away from their initial values (tests only read it)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=WINDOW, n_layer=2, n_head=2, n_embd=32, **switches)).eval()
    with torch.no_grad():  # zero-initialised projections would hide what attention sees
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.05)
    return model


def window_of(lengths: list[int], seed: int) -> torch.Tensor:
    """One packed window: documents of these lengths, each after the first opened by the separator."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, END_OF_TEXT_ID, (sum(lengths),), generator=generator)
    starts = torch.tensor(lengths[:-1], dtype=torch.long).cumsum(0)
    tokens[starts] = END_OF_TEXT_ID
    return tokens[None]


@settings(max_examples=15, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 10), min_size=2, max_size=4).filter(lambda ls: sum(ls) <= WINDOW),
    positions=st.sampled_from(["learned", "rotary"]),
    seed=st.integers(0, 1000),
)
def test_a_later_document_does_not_see_an_earlier_one(lengths, positions, seed):
    masked, unmasked = doc_gpt(doc_mask=True, positions=positions), doc_gpt(doc_mask=False, positions=positions)
    window = window_of(lengths, seed)
    changed = window.clone()
    first = lengths[0]  # the first document: its own tokens, not the separator after it
    changed[0, :first] = (window[0, :first] + 1 + torch.arange(first)) % END_OF_TEXT_ID
    later = slice(first, None)  # the separator opens the next document, and everything after it
    with torch.no_grad():
        torch.testing.assert_close(masked(changed)[0][:, later], masked(window)[0][:, later], rtol=0, atol=1e-6)
        assert not torch.allclose(unmasked(changed)[0][:, later], unmasked(window)[0][:, later], atol=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "modern"])
def test_with_one_document_per_window_the_mask_changes_nothing(arch):
    masked, unmasked = doc_gpt(arch=arch, doc_mask=True), doc_gpt(arch=arch, doc_mask=False)
    one_document = torch.cat([window_of([WINDOW], seed=1), window_of([WINDOW], seed=2)])
    opened = one_document.clone()
    opened[:, 0] = END_OF_TEXT_ID  # a window that starts with a document's separator holds that document only
    for window in (one_document, opened):
        (logits, loss), (expected_logits, expected_loss) = (
            model(window[:, :-1], window[:, 1:]) for model in (masked, unmasked)
        )
        torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
        assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-6)


def test_generation_with_the_cache_keeps_documents_apart():
    model = doc_gpt(arch="modern", doc_mask=True)
    window = window_of([7, 9, 8], seed=3)  # separators at 7 and 16: some in the prompt, one generated
    with torch.no_grad():
        full = model.hidden_states(window)
        caches = [KVCache(WINDOW) for _ in model.blocks]
        pieces = [model.hidden_states(window[:, :10], caches)]
        pieces += [model.hidden_states(window[:, t : t + 1], caches) for t in range(10, WINDOW)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(flex_attention is None, reason="FlexAttention needs torch 2.5 or newer")
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_block_mask_sees_what_the_explicit_mask_sees():
    # FlexAttention (CUDA, compiled training) and the boolean mask (everywhere else) must agree.
    # On the CPU torch runs FlexAttention's forward unfused, which is enough to check the mask.
    torch.manual_seed(0)
    documents = (window_of([50, 90, 60, 56], seed=0) == END_OF_TEXT_ID).long().cumsum(1).repeat(2, 1)
    q, k, v = (torch.randn(2, 2, 256, 16) for _ in range(3))
    with torch.no_grad():
        flex = flex_attention(q, k, v, block_mask=document_block_mask(documents))
    visible = torch.ones(256, 256, dtype=torch.bool).tril() & (documents[:, :, None] == documents[:, None, :])
    torch.testing.assert_close(flex, F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None]))


def test_the_fused_head_loss_follows_the_soft_cap():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = (3 * torch.randn(97, 16)).requires_grad_()  # logits well past the cap of 5
    targets = torch.randint(0, 97, (37,))
    loss = HeadCrossEntropy.apply(hidden, weight, targets, 10, 5.0)
    loss.backward()
    fused_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    expected = F.cross_entropy(5.0 * torch.tanh((hidden @ weight.t()) / 5.0), targets)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(fused_grads[0], hidden.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_grads[1], weight.grad, rtol=1e-5, atol=1e-6)


def test_an_untied_zero_head_starts_every_prediction_uniform_and_learns():
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32, tied_head=False, zero_init_proj=True))
    assert model.lm_head.weight is not model.token_embedding.weight and not model.lm_head.weight.any()
    assert not model.blocks[0].attn.out_proj.weight.any() and not model.blocks[0].mlp.down.weight.any()
    tokens = torch.randint(0, 50257, (2, 17))
    _, loss = model(tokens[:, :-1], tokens[:, 1:])
    assert loss.item() == pytest.approx(math.log(PADDED_VOCAB_SIZE), abs=1e-5)
    loss.backward()
    assert model.lm_head.weight.grad.abs().sum() > 0


# --- Muon: queries, keys and values apart --------------------------------------------------------


def muon_steps(optimizer_for, gradients: list[torch.Tensor], start: torch.Tensor) -> torch.Tensor:
    weight = torch.nn.Parameter(start.clone())
    optimizer = optimizer_for(weight)
    for gradient in gradients:
        weight.grad = gradient.clone()
        optimizer.step()
    return weight.detach()


def test_muon_orthogonalises_the_stacked_query_key_value_matrix_as_three():
    torch.manual_seed(0)
    C = 32
    start = torch.randn(3 * C, C) * 0.02
    # A large query gradient, small key and value ones: as after the head's first updates.
    gradients = [torch.cat([torch.randn(C, C), 0.01 * torch.randn(C, C), 0.01 * torch.randn(C, C)]) for _ in range(2)]
    split = muon_steps(lambda w: SplitMuon([w], splits={w: 3}, lr=0.02, weight_decay=0.0), gradients, start)
    whole = muon_steps(lambda w: torch.optim.Muon([w], lr=0.02, weight_decay=0.0), gradients, start)

    # Split: exactly torch's Muon on three separate C x C parameters.
    apart = [
        muon_steps(lambda w: torch.optim.Muon([w], lr=0.02, weight_decay=0.0), [g.chunk(3)[i] for g in gradients], s)
        for i, s in enumerate(start.chunk(3))
    ]
    assert torch.equal(split, torch.cat(apart))

    # Orthogonalised apart, the keys get an update of the queries' size; orthogonalised whole, the
    # stack's largest singular directions are the queries', and the keys get a fraction of that.
    def size(weight, block):  # root mean square of a block's update
        return (weight - start)[block * C : (block + 1) * C].pow(2).mean().sqrt()

    assert size(split, 1) > 0.5 * size(split, 0) and size(split, 2) > 0.5 * size(split, 0)
    assert size(whole, 1) < 0.2 * size(whole, 0) and size(whole, 2) < 0.2 * size(whole, 0)


# --- every preset through the command line and back ----------------------------------------------


# The speedrun's own set of switches, typed on the real command line (with Muon); modern in-process.
PRESET_RUNS = {
    "speedrun, the speedrun's own switches, muon": [
        "model.arch=speedrun",
        "model.tied_head=false",
        "model.zero_init_proj=true",
        "model.logit_softcap=30",
        "model.doc_mask=true",
        "optim=muon",
    ],
    "modern": ["model.arch=modern"],
}


@pytest.mark.parametrize("overrides", PRESET_RUNS.values(), ids=PRESET_RUNS.keys())
def test_a_preset_trains_resumes_samples_and_evaluates(make_config, tmp_path, overrides):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from fineweb_gpt.evaluate import evaluate
    from fineweb_gpt.sample import generate_samples, load_model
    from fineweb_gpt.tokenizer import gpt2_tokenizer
    from fineweb_gpt.train import main
    from helpers import CONF_DIR

    run_dir = tmp_path / "run"
    command = [*SMALL, *overrides, "trainer.max_steps=2", "val_every_steps=2", f"hydra.run.dir={run_dir}"]
    if "optim=muon" in overrides:  # through the real command line
        done = run_cli(*command, cwd=TESTS_DIR)
        assert done.returncode == 0, done.stderr[-3000:]
    else:
        cfg = make_config(*command)
        cfg.run_dir = str(run_dir)
        assert math.isfinite(main(cfg))
    pairs = (override.split("=") for override in overrides)
    switches = {key.removeprefix("model."): yaml.safe_load(value) for key, value in pairs if key.startswith("model.")}
    config = GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=32, **switches)
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert {key: summary[key] for key in config.to_dict()} == config.to_dict()  # the resolved switches
    assert summary["num_params"] == GPT(config).num_params()

    # One more step under the same command: the resolved settings match the checkpoint's.
    resumed = make_config(*command, "trainer.max_steps=3", "val_every_steps=3", "resume=auto")
    resumed.run_dir = str(run_dir)
    assert math.isfinite(main(resumed))
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, weights_only=True, map_location="cpu")["global_step"] == 3

    model = load_model(checkpoint)
    assert model.config == config
    (sample,) = generate_samples(model, gpt2_tokenizer(), "The", num_samples=1, max_new_tokens=8, top_k=5)
    assert sample.startswith("The") and len(gpt2_tokenizer().encode(sample)) == 9

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        result, _ = evaluate(compose("eval", overrides=[f"ckpt={checkpoint}", "data.val_tokens=256"]))
    final = json.loads((run_dir / "result.json").read_text())["final_val_loss"]
    assert result["loss"] == pytest.approx(final, abs=1e-5)  # evaluation scores what training validated
