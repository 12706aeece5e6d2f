import os
import signal
import subprocess
import sys
from contextlib import contextmanager

import lightning as L
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from fineweb_gpt.model import GPT, GPTConfig, KVCache
from fineweb_gpt.sample import DEFAULTS, MAX_NEW_TOKENS, generate_samples, load_model, main
from fineweb_gpt.tokenizer import gpt2_tokenizer
from helpers import lightning_module, quiet_cpu_trainer

TEXT = "The quick brown fox jumps over the lazy dog, and the dog dreams of the sea. "
BLOCK = 32


@pytest.fixture(scope="module")
def memorised_checkpoint(tmp_path_factory):
    """A checkpoint saved by Lightning from a GPT trained until it knows TEXT by heart."""
    ids = gpt2_tokenizer().encode(TEXT * 3)
    windows = torch.tensor([ids[i : i + BLOCK + 1] for i in range(len(ids) - BLOCK - 1)])
    L.seed_everything(0)
    model_config = dict(block_size=BLOCK, n_layer=1, n_head=2, n_embd=64)
    module = lightning_module(model_config, lr=1e-2, min_lr=1e-3, warmup_steps=10)
    trainer = quiet_cpu_trainer(
        max_steps=120,
    )
    loader = DataLoader(windows, batch_size=8, shuffle=True)  # (batch, block + 1) windows, as training uses
    trainer.fit(module, loader)
    path = tmp_path_factory.mktemp("memorised") / "last.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_sampling_continues_the_memorised_text(memorised_checkpoint):
    model = load_model(memorised_checkpoint)
    prompt = "The quick brown"
    (greedy,) = generate_samples(model, gpt2_tokenizer(), prompt, num_samples=1, max_new_tokens=30, top_k=1)
    assert greedy.startswith(TEXT + "The quick brown fox")
    # Past block_size (prompt 3 + 30 new > 32) the context is cropped and generation goes on.
    assert len(gpt2_tokenizer().encode(greedy)) == 3 + 30


def test_same_seed_gives_the_same_samples(memorised_checkpoint):
    model = load_model(memorised_checkpoint)
    options = dict(num_samples=3, max_new_tokens=20, temperature=2.0, top_k=50)  # hot: the samples vary
    first = generate_samples(model, gpt2_tokenizer(), "The", seed=1, **options)
    again = generate_samples(model, gpt2_tokenizer(), "The", seed=1, **options)
    other = generate_samples(model, gpt2_tokenizer(), "The", seed=2, **options)
    assert first == again
    assert first != other


def test_command_line_prints_the_samples(memorised_checkpoint, capsys):
    code = main([f"ckpt={memorised_checkpoint}", "prompt=The quick brown", "num_samples=2", "top_k=1", "device=cpu"])
    assert code == 0
    samples = capsys.readouterr().out.split("---------------\n")
    assert len(samples) == 3 and samples[-1] == ""  # two samples, each followed by the separator
    assert all(s.startswith("The quick brown fox jumps over the lazy dog") for s in samples[:2])


def tiny_gpt(block_size: int = 16) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=block_size, n_layer=2, n_head=2, n_embd=32)).eval()


def test_cached_logits_match_recomputation():
    model = tiny_gpt()
    tokens = torch.randint(0, 50257, (2, 16))
    full = model.lm_head(model.hidden_states(tokens))
    caches = [KVCache(16) for _ in model.blocks]
    pieces = [model.lm_head(model.hidden_states(tokens[:, :5], caches))]  # a prompt, then one token at a time
    pieces += [model.lm_head(model.hidden_states(tokens[:, t : t + 1], caches)) for t in range(5, 16)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-4)


def test_greedy_generation_with_cache_equals_recomputation():
    model = tiny_gpt()
    prompt = torch.randint(0, 50257, (3, 5))
    # 5 + 30 tokens pass block_size=16, so the cache is rebuilt for cropped contexts too.
    cached = model.generate(prompt, 30, top_k=1, use_cache=True)
    recomputed = model.generate(prompt, 30, top_k=1, use_cache=False)
    assert torch.equal(cached, recomputed)
    assert len(set(cached[0, 5:].tolist())) > 1  # not one token repeated: the comparison means something


def test_padding_rows_are_never_sampled():
    class PaddingFirst(torch.nn.Module):  # the head as trained, with the padding ids far the likeliest
        def __init__(self, head):
            super().__init__()
            self.head = head

        def forward(self, hidden):
            logits = self.head(hidden)
            logits[..., 50257:] = logits.max() + 50.0
            return logits

    model = tiny_gpt()
    model.lm_head = PaddingFirst(model.lm_head)
    out = model.generate(torch.zeros(4, 1, dtype=torch.long), 10, temperature=1.0, top_k=None)
    assert out.shape == (4, 11) and out.max().item() < 50257


def one_line_error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit:
        main(list(args))
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    return err


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
    err = one_line_error(capsys, f"ckpt={tmp_path / 'nope.ckpt'}")
    assert f"ckpt={tmp_path / 'nope.ckpt'} does not exist" in err


def test_corrupt_checkpoint_is_one_line(tmp_path, capsys):
    bad = tmp_path / "last.ckpt"
    bad.write_bytes(b"this is not a checkpoint")
    assert f"ckpt={bad} is not a checkpoint (not a file torch.save writes)" in one_line_error(capsys, f"ckpt={bad}")


