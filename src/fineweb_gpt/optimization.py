"""How the GPT's weights are updated: AdamW (or Muon + AdamW) parameter groups, and the
learning-rate schedule, linear warmup then cosine decay, counted in optimizer steps."""

import math

import torch
from torch import nn

from fineweb_gpt.errors import ConfigError


def learning_rate(step: int, lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> float:
    """Linear warmup to lr over warmup_steps, then cosine decay to min_lr at decay_steps.

    `step` counts optimizer steps already taken, so micro-batches never move the schedule.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer, lr: float, min_lr: float, warmup_steps: int, decay_steps: int):
    """The schedule as a LambdaLR: every param group (Muon's too) is scaled by the same factor."""

    def factor(step: int) -> float:
        return learning_rate(step, lr, min_lr, warmup_steps, decay_steps) / lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


OPTIMIZERS = ("adamw", "muon")


def check_optimizer(name: str) -> None:
    """Refuse, in one line, an optimizer that is not known or that this torch lacks."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"optim.optimizer={name!r} is not known; use optim=adamw or optim=muon")
    if name == "muon" and not hasattr(torch.optim, "Muon"):
        raise ConfigError(f"optim=muon needs torch.optim.Muon (torch 2.9 or newer; this is {torch.__version__})")


def build_optimizer(model: nn.Module, optim: dict, fused: bool = False) -> torch.optim.Optimizer:
    """The optimizer `optim` (the config's optim group: conf/optim/*.yaml hold every value) asks for.

    AdamW with weight decay on matrices only (linear weights and embeddings; gains and biases
    stay free). optimizer=muon: Muon orthogonalises the updates of the blocks' weight
    matrices, attention's stacked queries, keys and values as three matrices (SplitMuon); the
    embedding, the head and the gains stay with AdamW, as Muon's authors advise. Each param
    group says which optimizer it belongs to (group["optimizer"])."""
    check_optimizer(optim["optimizer"])
    params = [p for p in model.parameters() if p.requires_grad]
    muon = optim["optimizer"] == "muon"
    hidden = {id(p) for p in model.blocks.parameters() if p.dim() == 2} if muon else set()
    rest = [p for p in params if id(p) not in hidden]
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": optim["weight_decay"], "optimizer": "adamw"},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0, "optimizer": "adamw"},
    ]
    adamw = torch.optim.AdamW(groups, lr=optim["lr"], betas=tuple(optim["betas"]), eps=optim["eps"], fused=fused)
    if not hidden:
        return adamw
    # Muon's own learning rate (its orthogonalised updates have unit scale); the schedule
    # scales it by the same warmup and decay as AdamW's.
    muon = SplitMuon(
        [{"params": [p for p in params if id(p) in hidden], "optimizer": "muon"}],
        splits={block.attn.qkv.weight: 3 for block in model.blocks},
        lr=optim["muon_lr"],
        weight_decay=optim["weight_decay"],
        momentum=optim["muon_momentum"],
    )
    return CombinedOptimizer([muon, adamw])


class SplitMuon(torch.optim.Muon):
    """torch's Muon, with some parameters updated as several matrices: a parameter in `splits`
    is cut into that many equal blocks of rows, and each block gets its own momentum-to-update
    orthogonalisation and learning-rate scale, exactly as if it were a parameter of its own.

    Attention's qkv weight stacks the query, key and value matrices (3C x C). Orthogonalised whole,
    the three share one set of singular values, so the block with the largest gradient takes
    the update and the others get little; the modded-nanogpt speedrun orthogonalises Q, K, V
    and the output projection each as its own C x C matrix (its 2026-04 record goes further,
    per pair of heads for Q and K, tied to its paired-head attention, which this model lacks)."""

    def __init__(self, params, splits: dict[torch.Tensor, int], **kwargs):
        super().__init__(params, **kwargs)
        self.splits = {id(p): pieces for p, pieces in splits.items()}

    def _init_group(self, group, params_with_grad, grads, muon_momentum_bufs):
        has_complex = super()._init_group(group, params_with_grad, grads, muon_momentum_bufs)
        # The blocks are views: Muon's in-place updates of each block land in the parameter, its
        # momentum buffer and gradient; the buffer stays one tensor, so checkpoints are unchanged.
        lists = (params_with_grad, grads, muon_momentum_bufs)
        split = [[], [], []]
        for tensors in zip(*lists):
            pieces = self.splits.get(id(tensors[0]), 1)
            for target, tensor in zip(split, tensors):
                target.extend(tensor.chunk(pieces) if pieces > 1 else [tensor])
        for target, pieces in zip(lists, split):
            target[:] = pieces
        return has_complex


def learning_rates(optimizer) -> dict[str, float]:
    """train/lr: the schedule of optim.lr (AdamW's groups); with optim=muon also train/lr_muon, Muon's own."""
    rates = {}
    for group in optimizer.param_groups:
        name = "train/lr" if group.get("optimizer", "adamw") == "adamw" else f"train/lr_{group['optimizer']}"
        rates.setdefault(name, group["lr"])
    return rates


class CombinedOptimizer(torch.optim.Optimizer):
    """Several optimizers stepped as one, since Lightning's automatic optimization drives a
    single optimizer. Its param_groups are the inner optimizers' own, so a learning-rate
    scheduler on it reaches them all."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers
        super().__init__([p for o in optimizers for g in o.param_groups for p in g["params"]], {})
        self.param_groups = [group for o in optimizers for group in o.param_groups]

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        for optimizer, state in zip(self.optimizers, state_dict["optimizers"], strict=True):
            optimizer.load_state_dict(state)
