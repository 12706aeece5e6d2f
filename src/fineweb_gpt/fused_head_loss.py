"""The output head and the cross-entropy loss fused, chunk by chunk of rows: what compiled
training runs instead of `lm_head` followed by `F.cross_entropy` (see GPT.forward)."""

import torch

# Rows of logits the fused head + loss holds at once: 16384 x 50304 bf16 is 1.6 GB.
LOSS_CHUNK_ROWS = 16384


class HeadCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of hidden @ weight.T against targets, and its gradients, in one pass.

    The plain head writes (tokens, vocab) logits, keeps them for the backward pass, then fills a
    zero gradient of the same size and reads everything again: for 124m at micro-batch 64 that
    is 6.6 GB moved several times per micro-batch. Here each chunk of rows is turned into
    logits, loss and logit gradient at once, and the logit gradient goes straight into the
    hidden-state and weight gradients; no logits outlive their chunk. Under torch.compile the
    softmax arithmetic of a chunk fuses into one kernel. Matmuls follow autocast; the softmax
    is in fp32. softcap: the logits are cap * tanh(logits / cap) (GPT.logits), None for none.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows: int, softcap: float | None = None):
        rows = hidden.size(0)
        loss_sum = hidden.new_zeros((), dtype=torch.float32)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        grad_hidden = []
        for start in range(0, rows, chunk_rows):
            h, t = hidden[start : start + chunk_rows], targets[start : start + chunk_rows]
            logits = h @ weight.t()
            logits32 = logits.float()
            if softcap:
                capped = torch.tanh(logits32 / softcap)
                logits32 = softcap * capped
            log_norm = torch.logsumexp(logits32, dim=-1)
            loss_sum = loss_sum + (log_norm - logits32.gather(1, t.unsqueeze(1)).squeeze(1)).sum()
            # d(summed loss)/d(logits) = softmax - one_hot(target), within [-1, 1]; the division
            # by rows for the mean comes after the matmuls, so fp16 does not flush it to zero.
            is_target = torch.arange(logits.size(1), device=t.device) == t.unsqueeze(1)
            grad_logits = torch.exp(logits32 - log_norm.unsqueeze(1)) - is_target.float()
            if softcap:  # through the cap: d(cap * tanh(z / cap))/dz = 1 - tanh²
                grad_logits = grad_logits * (1 - capped.square())
            grad_logits = grad_logits.to(logits.dtype)
            grad_hidden.append(grad_logits @ weight)
            grad_weight = grad_weight + (grad_logits.t() @ h).float()
        ctx.save_for_backward(torch.cat(grad_hidden).float().div_(rows).to(hidden.dtype), grad_weight.div_(rows))
        return loss_sum / rows

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None, None
