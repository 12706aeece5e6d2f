"""Hugging Face out and in: a checkpoint as a transformers folder, and a transformers folder as the
starting weights of a run.

    fineweb-gpt-export ckpt=outputs/latest/checkpoints/last.ckpt out=exported/my-gpt
    python -m fineweb_gpt.export ckpt=... out=... push_to_hub=user/my-gpt
    python -m fineweb_gpt.train init_from=gpt2            # OpenAI's GPT-2 124M, from the Hub
    python -m fineweb_gpt.train init_from=exported/my-gpt  # any folder written here, or a transformers GPT-2

Out: the transformers class whose math is ours. model.arch=gpt2 is GPT2LMHeadModel (its Conv1D
layers keep the attention and MLP matrices transposed; exact GELU; zero biases where the model
has none). model.arch=modern is Qwen3ForCausalLM: per-head RMSNorm on queries and keys before
rotary, rotary in halves, SwiGLU as gate/up/down, RMSNorm at float32's eps (nn.RMSNorm's with
eps=None), no biases. Both tie the head to the embedding and keep GPT-2's 50,257 token rows;
the padded vocabulary's other rows, which no token uses, go to vocab_padding.safetensors so that
init_from gives back the same weights. A model setting the export cannot map exactly is refused
in one line, and the folder is checked to give our logits before it is written.

In: init_from reads the folder's settings (config.json; fineweb_gpt.json where this exporter wrote
it), refuses model settings on the command line that disagree, and loads the weights through
transformers, so every layout transformers reads (sharded, older names) works.
"""

import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from fineweb_gpt.errors import ConfigError, UserError, exit_with, one_line
from fineweb_gpt.model import ARCHITECTURE_KEYS, GPT, MODEL_KEYS, GPTConfig
from fineweb_gpt.safe_files import TEMPORARY_SUFFIX, disk_full_error, replace_folder, write_atomically
from fineweb_gpt.tokenizer import END_OF_TEXT, END_OF_TEXT_ID, GPT2_VOCAB_SIZE

