import io
import math

import pytest
import torch
from torch.nn import functional as F

from fineweb_gpt.data import bundled_sample_path, read_documents, tokenize_documents
from fineweb_gpt.errors import ConfigError
from fineweb_gpt.fused_head_loss import HeadCrossEntropy
from fineweb_gpt.model import GPT, GPTConfig, compile_gpt


@pytest.mark.parametrize("preset, millions", [("40m", 40.56), ("124m", 123.59)])
def test_preset_parameter_counts_match_their_names(make_config, preset, millions):
    cfg = make_config(f"model={preset}")
    model = GPT(GPTConfig(**cfg.model))
    assert model.num_params() / 1e6 == pytest.approx(millions, abs=0.005)
    # nanoGPT's convention: only the position embedding is left out.
    assert model.num_params(exclude_position_embedding=False) - model.num_params() == 1024 * cfg.model.n_embd


def test_output_head_is_tied_to_token_embedding():
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32))
    assert model.lm_head.weight.data_ptr() == model.token_embedding.weight.data_ptr()


def test_residual_projections_start_scaled_down():
    model = GPT(GPTConfig(n_layer=8, n_head=4, n_embd=256, block_size=32))
    expected = 0.02 / math.sqrt(2 * 8)
    assert model.blocks[0].attn.out_proj.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert model.blocks[0].mlp.down.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert model.blocks[0].mlp.up.weight.std().item() == pytest.approx(0.02, rel=0.05)


@pytest.mark.parametrize(
    "kwargs, culprit",
    [
        (dict(n_embd=100, n_head=12), "model.n_embd=100"),
        (dict(n_layer=0), "model.n_layer=0"),
        (dict(block_size=-5), "model.block_size=-5"),
        (dict(n_head=2.5), "model.n_head=2.5"),
        (dict(dropout=1.0), "model.dropout=1.0"),
    ],
)
def test_invalid_config_is_refused_at_construction(kwargs, culprit):
    with pytest.raises(ConfigError, match=culprit.replace(".", r"\.")):
        GPTConfig(**kwargs)


def test_logits_shape_and_causality():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32)).eval()
    idx = torch.randint(0, 50257, (3, 16))
    logits, loss = model(idx)
    assert logits.shape == (3, 16, 50304) and loss is None
    # Changing the last token must not change what the model predicts before it.
    changed = idx.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 50257
    logits_changed, _ = model(changed)
    torch.testing.assert_close(logits[:, :-1], logits_changed[:, :-1])
    assert not torch.allclose(logits[:, -1], logits_changed[:, -1])


# Small enough to check by hand: width 32, 2 heads of 16, 2 layers, context 16, vocabulary 96.
C, HEAD, LAYERS, T, V = 32, 16, 2, 16, 96
SMALL_ARCHS = {
    "gpt2": dict(arch="gpt2"),
    "gpt2 with biases": dict(arch="gpt2", bias=True),
    "modern": dict(arch="modern"),
    "speedrun": dict(arch="speedrun"),
    "gpt2, relu2 and rotary": dict(arch="gpt2", mlp="relu2", positions="rotary"),
    "gpt2, untied and capped": dict(arch="gpt2", tied_head=False, logit_softcap=5.0, qk_norm=True),
    "modern with layernorm and gelu": dict(arch="modern", norm="layernorm", mlp="gelu"),
}


def small_gpt(seed: int = 0, **arch) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=T, vocab_size=V, n_layer=LAYERS, n_head=C // HEAD, n_embd=C, **arch)).eval()