def test_a_file_holding_code_is_not_a_checkpoint_and_no_advice_to_load_it_unsafely(tmp_path, capsys):
    crafted = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "hook": print}, crafted)  # loading it in full would run code from the file
    err = one_line_error(capsys, f"ckpt={crafted}")
    assert f"ckpt={crafted} is not a checkpoint (it holds objects other than tensors and plain values)" in err
    assert "weights_only" not in err


def test_the_prompt_can_come_from_a_file(memorised_checkpoint, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The quick brown", encoding="utf-8")
    args = [f"ckpt={memorised_checkpoint}", f"prompt=FILE:{prompt}", "num_samples=1", "top_k=1", "device=cpu"]
    assert main(args) == 0
    assert capsys.readouterr().out.startswith("The quick brown fox jumps over the lazy dog")
    missing = tmp_path / "none.txt"
    err = one_line_error(capsys, "ckpt=x", f"prompt=FILE:{missing}")
    assert f"prompt=FILE:{missing}: {missing} does not exist" in err


def test_checkpoint_with_another_tokenizer_is_refused(memorised_checkpoint, tmp_path, capsys):
    checkpoint = torch.load(memorised_checkpoint, weights_only=True)
    checkpoint["tokenizer"]["ranks_sha256"] = "0" * 64
    other = tmp_path / "other.ckpt"
    torch.save(checkpoint, other)
    err = one_line_error(capsys, f"ckpt={other}")
    assert "tokenizer ranks sha256 " + "0" * 64 in err


def test_checkpoint_with_non_finite_weights_is_refused(memorised_checkpoint, tmp_path, capsys):
    checkpoint = torch.load(memorised_checkpoint, weights_only=True)
    checkpoint["state_dict"]["model.ln_final.weight"][3] = float("nan")
    damaged = tmp_path / "damaged.ckpt"
    torch.save(checkpoint, damaged)
    err = one_line_error(capsys, f"ckpt={damaged}")
    assert f"ckpt={damaged} holds non-finite weights (nan or inf in ln_final.weight)" in err


@pytest.mark.parametrize(
    "arg, culprit",
    [
        ("temperature=0", "temperature='0' must be a number from 0.001 to 100"),
        ("top_k=many", "top_k='many' must be a whole number from 1 to"),
        ("length=5", "'length=5' is not an option"),
        ("num_samples=1e6", "num_samples='1e6' must be a whole number from 1 to 100;"),
        ("seed=-1", "seed='-1' must be a whole number from 0 to 18,446,744,073,709,551,615"),
        ("device=tpu", "device='tpu' is not one of auto, cpu, cuda"),
    ],
)
def test_bad_options_are_one_line(tmp_path, capsys, arg, culprit):
    assert culprit in one_line_error(capsys, f"ckpt={tmp_path / 'x.ckpt'}", arg)


@pytest.mark.parametrize(
    "arg, culprit",
    [
        ("max_new_tokens=1e20", "max_new_tokens='1e20' must be a whole number from 1 to 100,000"),
        ("temperature=nan", "temperature='nan' must be a number from 0.001 to 100"),
    ],
)
def test_absurd_values_are_refused_at_once_from_the_command_line(memorised_checkpoint, tmp_path, arg, culprit):
    # Once, max_new_tokens=1e20 generated until killed and temperature=nan crashed in torch.multinomial.
    offline = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "fineweb_gpt.sample", f"ckpt={memorised_checkpoint}", arg]
    done = subprocess.run(command, cwd=tmp_path, env=offline, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1 and culprit in done.stderr


class Hang(Exception):
    pass


@contextmanager
def time_limit(seconds: float):
    """Raise Hang in the test if the block runs longer than this."""

    def fire(signum, frame):
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def slow_but_valid(option: str, value: str) -> bool:
    """A valid max_new_tokens above 64: it would run, only for longer than a unit test should."""
    try:
        number = float(value)
    except ValueError:
        return False
    return option == "max_new_tokens" and 64 < number <= MAX_NEW_TOKENS


OPTION_VALUES = st.one_of(
    st.text(st.characters(blacklist_characters="\x00")),  # a command line cannot hold a NUL
    st.integers(-(2**70), 2**70).map(str),
    st.floats().map(str),  # nan, inf and -inf included
    st.sampled_from(["1e20", "-0", "0.0", "1e-30", "null", "None", "cuda", " 7 ", "2**8", "1_000", "0x10", ""]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(option=st.sampled_from(list(DEFAULTS)), value=OPTION_VALUES)
@example(option="max_new_tokens", value="1e20")
@example(option="temperature", value="nan")
@example(option="num_samples", value=str(10**30))
@example(option="ckpt", value="x" * 5000)  # longer than a file name may be
def test_any_option_value_samples_or_is_refused_in_one_line(memorised_checkpoint, capsys, option, value):
    assume(not slow_but_valid(option, value))
    options = {"ckpt": str(memorised_checkpoint), "num_samples": "2", "max_new_tokens": "3", "device": "cpu"}
    options[option] = value
    with time_limit(60):
        try:
            code = main([f"{key}={value}" for key, value in options.items()])
        except SystemExit as exit:
            code = exit.code
    out, err = capsys.readouterr()
    if code == 0:
        samples = out.split("---------------\n")
        wanted = int(float(options["num_samples"])) if option == "num_samples" else 2
        assert err == "" and len(samples) == wanted + 1 and samples[-1] == ""
    else:
        assert code == 2 and out == ""
        assert err.startswith("error: ") and err.count("\n") == 1 and (f"{option}=" in err or f"{option} " in err)
