"""Hugging Face out and in, tested against transformers and lm-evaluation-harness as they really
behave, offline: equal logits and greedy text for both architectures, GPT-2's token ids from the
exported tokenizer, an exact round trip through init_from, and the issue's path from a fresh
clone through the command line (train -> score HellaSwag -> export -> transformers and lm-eval ->
train again from the export)."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fake_hub import accepting_uploads, serving
from fineweb_gpt.errors import ConfigError
from fineweb_gpt.evals.hellaswag import encode_example, ending_losses, read_examples, score_examples, synthetic_examples
from fineweb_gpt.export import (
    OUR_FILE,
    apply_init_from,
    export_checkpoint,
    initial_weights,
    transformers_model,
    transformers_tokenizer,
)
from fineweb_gpt.model import GPT, GPTConfig
from fineweb_gpt.run.checkpoint_files import load_gpt
from fineweb_gpt.run.names import METRICS_FILE
from fineweb_gpt.run.run_files import read_metrics
from fineweb_gpt.tokenizer import END_OF_TEXT, encode_text
from helpers import SMALL, TESTS_DIR, cli_env, run_cli
from test_hellaswag import write_published

SHAPE = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32}


def random_gpt(arch: str, bias: bool = False, seed: int = 0) -> GPT:
    """A small GPT whose norms and biases are not at their initial ones and zeros, so that a
    weight put in the wrong place, or left out, shows in the logits."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**SHAPE, arch=arch, bias=bias)).eval()
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "ln" in name or "norm" in name or name.endswith("bias"):
                weight.add_(0.2 * torch.randn_like(weight))
    return model


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    transformers_tokenizer(1024).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def exported_tokenizer(tokenizer_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_folder)


@pytest.mark.parametrize("arch, bias", [("gpt2", False), ("gpt2", True), ("modern", False)])
def test_the_saved_folder_gives_our_logits_and_greedy_text(arch, bias, tmp_path, tokenizer_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = random_gpt(arch, bias)
    transformers_model(model).save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(loaded).__name__ == {"gpt2": "GPT2LMHeadModel", "modern": "Qwen3ForCausalLM"}[arch]
    idx = torch.randint(0, 50257, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(idx)[0][..., :50257], loaded(input_ids=idx).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=3e-5)

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    prompt = tokenizer("The meaning of life is", return_tensors="pt").input_ids
    ours = model.generate(prompt, max_new_tokens=12, top_k=1)
    theirs = loaded.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=50256)
    assert tokenizer.decode(theirs[0]) == tokenizer.decode(ours[0])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200))
def test_the_exported_tokenizer_gives_our_token_ids(exported_tokenizer, text):
    ids = exported_tokenizer(text, add_special_tokens=False).input_ids
    if END_OF_TEXT not in text:
        assert ids == encode_text(text).tolist()
    assert exported_tokenizer.decode(ids) == text


WEB_TEXT = [
    "Posted by admin on March 3, 2019 — 12 comments\n\nThe café's naïve menu costs $4.50 (or €4).",
    "def f(x):\n    return x ** 2  # squares\n\t\ttabs   and   spaces  ",
    "日本語のテキストと emoji 🎉🎉 mixed with ASCII... <|endoftext|> inside a page",
]


def test_the_exported_tokenizer_on_web_text(exported_tokenizer):
    from fineweb_gpt.tokenizer import gpt2_tokenizer

    tokenizer = exported_tokenizer
    assert (tokenizer.eos_token, tokenizer.eos_token_id, len(tokenizer)) == (END_OF_TEXT, 50256, 50257)
    for text in WEB_TEXT:
        # A page quoting <|endoftext|> gets the special token from transformers, as from tiktoken's allowed_special.
        assert tokenizer(text).input_ids == gpt2_tokenizer().encode(text, allowed_special="all")


@pytest.mark.parametrize("arch", ["gpt2", "modern"])
def test_export_then_init_from_gives_back_the_same_weights(arch, tmp_path):
    from helpers import lightning_module

    model = random_gpt(arch)
    ckpt = save_checkpoint(model, tmp_path / "run" / "checkpoints" / "last.ckpt")
    out, difference = export_checkpoint(ckpt, tmp_path / "exported")
    assert difference < 3e-5
    settings = apply_init_from({"dropout": 0.1}, str(out))
    assert settings == {**model.config.to_dict(), "dropout": 0.1}
    weights = initial_weights(str(out), GPTConfig(**settings))
    ours = model.state_dict()
    assert weights.keys() == ours.keys()
    for name, weight in ours.items():
        torch.testing.assert_close(weights[name], weight, rtol=0, atol=0, msg=name)
    assert lightning_module(settings).model.load_state_dict(weights)  # loads as a run's model does