def documented_layout(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """The weights a checkpoint holds (under "model." in a Lightning checkpoint), by name and shape:
    checkpoints written by earlier versions load only while these stay the same. A tied or
    untied head is saved under both names alike."""
    layout = {"token_embedding.weight": (V, C), "ln_final.weight": (C,), "lm_head.weight": (V, C)}
    block = {
        "ln_attn.weight": (C,),
        "attn.qkv.weight": (3 * C, C),
        "attn.out_proj.weight": (C, C),
        "ln_mlp.weight": (C,),
    }
    if config.positions == "learned":
        layout["position_embedding.weight"] = (T, C)
    if config.qk_norm:  # gains per head size
        block |= {"attn.q_norm.weight": (HEAD,), "attn.k_norm.weight": (HEAD,)}
    if config.mlp == "swiglu":  # 64 wide at width 32 (rounded up to the 64 the kernels like)
        block |= {"mlp.gate.weight": (64, C), "mlp.up.weight": (64, C), "mlp.down.weight": (C, 64)}
    else:
        block |= {"mlp.up.weight": (4 * C, C), "mlp.down.weight": (C, 4 * C)}
    if config.bias:
        biases = {"ln_attn.bias": C, "attn.qkv.bias": 3 * C, "attn.out_proj.bias": C, "ln_mlp.bias": C}
        block |= {name: (size,) for name, size in biases.items()}
        block |= {"mlp.up.bias": (4 * C,), "mlp.down.bias": (C,)}
        layout["ln_final.bias"] = (C,)
    for layer in range(LAYERS):
        layout |= {f"blocks.{layer}.{name}": shape for name, shape in block.items()}
    return layout


@pytest.mark.parametrize("arch", SMALL_ARCHS.values(), ids=SMALL_ARCHS.keys())
def test_state_dict_keeps_the_documented_checkpoint_layout(arch):
    model = small_gpt(**arch)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert shapes == documented_layout(model.config)


def test_the_gpt2_and_modern_presets_keep_todays_layout():
    # What the layout was before the switches: GPT-2 with learned positions and a GELU MLP; modern
    # with rotary positions, QK-norm gains and SwiGLU. Checkpoints of earlier versions hold these.
    gpt2, modern = documented_layout(small_gpt().config), documented_layout(small_gpt(arch="modern").config)
    assert "position_embedding.weight" in gpt2 and gpt2["blocks.0.mlp.up.weight"] == (4 * C, C)
    assert "position_embedding.weight" not in modern and modern["blocks.1.attn.q_norm.weight"] == (HEAD,)
    assert modern["blocks.0.mlp.gate.weight"] == (64, C) and len(modern) == 1 + 2 + 2 * 9


@pytest.mark.parametrize("arch", SMALL_ARCHS.values(), ids=SMALL_ARCHS.keys())
def test_saved_weights_give_a_fresh_model_the_same_predictions(arch):
    saved, fresh = small_gpt(seed=0, **arch), small_gpt(seed=1, **arch)
    with torch.no_grad():  # zero-initialised heads and projections predict alike at any seed: move them
        for model, seed in ((saved, 0), (fresh, 1)):
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)), alpha=0.02)
    tokens = torch.randint(0, V, (2, T + 1))
    expected_logits, expected_loss = saved(tokens[:, :-1], tokens[:, 1:])
    assert not torch.equal(fresh(tokens[:, :-1])[0], expected_logits)  # a different seed predicts otherwise
    buffer = io.BytesIO()
    torch.save(saved.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    logits, loss = fresh(tokens[:, :-1], tokens[:, 1:])
    assert torch.equal(logits, expected_logits) and torch.equal(loss, expected_loss)
    generator = torch.Generator()
    samples = [m.generate(tokens[:, :3], 20, generator=generator.manual_seed(3)) for m in (saved, fresh)]
    assert torch.equal(*samples)


def reference_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The forward pass written out from the switches' descriptions, with the weights read by
    their checkpoint names: what the model must compute, independently of how it is built."""
    w, config, (batch, seq) = model.state_dict(), model.config, idx.shape
    n_head = C // HEAD

    def norm(x, name):
        if config.norm == "layernorm":
            return F.layer_norm(x, (x.size(-1),), w[f"{name}.weight"], w.get(f"{name}.bias"), eps=1e-5)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps) * w[f"{name}.weight"]

    def linear(x, name):
        return F.linear(x, w[f"{name}.weight"], w.get(f"{name}.bias"))

    def rotate(x):  # each pair (i, i + HEAD/2) turned by position * 10000^(-2i/HEAD), as complex numbers
        angles = torch.arange(seq)[:, None] * 10000.0 ** (-torch.arange(0, HEAD, 2) / HEAD)
        turned = torch.complex(x[..., : HEAD // 2], x[..., HEAD // 2 :]) * torch.polar(torch.ones_like(angles), angles)
        return torch.cat((turned.real, turned.imag), dim=-1)

    x = w["token_embedding.weight"][idx]
    if config.positions == "learned":
        x = x + w["position_embedding.weight"][:seq]
    for layer in range(LAYERS):
        b = f"blocks.{layer}"
        q, k, v = linear(norm(x, f"{b}.ln_attn"), f"{b}.attn.qkv").split(C, dim=-1)
        q, k, v = (t.view(batch, seq, n_head, HEAD).transpose(1, 2) for t in (q, k, v))
        if config.qk_norm:
            q, k = norm(q, f"{b}.attn.q_norm"), norm(k, f"{b}.attn.k_norm")
        if config.positions == "rotary":
            q, k = rotate(q), rotate(k)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(HEAD)
        scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), -math.inf)
        attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, seq, C)
        x = x + linear(attended, f"{b}.attn.out_proj")
        h = norm(x, f"{b}.ln_mlp")
        if config.mlp == "gelu":
            h = F.gelu(linear(h, f"{b}.mlp.up"))
        elif config.mlp == "relu2":
            h = F.relu(linear(h, f"{b}.mlp.up")) ** 2
        else:
            h = F.silu(linear(h, f"{b}.mlp.gate")) * linear(h, f"{b}.mlp.up")
        x = x + linear(h, f"{b}.mlp.down")
    head = w["token_embedding.weight"] if config.tied_head else w["lm_head.weight"]
    logits = norm(x, "ln_final") @ head.t()
    cap = config.logit_softcap
    return cap * torch.tanh(logits / cap) if cap else logits


@pytest.mark.parametrize("arch", SMALL_ARCHS.values(), ids=SMALL_ARCHS.keys())
def test_forward_computes_the_documented_architecture(arch):
    model = small_gpt(**arch)
    with torch.no_grad():  # gains start at one, biases and zero-initialised matrices at zero: move them all
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.1 if p.dim() == 1 else 0.05)
    tokens = torch.randint(0, V, (2, T + 1))
    logits, loss = model(tokens[:, :-1], tokens[:, 1:])
    expected = reference_logits(model, tokens[:, :-1])
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    assert loss.item() == pytest.approx(F.cross_entropy(expected.view(-1, V), tokens[:, 1:].reshape(-1)).item(), 1e-5)


def test_sequence_longer_than_block_size_is_refused():
    model = GPT(GPTConfig(block_size=8, n_layer=1, n_head=1, n_embd=16))
    with pytest.raises(ValueError, match="block_size=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_initial_loss_on_real_text_is_near_uniform():
    torch.manual_seed(0)
    _, texts = read_documents([bundled_sample_path()], "text")
    tokens = torch.from_numpy(tokenize_documents(texts[:20]).astype("int64"))[: 4 * 129].view(4, 129)
    model = GPT(GPTConfig(block_size=128, n_layer=4, n_head=4, n_embd=128))
    _, loss = model(tokens[:, :-1], tokens[:, 1:])
    assert loss.item() == pytest.approx(math.log(50304), abs=0.1)


def test_tiny_model_memorises_one_batch():
    torch.manual_seed(0)
    _, texts = read_documents([bundled_sample_path()], "text")
    tokens = torch.from_numpy(tokenize_documents(texts[:5]).astype("int64"))[: 2 * 33].view(2, 33)
    model = GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(100):
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 1.0


def test_fused_head_loss_and_gradients_match_cross_entropy_on_logits():
    # What compiled training runs instead of lm_head + F.cross_entropy: 37 rows in chunks of 10
    # (the last one partial), and a scaled upstream gradient, as gradient accumulation gives.
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(97, 16, requires_grad=True)
    targets = torch.randint(0, 97, (37,))
    loss = HeadCrossEntropy.apply(hidden, weight, targets, 10)
    (loss / 4).backward()
    fused_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    expected = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets)
    (expected / 4).backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(fused_grads[0], hidden.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fused_grads[1], weight.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_compiled_training_step_fuses_the_head_and_matches_eager():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=512, n_layer=2, n_head=2, n_embd=32))
    tokens = torch.randint(0, 512, (4, 33))
    losses, grads = [], []
    # The training step asks a compiled model for the fused loss (lit_module.training_step).
    for step_model, fused_loss in ((model, False), (compile_gpt(model), True)):
        logits, loss = step_model(tokens[:, :-1], tokens[:, 1:], fused_loss=fused_loss)
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in model.parameters()])
        model.zero_grad(set_to_none=True)
    assert logits is None  # compiled training never materialises the logits
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    for eager, compiled in zip(*grads):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # evaluation keeps the plain path and its logits
        logits, loss = compile_gpt(model)(tokens[:, :-1], tokens[:, 1:])
    assert logits.shape == (4, 32, 512) and loss.item() == pytest.approx(losses[0], rel=1e-5)


def test_fused_head_under_bf16_autocast_stays_close_to_fp32():
    # Under autocast the head's matmuls run in bf16 while the softmax stays in fp32; gradients
    # come back in the parameters' own dtype.
    torch.manual_seed(0)
    hidden = torch.randn(64, 32, requires_grad=True)
    weight = (0.1 * torch.randn(300, 32)).requires_grad_()
    targets = torch.randint(0, 300, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = HeadCrossEntropy.apply(hidden, weight, targets, 16)
    loss.backward()
    assert loss.dtype == torch.float32 and hidden.grad.dtype == weight.grad.dtype == torch.float32
    fused_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    expected = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-2)
    torch.testing.assert_close(fused_grads[0], hidden.grad, rtol=0.05, atol=2e-4)
    torch.testing.assert_close(fused_grads[1], weight.grad, rtol=0.05, atol=2e-4)