GPT2_HUB_REPO = "openai-community/gpt2"  # init_from=gpt2: OpenAI's GPT-2 124M
OUR_FILE = "fineweb_gpt.json"  # what the folder was exported from: the model config and the run's facts
PADDING_FILE = "vocab_padding.safetensors"  # the padded vocabulary's rows, for an exact round trip
ROPE_THETA = 10000.0  # model.Rotary's base
RMS_NORM_EPS = torch.finfo(torch.float32).eps  # nn.RMSNorm(eps=None) in fp32
LOGITS_TOLERANCE = 1e-4  # fp32; the two agree to about 1e-6 on random weights
# The GPTConfig fields the export translates; every other field must have its preset's value.
TRANSLATED = {"block_size", "vocab_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "arch"}
# Settings of training alone: how the projections start, and whether documents packed into one
# window see each other. A transformers model given one document computes what ours does.
TRAINING_ONLY = {"zero_init_proj", "doc_mask"}
# The presets a transformers class computes exactly (their switches as model.arch fills them).
EXPORTED_CLASSES = {"gpt2": "GPT2LMHeadModel", "modern": "Qwen3ForCausalLM"}


HF_EXTRA = 'pip install "fineweb_gpt[hf]"'


def require_hf_extra(what: str) -> None:
    """A one-line error naming the extra, before any work, where transformers or safetensors is missing."""
    try:
        import safetensors  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as err:
        raise ConfigError(
            f"{what} needs the Hugging Face libraries ({err.name or 'transformers'} is not installed): {HF_EXTRA}"
        ) from None


# --- the weights' names, both ways --------------------------------------------------------


def weight_names(config: GPTConfig) -> list[tuple[str, str, bool]]:
    """(our name, transformers' name, transposed) of every weight the two models share."""
    if config.arch == "gpt2":
        names = [("token_embedding.weight", "transformer.wte.weight", False)]
        names += [("position_embedding.weight", "transformer.wpe.weight", False)]
        layer = [
            ("ln_attn", "ln_1", False),
            ("attn.qkv", "attn.c_attn", True),  # Conv1D: (in, out)
            ("attn.out_proj", "attn.c_proj", True),
            ("ln_mlp", "ln_2", False),
            ("mlp.up", "mlp.c_fc", True),
            ("mlp.down", "mlp.c_proj", True),
        ]
        final, prefix = ("ln_final", "transformer.ln_f"), "transformer.h"
        kinds = ("weight", "bias")
    else:
        names = [("token_embedding.weight", "model.embed_tokens.weight", False)]
        layer = [
            ("ln_attn", "input_layernorm", False),
            ("attn.q_norm", "self_attn.q_norm", False),
            ("attn.k_norm", "self_attn.k_norm", False),
            ("attn.out_proj", "self_attn.o_proj", False),
            ("ln_mlp", "post_attention_layernorm", False),
            ("mlp.gate", "mlp.gate_proj", False),
            ("mlp.up", "mlp.up_proj", False),
            ("mlp.down", "mlp.down_proj", False),
        ]
        final, prefix = ("ln_final", "model.norm"), "model.layers"
        kinds = ("weight",)
    for i in range(config.n_layer):
        for ours, theirs, transposed in layer:
            for kind in kinds:
                names.append(
                    (f"blocks.{i}.{ours}.{kind}", f"{prefix}.{i}.{theirs}.{kind}", transposed and kind == "weight")
                )
    names += [(f"{final[0]}.{kind}", f"{final[1]}.{kind}", False) for kind in kinds]
    return names


def qkv_names(config: GPTConfig, i: int) -> tuple[str, list[str]]:
    """Qwen3 keeps queries, keys and values in three matrices, ours in one (rows q, k, v)."""
    return f"blocks.{i}.attn.qkv.weight", [f"model.layers.{i}.self_attn.{x}_proj.weight" for x in "qkv"]


def to_transformers(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under transformers' names: biases zero where ours has none, 50,257 token rows."""
    config, ours = model.config, model.state_dict()
    theirs = {}
    for our_name, their_name, transposed in weight_names(config):
        weight = ours.get(our_name)
        if weight is None:  # model.bias=false: GPT-2's bias, at zero (one per output, as ours are (out, in))
            weight = torch.zeros(ours[our_name.removesuffix(".bias") + ".weight"].shape[0])
        theirs[their_name] = weight.t() if transposed else weight
    if config.arch == "modern":
        for i in range(config.n_layer):
            our_name, their_names = qkv_names(config, i)
            for name, part in zip(their_names, ours[our_name].chunk(3)):
                theirs[name] = part
    embedding = next(name for name in theirs if name.endswith(("wte.weight", "embed_tokens.weight")))
    theirs[embedding] = theirs[embedding][:GPT2_VOCAB_SIZE]
    return {name: weight.detach().clone().contiguous() for name, weight in theirs.items()}


def from_transformers(theirs: dict[str, torch.Tensor], config: GPTConfig, padding: torch.Tensor | None) -> dict:
    """Transformers' weights under our names (the inverse of to_transformers), the token rows padded
    back to config.vocab_size with `padding` (or rows drawn as a fresh model's)."""
    ours = {}
    for our_name, their_name, transposed in weight_names(config):
        if our_name.endswith(".bias") and not config.bias:
            continue  # checked to be zero by initial_weights
        ours[our_name] = theirs[their_name].t() if transposed else theirs[their_name]
    if config.arch == "modern":
        for i in range(config.n_layer):
            our_name, their_names = qkv_names(config, i)
            ours[our_name] = torch.cat([theirs[name] for name in their_names])
    rows = ours["token_embedding.weight"]
    missing = config.vocab_size - rows.shape[0]
    if missing > 0:
        if padding is None or padding.shape != (missing, rows.shape[1]):
            padding = torch.empty(missing, rows.shape[1]).normal_(mean=0.0, std=0.02)  # as GPT initialises them
        rows = torch.cat([rows, padding.to(rows.dtype)])
    ours["token_embedding.weight"] = ours["lm_head.weight"] = rows
    return {name: weight.float().contiguous() for name, weight in ours.items()}


# --- what can be exported -------------------------------------------------------------------


def check_exportable(config: GPTConfig) -> None:
    """Refuse, in one line, a model no transformers class computes exactly."""
    exported = ", ".join(f"model.arch={arch} as {name}" for arch, name in EXPORTED_CLASSES.items())
    if config.arch not in EXPORTED_CLASSES:
        raise ConfigError(
            f"model.arch={config.arch} has no exact counterpart in transformers (the export writes {exported}); "
            "this checkpoint cannot be exported"
        )
    preset = GPTConfig(arch=config.arch).to_dict()
    ours = config.to_dict()
    for key in MODEL_KEYS:
        if key not in TRANSLATED | TRAINING_ONLY and ours[key] != preset[key]:
            raise ConfigError(
                f"model.{key}={ours[key]!r} has no exact counterpart in transformers (the export maps "
                f"model.arch={config.arch} with model.{key}={preset[key]!r}); this checkpoint cannot be exported"
            )
    if config.vocab_size < GPT2_VOCAB_SIZE:
        raise ConfigError(f"model.vocab_size={config.vocab_size} is below GPT-2's {GPT2_VOCAB_SIZE} tokens")


def transformers_config(config: GPTConfig):
    """The transformers config whose model computes what ours does."""
    from transformers import GPT2Config, Qwen3Config

    common = {"vocab_size": GPT2_VOCAB_SIZE, "bos_token_id": END_OF_TEXT_ID, "eos_token_id": END_OF_TEXT_ID}
    if config.arch == "gpt2":
        return GPT2Config(
            n_positions=config.block_size,
            n_embd=config.n_embd,
            n_layer=config.n_layer,
            n_head=config.n_head,
            activation_function="gelu",  # exact GELU, as F.gelu; transformers' default gelu_new is the tanh one
            resid_pdrop=config.dropout,
            embd_pdrop=config.dropout,
            attn_pdrop=config.dropout,
            tie_word_embeddings=True,
            **common,
        )
    return Qwen3Config(
        hidden_size=config.n_embd,
        intermediate_size=config.swiglu_hidden,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.n_head,
        head_dim=config.head_size,
        hidden_act="silu",
        max_position_embeddings=config.block_size,
        rms_norm_eps=RMS_NORM_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        attention_bias=False,
        attention_dropout=config.dropout,
        use_sliding_window=False,
        tie_word_embeddings=True,
        **common,
    )


def transformers_model(model: GPT):
    """Our model as a transformers model (fp32, eval mode), its weights copied."""
    from transformers import AutoModelForCausalLM

    check_exportable(model.config)
    hf_model = AutoModelForCausalLM.from_config(transformers_config(model.config), dtype=torch.float32)
    missing, unexpected = hf_model.load_state_dict(to_transformers(model), strict=False)
    missing = [name for name in missing if name != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise ConfigError(
            f"the export does not fill {type(hf_model).__name__}: missing {missing}, unexpected {unexpected}"
        )
    hf_model.tie_weights()
    return hf_model.eval()


@torch.no_grad()
def check_same_logits(model: GPT, hf_model, tokens: int = 16) -> float:
    """The largest logit difference on random tokens; refuses a model that computes something else."""
    model = model.float().eval()
    idx = torch.randint(
        0, GPT2_VOCAB_SIZE, (1, min(tokens, model.config.block_size)), generator=torch.Generator().manual_seed(0)
    )
    ours = model(idx)[0][..., :GPT2_VOCAB_SIZE]
    theirs = hf_model(input_ids=idx).logits
    difference = float((ours - theirs).abs().max())
    if not difference <= LOGITS_TOLERANCE:
        raise ConfigError(
            f"the exported {type(hf_model).__name__} gives logits {difference:.2g} away from the checkpoint's; "
            "this transformers version computes something else: nothing was written"
        )
    return difference


# --- the tokenizer, generation settings and model card ----------------------------------


def transformers_tokenizer(block_size: int):
    """GPT-2's tokenizer for transformers, built offline from the bundled ranks."""
    from tiktoken_ext.openai_public import r50k_pat_str
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from fineweb_gpt.tokenizer import gpt2_ranks

    class BundledRanks(TikTokenConverter):
        def load_tiktoken_bpe(self, _):  # the checked ranks, instead of a download
            return gpt2_ranks()

    converter = BundledRanks(pattern=r50k_pat_str, extra_special_tokens={END_OF_TEXT: END_OF_TEXT_ID})
    return PreTrainedTokenizerFast(
        tokenizer_object=converter.converted(),
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
        model_max_length=block_size,
    )


def generation_config():
    """fineweb-gpt-sample's defaults: sampling at temperature 0.8 from the 200 likeliest tokens."""
    from transformers import GenerationConfig

    from fineweb_gpt.sample import DEFAULTS

    return GenerationConfig(
        bos_token_id=END_OF_TEXT_ID,
        eos_token_id=END_OF_TEXT_ID,
        pad_token_id=END_OF_TEXT_ID,
        do_sample=True,
        temperature=DEFAULTS["temperature"],
        top_k=DEFAULTS["top_k"],
        max_new_tokens=DEFAULTS["max_new_tokens"],
    )


def run_facts(ckpt: Path, checkpoint: dict) -> dict:
    """What was trained, from the checkpoint and (where it still sits in its run folder) the run's files."""
    from omegaconf import OmegaConf

    from fineweb_gpt.evaluate import describe_source
    from fineweb_gpt.run.names import METRICS_FILE
    from fineweb_gpt.run.run_files import read_metrics, read_overrides

    monitor = next((s for s in (checkpoint.get("callbacks") or {}).values() if "tokens_seen" in s), {})
    data = (checkpoint.get("run_config") or {}).get("data")
    facts = {
        "step": checkpoint.get("global_step"),
        "tokens": monitor.get("tokens_seen"),
        "data": describe_source(OmegaConf.create(data)) if data else None,
        "val_loss": None,
        "hellaswag": None,
        "command": None,
    }
    run_dir = ckpt.resolve().parent.parent if ckpt.resolve().parent.name == "checkpoints" else None
    if run_dir is not None:
        rows = read_metrics(run_dir / METRICS_FILE) if (run_dir / METRICS_FILE).is_file() else []
        rows = [row for row in rows if row.get("step") is not None and row["step"] <= (facts["step"] or 0)]
        val = [row for row in rows if "val/loss" in row]
        if val:
            facts["val_loss"] = {"loss": val[-1]["val/loss"], "step": int(val[-1]["step"])}
        scored = [row for row in rows if "eval/hellaswag_acc_norm" in row]
        if scored:
            last = scored[-1]
            facts["hellaswag"] = {
                "acc": last.get("eval/hellaswag_acc"),
                "acc_norm": last["eval/hellaswag_acc_norm"],
                "examples": int(last.get("eval/hellaswag_examples") or 0),
                "step": int(last["step"]),
            }
        overrides = read_overrides(run_dir)
        if (run_dir / ".hydra").is_dir():
            facts["command"] = " ".join(["python -m fineweb_gpt.train", *overrides])
    scored_alone = ckpt.with_name(f"{ckpt.stem}.hellaswag.json")  # fineweb-gpt-eval task=hellaswag
    if scored_alone.is_file():
        result = json.loads(scored_alone.read_text())
        facts["hellaswag"] = {key: result.get(key) for key in ("acc", "acc_norm", "examples", "step")}
    return facts


def model_card(config: GPTConfig, class_name: str, num_params: int, facts: dict, name: str) -> str:
    from fineweb_gpt.flops import human_count

    def number(value, digits=4):
        return f"{value:.{digits}f}" if isinstance(value, int | float) and math.isfinite(value) else "not recorded"

    shape = f"{config.n_layer} layers x {config.n_head} heads x {config.n_embd}, context {config.block_size}"
    val = facts["val_loss"]
    hellaswag = facts["hellaswag"]
    rows = [
        ("architecture", f"model.arch={config.arch} ({shape}), exported as `{class_name}`"),
        ("data", facts["data"] or "not recorded"),
        (
            "trained",
            f"{facts['step']:,} optimizer steps, "
            + (f"{human_count(facts['tokens'])} tokens" if facts["tokens"] else "tokens not recorded"),
        ),
        (
            "final val loss",
            f"{number(val['loss'])} (held-out documents, step {val['step']:,})" if val else "not recorded",
        ),
        (
            "HellaSwag",
            f"acc_norm {number(hellaswag['acc_norm'])}, acc {number(hellaswag['acc'])} on {hellaswag['examples']} "
            f"examples (step {hellaswag['step']}), scored as build-nanogpt and llm.c score it"
            if hellaswag
            else "not scored (fineweb-gpt-eval ckpt=... task=hellaswag, then export again)",
        ),
        ("command", f"`{facts['command']}`" if facts["command"] else "not recorded"),
    ]
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags:
- fineweb_gpt
- {config.arch}
---
# {name}

A {human_count(num_params)}-parameter GPT-2-style language model trained from scratch with fineweb_gpt.

| | |
|---|---|
{table}

The tokenizer is GPT-2's (50,257 tokens, `<|endoftext|>` between documents).

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{name}")
model = AutoModelForCausalLM.from_pretrained("{name}")
ids = tokenizer("The meaning of life is", return_tensors="pt").input_ids
print(tokenizer.decode(model.generate(ids, max_new_tokens=40)[0]))
```

```bash
lm_eval --model hf --model_args pretrained={name} --tasks hellaswag
```
"""


# --- writing the folder -------------------------------------------------------------------


def export_checkpoint(ckpt: str | Path, out: str | Path, push_to_hub: str | None = None) -> tuple[Path, float]:
    """Write the transformers folder for `ckpt` into `out`; returns (out, the largest logit difference)."""
    require_hf_extra("fineweb-gpt-export")
    from safetensors.torch import save as safetensors_bytes

    from fineweb_gpt.run.checkpoint_files import load_gpt

    ckpt, out = Path(ckpt), Path(out)
    if out.is_symlink():
        raise ConfigError(f"out={out} is a link; fineweb_gpt never writes through a link: give a folder's own path")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / OUR_FILE).is_file())):
        raise ConfigError(f"out={out} exists and is not an earlier export; give a new folder")
    if not os.access(out.parent if out.parent.exists() else Path.cwd(), os.W_OK):
        raise ConfigError(f"cannot write {out} (its folder is missing or read-only); give out=DIR")
    model, checkpoint = load_gpt(ckpt)
    check_exportable(model.config)
    hf_model = transformers_model(model)
    difference = check_same_logits(model, hf_model)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=TEMPORARY_SUFFIX, dir=out.parent))
    try:
        hf_model.generation_config = generation_config()
        hf_model.save_pretrained(staging)
        transformers_tokenizer(model.config.block_size).save_pretrained(staging)
        padding = model.token_embedding.weight.detach()[GPT2_VOCAB_SIZE:].clone()
        if len(padding):
            write_atomically(staging / PADDING_FILE, safetensors_bytes({"rows": padding.contiguous()}))
        facts = run_facts(ckpt, checkpoint)
        record = {"model_config": model.config.to_dict(), "checkpoint": str(ckpt.resolve()), **facts}
        write_atomically(staging / OUR_FILE, json.dumps(record, indent=2) + "\n")
        card = model_card(model.config, type(hf_model).__name__, model.num_params(), facts, push_to_hub or out.name)
        write_atomically(staging / "README.md", card)
        readable_as_umask_allows(staging)  # mkdtemp and safetensors make them private
        replace_folder(staging, out)  # an earlier export of ours (checked above) is replaced whole
    except BaseException as err:
        full = disk_full_error(err, out)
        if full is not None:
            raise full from err
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if push_to_hub:
        upload(out, push_to_hub)
    return out, difference


def readable_as_umask_allows(folder: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for file in folder.iterdir():
        file.chmod(0o666 & ~umask)


def upload(folder: Path, repo: str) -> None:
    """The folder to a Hub model repository (created if missing; HF_TOKEN or `hf auth login`)."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo, repo_type="model", exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model")
    except Exception as err:  # no token, no network, no rights: the folder is written either way
        raise UserError(
            f"push_to_hub={repo} failed ({type(err).__name__}: {one_line(err, 160)}); {folder} is written: "
            "log in (hf auth login, or HF_TOKEN) and run again, or upload it with `hf upload`"
        ) from err


# --- init_from: a run's starting weights --------------------------------------------------


def hub_or_folder(init_from: str, files: list[str]) -> Path:
    """init_from=gpt2 (OpenAI's GPT-2 124M from the Hub, through its cache), or a local folder."""
    if init_from != "gpt2":
        folder = Path(init_from)
        if not (folder / "config.json").is_file():
            raise ConfigError(
                f"init_from={init_from} is not a transformers folder (no config.json); give init_from=gpt2, "
                "a folder fineweb-gpt-export wrote, or a GPT-2 saved by transformers"
            )
        return folder
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(GPT2_HUB_REPO, allow_patterns=files))
    except Exception as err:
        raise ConfigError(
            f"init_from=gpt2 cannot get {', '.join(files)} of {GPT2_HUB_REPO} from the Hugging Face Hub or its cache "
            f"({type(err).__name__}: {one_line(err, 160)}); check the network, or give a local folder: init_from=DIR"
        ) from err


def settings_from_folder(folder: Path, init_from: str) -> dict:
    """The model settings a transformers folder holds, as model.* values; refuses what ours cannot compute."""
    config = json.loads((folder / "config.json").read_text())
    kind = config.get("model_type")
    ours = json.loads((folder / OUR_FILE).read_text()).get("model_config", {}) if (folder / OUR_FILE).is_file() else {}
    if kind == "gpt2":
        settings = {
            "arch": "gpt2",
            "n_layer": config["n_layer"],
            "n_head": config["n_head"],
            "n_embd": config["n_embd"],
            "block_size": config["n_positions"],
            "bias": ours.get("bias", True),  # GPT-2 has biases; an export of a bias-free model says so
        }
        expected = {
            "activation_function": ("gelu", "gelu_new", "gelu_pytorch_tanh") if not ours else ("gelu",),
            "scale_attn_weights": (True,),
            "scale_attn_by_inverse_layer_idx": (False,),
            "n_inner": (None, 4 * config["n_embd"]),
        }
    elif kind == "qwen3":
        settings = {
            "arch": "modern",
            "n_layer": config["num_hidden_layers"],
            "n_head": config["num_attention_heads"],
            "n_embd": config["hidden_size"],
            "block_size": config["max_position_embeddings"],
            "bias": False,
        }
        swiglu = GPTConfig(n_embd=settings["n_embd"], n_head=settings["n_head"], arch="modern").swiglu_hidden
        rope = config.get("rope_parameters") or {"rope_theta": config.get("rope_theta"), "rope_type": "default"}
        expected = {
            "num_key_value_heads": (settings["n_head"],),
            "head_dim": (settings["n_embd"] // settings["n_head"],),
            "intermediate_size": (swiglu,),
            "hidden_act": ("silu",),
            "rms_norm_eps": (RMS_NORM_EPS,),
            "attention_bias": (False,),
            "use_sliding_window": (False, None),
            "tie_word_embeddings": (True,),
        }
        if rope.get("rope_theta") != ROPE_THETA or rope.get("rope_type", "default") != "default":
            raise ConfigError(
                f"init_from={init_from} uses rotary {rope}; model.arch=modern rotates with base {ROPE_THETA:g}"
            )
    else:
        raise ConfigError(
            f"init_from={init_from} holds a {kind!r} model; only GPT-2 (model.arch=gpt2) and the Qwen3 layout "
            "fineweb-gpt-export writes for model.arch=modern can start a run"
        )
    for key, allowed in expected.items():
        if config.get(key, allowed[0]) not in allowed:
            raise ConfigError(
                f"init_from={init_from} has {key}={config[key]!r} in config.json; this project's model computes "
                f"{key}={allowed[0]!r}, so it cannot continue this model"
            )
    vocab = ours.get("vocab_size", config["vocab_size"])
    return {**settings, "vocab_size": max(vocab, config["vocab_size"])}


def explicit_model_keys() -> tuple[set[str], str | None]:
    """The model keys this command sets itself (model.KEY=...), and a model=OPTION it chooses."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not HydraConfig.initialized():
        return set(), None
    overrides = OverridesParser.create().parse_overrides(list(HydraConfig.get().overrides.task))
    keys = {o.key_or_group.removeprefix("model.") for o in overrides if o.key_or_group.startswith("model.")}
    chosen = next((str(o.value()) for o in overrides if o.key_or_group == "model"), None)
    return keys, chosen


def apply_init_from(model: dict, init_from: str, given: set[str] = frozenset(), chosen: str | None = None) -> dict:
    """The run's model settings under init_from: the folder's, with the command's dropout. A setting
    the command gives (`given`: its model.KEY=... keys; `chosen`: its model=OPTION) that disagrees is
    refused in one line."""
    folder = hub_or_folder(init_from, ["config.json", OUR_FILE])
    settings = settings_from_folder(folder, init_from)
    checked = set(ARCHITECTURE_KEYS) if chosen is not None else given & set(ARCHITECTURE_KEYS)
    for key in sorted(checked):
        if key in settings and model.get(key) != settings[key]:
            source = "the command sets" if key in given else f"model={chosen} sets"
            raise ConfigError(
                f"init_from={init_from} has model.{key}={settings[key]!r} but {source} model.{key}={model.get(key)!r}; "
                f"the model settings come from init_from: leave model.{key} (and model=...) out"
            )
    return {**GPTConfig(arch=settings["arch"]).to_dict(), **settings, "dropout": model.get("dropout", 0.0)}


def use_init_from(cfg) -> dict:
    """Under init_from, the run's model settings become the folder's (a conflicting one is refused);
    returns the config-group choices the plan reports, the model named after where it came from."""
    from omegaconf import OmegaConf, open_dict

    from fineweb_gpt.config_files import hydra_choices

    choices = hydra_choices()
    if not cfg.get("init_from"):
        return choices
    require_hf_extra(f"init_from={cfg.init_from}")
    with open_dict(cfg):
        cfg.model = apply_init_from(OmegaConf.to_container(cfg.model), str(cfg.init_from), *explicit_model_keys())
    return {**choices, "model": f"init_from={cfg.init_from}"}


def initial_weights(init_from: str, config: GPTConfig) -> dict[str, torch.Tensor]:
    """The folder's weights under our names, for a model of `config` (from apply_init_from)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    folder = hub_or_folder(init_from, ["config.json", "*.safetensors", "*.json"])
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except Exception as err:
        raise ConfigError(f"init_from={init_from}: transformers cannot load it ({one_line(err, 200)})") from err
    theirs = {name: weight.detach() for name, weight in hf_model.state_dict().items()}
    if not config.bias:
        nonzero = next((n for o, n, _ in weight_names(config) if o.endswith(".bias") and theirs[n].any()), None)
        if nonzero:
            raise ConfigError(
                f"init_from={init_from} has non-zero {nonzero} while its {OUR_FILE} says model.bias=false; "
                f"delete {OUR_FILE} from the folder to start from it as a GPT-2 with biases"
            )
    padding = load_file(folder / PADDING_FILE)["rows"] if (folder / PADDING_FILE).is_file() else None
    return from_transformers(theirs, config, padding)


# --- the command line -----------------------------------------------------------------------

OPTIONS = {"ckpt": None, "out": None, "push_to_hub": None}


def parse_options(args: list[str]) -> dict:
    options = dict(OPTIONS)
    for arg in args:
        key, has_value, value = arg.partition("=")
        if not has_value or key not in OPTIONS:
            raise ConfigError(f"{arg!r} is not an option; use key=value with key one of {', '.join(OPTIONS)}")
        options[key] = value or None
    if not options["ckpt"]:
        raise ConfigError("ckpt is required: ckpt=outputs/<date>/<time>/checkpoints/last.ckpt")
    if not options["out"]:
        raise ConfigError("out is required: the folder to write, e.g. out=exported/my-gpt")
    return options


HELP = """fineweb-gpt-export ckpt=PATH out=FOLDER [push_to_hub=USER/NAME]: a checkpoint as a Hugging
Face transformers folder (python -m fineweb_gpt.export takes the same options).

    fineweb-gpt-export ckpt=outputs/latest/checkpoints/last.ckpt out=exported/my-gpt
    fineweb-gpt-export ckpt=outputs/latest/checkpoints/last.ckpt out=exported/my-gpt push_to_hub=user/my-gpt

Options are key=value, like the training command line's:
  ckpt         the checkpoint (required)
  out          the folder to write (required); an earlier export there is replaced whole
  push_to_hub  a Hub repository to upload the folder to (HF_TOKEN or `hf auth login`)
model.arch=gpt2 becomes GPT2LMHeadModel, model.arch=modern Qwen3ForCausalLM (docs/export.md).
It needs the hf extra: pip install "fineweb_gpt[hf]". A run starts from such a folder with
python -m fineweb_gpt.train init_from=FOLDER.
"""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in args):
        print(HELP)
        return 0
    try:
        options = parse_options(args)
        out, difference = export_checkpoint(options["ckpt"], options["out"], options["push_to_hub"])
    except UserError as err:
        exit_with(err)
    record = json.loads((out / OUR_FILE).read_text())
    pushed = f", pushed to {options['push_to_hub']}" if options["push_to_hub"] else ""
    config = json.loads((out / "config.json").read_text())
    print(
        f"{config['architectures'][0]} (step {record['step']}) -> {out}{pushed}; "
        f"logits within {difference:.1g} of the checkpoint's"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