def test_a_gpt2_saved_by_transformers_starts_a_run_with_equal_logits(tmp_path):
    """A GPT-2 folder as transformers writes one (with biases, vocabulary 50,257): the settings and
    the weights come from it, as for init_from=gpt2, here served by a fake Hub."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(3)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, activation_function="gelu_new")
    theirs = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, weight in theirs.named_parameters():
            if "ln" in name or name.endswith("bias"):
                weight.add_(0.2 * torch.randn_like(weight))
    folder = tmp_path / "hub"
    theirs.save_pretrained(folder)
    with serving(folder, tmp_path / "requests.log"):
        settings = apply_init_from({"dropout": 0.0}, "gpt2")
        expected = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 64, "bias": True, "vocab_size": 50257}
        assert {key: settings[key] for key in expected} == expected and settings["arch"] == "gpt2"
        ours = GPT(GPTConfig(**settings)).eval()
        ours.load_state_dict(initial_weights("gpt2", ours.config))
    idx = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        # gelu_new is GELU's tanh form, ours the exact one: they differ by about 1e-3 at most.
        torch.testing.assert_close(ours(idx)[0], theirs(input_ids=idx).logits, rtol=0, atol=2e-3)
        theirs.config.activation_function = "gelu"
        for block in theirs.transformer.h:
            block.mlp.act = torch.nn.GELU()
        torch.testing.assert_close(ours(idx)[0], theirs(input_ids=idx).logits, rtol=0, atol=3e-5)


def test_the_switches_transformers_cannot_compute_are_refused_and_training_only_ones_export(tmp_path):
    refused = {
        ("speedrun", ()): "model.arch=speedrun has no exact counterpart in transformers",
        ("gpt2", (("mlp", "relu2"),)): "model.mlp='relu2' has no exact counterpart",
        ("modern", (("tied_head", False),)): "model.tied_head=False has no exact counterpart",
        ("gpt2", (("logit_softcap", 15.0),)): "model.logit_softcap=15.0 has no exact counterpart",
    }
    for (arch, switches), message in refused.items():
        model = GPT(GPTConfig(**SHAPE, arch=arch, **dict(switches)))
        with pytest.raises(ConfigError, match=message):
            transformers_model(model)
    # A model trained with documents masked apart and zero-initialised projections computes, on one
    # document, what the unmasked transformers model does.
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SHAPE, arch="modern", doc_mask=True, zero_init_proj=True)).eval()
    with torch.no_grad():
        for weight in model.parameters():
            weight.add_(0.02 * torch.randn_like(weight))
    idx = torch.randint(0, 50256, (2, 32), generator=torch.Generator().manual_seed(1))  # no <|endoftext|>
    with torch.no_grad():
        ours, theirs = model(idx)[0][..., :50257], transformers_model(model)(input_ids=idx).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=3e-5)


def test_init_from_refuses_model_settings_that_disagree(tmp_path, make_config):
    from fineweb_gpt.export import use_init_from

    model = random_gpt("gpt2")
    out, _ = export_checkpoint(save_checkpoint(model, tmp_path / "x.ckpt"), tmp_path / "exported")
    cases = {
        ("model.n_layer=3",): "init_from=.* has model.n_layer=2 but the command sets model.n_layer=3",
        ("model=124m",): "init_from=.* has model.block_size=32 but model=124m sets model.block_size=1024",
    }
    run = [o for o in SMALL if not o.startswith("model.")]
    for overrides, message in cases.items():
        cfg = make_config(*run, f"init_from={out}", *overrides)
        with pytest.raises(ConfigError, match=message):
            use_init_from(cfg)
    cfg = make_config(*run, f"init_from={out}", "model.dropout=0.2", "model.n_layer=2")  # agrees: kept
    choices = use_init_from(cfg)
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.dropout) == (2, 32, 0.2)
    assert choices["model"] == f"init_from={out}"
    with pytest.raises(ConfigError, match="is not a transformers folder"):
        use_init_from(make_config(*run, f"init_from={tmp_path}"))


def test_push_to_hub_commits_the_folder_as_written(tmp_path, monkeypatch):
    from fineweb_gpt.errors import UserError

    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    ckpt = save_checkpoint(random_gpt("modern"), tmp_path / "x.ckpt")
    with accepting_uploads() as committed:
        out, _ = export_checkpoint(ckpt, tmp_path / "exported", push_to_hub="someone/tiny-gpt")
    assert committed == {f.name: f.read_bytes() for f in out.iterdir()}
    assert 'from_pretrained("someone/tiny-gpt")' in committed["README.md"].decode()
    with accepting_uploads(refuse=401), pytest.raises(UserError, match="push_to_hub=someone/tiny-gpt failed") as raised:
        export_checkpoint(ckpt, tmp_path / "again", push_to_hub="someone/tiny-gpt")
    assert f"{tmp_path / 'again'} is written" in str(raised.value) and (tmp_path / "again" / "config.json").is_file()


def test_a_second_export_replaces_the_first_and_nothing_else_is_written_over(tmp_path):
    first = save_checkpoint(random_gpt("gpt2", seed=1), tmp_path / "first.ckpt")
    second = save_checkpoint(random_gpt("gpt2", seed=2), tmp_path / "second.ckpt")
    out, _ = export_checkpoint(first, tmp_path / "exported")
    export_checkpoint(second, out)
    assert json.loads((out / OUR_FILE).read_text())["checkpoint"] == str(second.resolve())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "first.ckpt", "second.ckpt"]  # no leftovers
    (tmp_path / "link").symlink_to(out)
    with pytest.raises(ConfigError, match="is a link"):
        export_checkpoint(first, tmp_path / "link")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="exists and is not an earlier export"):
        export_checkpoint(first, other)
    assert json.loads((out / OUR_FILE).read_text())["checkpoint"] == str(second.resolve())
    assert (other / "notes.txt").read_text() == "mine"


def test_without_the_hf_extra_export_and_init_from_name_it(tmp_path, make_config, monkeypatch):
    ckpt = save_checkpoint(random_gpt("gpt2"), tmp_path / "x.ckpt")
    blocked = "import sys; sys.modules['transformers'] = None; from fineweb_gpt.export import main; sys.exit(main())"
    done = run_command(sys.executable, "-c", blocked, f"ckpt={ckpt}", f"out={tmp_path / 'out'}", cwd=tmp_path)
    assert done.returncode == 2 and not (tmp_path / "out").exists()
    assert done.stderr.strip().splitlines() == [
        "error: fineweb-gpt-export needs the Hugging Face libraries (transformers is not installed): "
        'pip install "fineweb_gpt[hf]"'
    ]
    from fineweb_gpt.export import use_init_from

    monkeypatch.setitem(sys.modules, "safetensors", None)
    with pytest.raises(ConfigError, match=r"init_from=gpt2 needs .*safetensors is not installed.*fineweb_gpt\[hf\]"):
        use_init_from(make_config(*[o for o in SMALL if not o.startswith("model.")], "init_from=gpt2"))


def save_checkpoint(model: GPT, path: Path) -> Path:
    from test_hellaswag import save_checkpoint as save

    path.parent.mkdir(parents=True, exist_ok=True)
    return save(model, path)


# --- the path from a fresh clone, through the command line ----------------------------------

STEPS = 2
RUN = [*SMALL, f"trainer.max_steps={STEPS}", f"val_every_steps={STEPS}", "latest_link=null"]


def run_command(*command: str, cwd: Path):
    import subprocess

    return subprocess.run(list(command), cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=600)


def console_script(name: str) -> list[str]:
    """The installed console script, or (installed before it existed) its entry point run the same way."""
    installed = shutil.which(name)
    if installed:
        return [installed]
    module, function = {"fineweb-gpt-export": ("fineweb_gpt.export", "main")}[name]
    return [sys.executable, "-c", f"import sys; from {module} import {function}; sys.exit({function}())"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """The quickstart, small: 2 steps with HellaSwag (a file in the published format) at step 2."""
    root = tmp_path_factory.mktemp("path")
    # Endings that fit the 32-token block (lm-eval refuses longer ones; contexts are cut by both alike).
    fits = [e for e in synthetic_examples(64, seed=2) if all(len(encode_text(" " + x)) <= 31 for x in e.endings)]
    hellaswag = write_published(root / "hellaswag_val.jsonl", fits[:16])
    run_dir = root / "first"
    extra = [f"eval.hellaswag_every_steps={STEPS}", f"eval.hellaswag_path={hellaswag}", "eval.samples=2"]
    done = run_cli(*RUN, *extra, f"hydra.run.dir={run_dir}", cwd=TESTS_DIR)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"root": root, "run_dir": run_dir, "hellaswag": hellaswag, "log": done.stderr + done.stdout}


def test_hellaswag_in_training_is_logged_at_its_step(trained):
    rows = read_metrics(trained["run_dir"] / METRICS_FILE)
    scored = [row for row in rows if "eval/hellaswag_acc_norm" in row]
    model, _ = load_gpt(trained["run_dir"] / "checkpoints" / "last.ckpt")  # the weights of step 2
    expected = score_examples(model, read_examples(trained["hellaswag"]))
    assert [row["step"] for row in scored] == [STEPS]
    row = scored[0]
    assert (row["eval/hellaswag_acc"], row["eval/hellaswag_acc_norm"]) == (expected.acc, expected.acc_norm)
    assert row["eval/hellaswag_examples"] == 16 and row["data/tokens_seen"] == STEPS * 256
    assert (
        f"step {STEPS}/{STEPS}: HellaSwag acc_norm {expected.acc_norm:.4f} (acc {expected.acc:.4f})" in trained["log"]
    )
    samples = [json.loads(line) for line in (trained["run_dir"] / "samples.jsonl").read_text().splitlines()]
    assert [(s["step"], s["sample"]) for s in samples] == [(STEPS, 0), (STEPS, 1)]
    assert all(s["text"].startswith("Hello, I'm a language model,") for s in samples)
    # Its time is kept apart from the step's (tests/test_hellaswag.py checks that it is left out of it).
    assert row["eval/hellaswag_time_ms"] > 0


def test_score_export_load_evaluate_and_train_again(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    ckpt = trained["run_dir"] / "checkpoints" / "last.ckpt"
    # Score HellaSwag on the published file: the same figures the run logged at that step.
    done = run_command(
        sys.executable,
        "-m",
        "fineweb_gpt.evaluate",
        f"ckpt={ckpt}",
        "task=hellaswag",
        f"hellaswag.path={trained['hellaswag']}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    scored = json.loads(ckpt.with_name("last.hellaswag.json").read_text())
    logged = [row for row in read_metrics(trained["run_dir"] / METRICS_FILE) if "eval/hellaswag_acc" in row][-1]
    assert (scored["acc"], scored["acc_norm"]) == (logged["eval/hellaswag_acc"], logged["eval/hellaswag_acc_norm"])

    # Export through the console script, from another folder.
    out = tmp_path / "exported"
    done = run_command(*console_script("fineweb-gpt-export"), f"ckpt={ckpt}", f"out={out}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith(f"GPT2LMHeadModel (step {STEPS}) -> {out}")
    card = (out / "README.md").read_text()
    assert f"acc_norm {scored['acc_norm']:.4f}" in card and f"{STEPS} optimizer steps" in card
    assert "python -m fineweb_gpt.train hw=cpu" in card and "the bundled sample" in card

    # transformers loads it with no project code: the checkpoint's logits.
    model, _ = load_gpt(ckpt)
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    idx = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=idx).logits, model(idx)[0][..., :50257], rtol=0, atol=3e-5)

    # lm-evaluation-harness on the same examples as a local task: its acc is ours, example by example.
    examples = read_examples(trained["hellaswag"])
    samples = lm_eval_samples(out, trained["hellaswag"], tmp_path / "tasks")
    ours = score_examples(model, examples)
    assert [s["acc"] for s in samples] == [float(ours.chosen[i] == e.label) for i, e in enumerate(examples)]
    summed, _ = ending_losses(model, [encode_example(e, model.config.block_size) for e in examples], "cpu")
    likelihoods = torch.tensor([[r[0] for r in s["filtered_resps"]] for s in samples])
    torch.testing.assert_close(likelihoods, -summed, rtol=0, atol=1e-3)

    # Train again from the export: its step-0 evaluation is the first run's last.
    again = tmp_path / "again"
    done = run_cli(*RUN, f"init_from={out}", "trainer.max_steps=1", f"hydra.run.dir={again}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    first = [row["val/loss"] for row in read_metrics(trained["run_dir"] / METRICS_FILE) if "val/loss" in row]
    second = [row["val/loss"] for row in read_metrics(again / METRICS_FILE) if "val/loss" in row]
    assert second[0] == pytest.approx(first[-1], abs=1e-5)
    assert json.loads((again / "run_summary.json").read_text())["model_name"] == f"init_from={out}"
    assert (out / OUR_FILE).is_file()


LOCAL_TASK = """task: hellaswag_local
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {path}
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{{{ctx}}}}"
doc_to_choice: "{{{{endings}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


def lm_eval_samples(folder: Path, data: Path, tasks: Path) -> list[dict]:
    """lm-eval's per-example results for a local HellaSwag-format task (docs/evaluate.md shows the
    command line; its Python entry skips indexing the thousands of built-in tasks)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tasks.mkdir()
    (tasks / "hellaswag_local.yaml").write_text(LOCAL_TASK.format(path=data))
    results = simple_evaluate(
        model="hf",
        model_args=f"pretrained={folder},dtype=float32",
        tasks=["hellaswag_local"],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        device="cpu",
        batch_size=8,
        log_samples=True,
    )
    return sorted(results["samples"]["hellaswag_local"], key=lambda s: s["doc_id"])
