"""A few log-probabilities per position of an LM head, without its (positions x vocabulary) fp32 log-softmax.

The cached distillation step needs, at each drawn position, the student's log-probabilities of the teacher's top k
tokens and of the next token: k + 1 numbers, whose normaliser still spans the vocabulary. Computing the logits, then
an fp32 log-softmax over all of them, then its gradient, passes about a dozen times over an (n, vocab) fp32 tensor
(100 MB at n = 512 for SmolLM2's 49,152 tokens), and that memory traffic, not the arithmetic, was the largest part
of the step. Here the vocabulary is walked in chunks small enough to stay in cache: each chunk's product, its fp32
log-sum-exp and the picked logits in the forward; the chunk's softmax, its gradient and the gradient products in the
backward. The results are those of the dense form: the same products in the same dtype, then fp32 arithmetic.
"""

from __future__ import annotations

import torch

HEAD_CHUNK = 1024  # vocabulary entries per chunk: at 512 positions an fp32 chunk is 2 MB, about one core's L2


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer's product takes under the ambient autocast (the tensor's own dtype without it)."""
    device = tensor.device.type
    if torch.is_autocast_enabled(device) and tensor.is_floating_point():
        return torch.get_autocast_dtype(device)
    return tensor.dtype


def _in_chunk(ids: torch.Tensor, start: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids`` as columns of the chunk starting at ``start`` (clamped into it) and whether each id falls in it."""
    local = ids - start
    return local.clamp(0, width - 1), (local >= 0) & (local < width)


class _HeadLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, chunk: int) -> torch.Tensor:
        vocab = weight.shape[0]
        picked = torch.zeros(ids.shape, dtype=torch.float32, device=hidden.device)
        chunk_lse, logits = [], []
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, vocab, chunk):
                z = hidden @ weight[start:start + chunk].t()  # (n, c) in the compute dtype, as the dense head gives
                logits.append(z)
                zf = z.float()
                chunk_lse.append(torch.logsumexp(zf, dim=-1))
                local, inside = _in_chunk(ids, start, z.shape[1])
                picked += torch.where(inside, zf.gather(-1, local), 0.0)
            lse = torch.logsumexp(torch.stack(chunk_lse, dim=-1), dim=-1)
        ctx.save_for_backward(hidden, weight, ids, lse)
        ctx.logits, ctx.chunk = logits, chunk
        return picked - lse[:, None]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        hidden, weight, ids, lse = ctx.saved_tensors
        logits, chunk = ctx.logits, ctx.chunk
        ctx.logits = None
        grad = grad.float()
        total = grad.sum(-1, keepdim=True)
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        for i, start in enumerate(range(0, weight.shape[0], chunk)):
            z = logits[i]
            # d/dz of sum(g * (z_id - lse)): g at the ids, minus softmax times the row's sum of g
            grad_z = (z.float() - lse[:, None]).exp_().mul_(-total)
            local, inside = _in_chunk(ids, start, z.shape[1])
            grad_z.scatter_add_(-1, local, torch.where(inside, grad, 0.0))
            grad_z = grad_z.to(z.dtype)  # the products in the forward's dtype, their sum over chunks in fp32
            if need_hidden:
                grad_hidden += grad_z @ weight[start:start + chunk]
            if need_weight:
                grad_weight[start:start + chunk] += grad_z.t() @ hidden
        return (None if grad_hidden is None else grad_hidden.to(hidden.dtype),
                None if grad_weight is None else grad_weight.to(weight.dtype), None, None)


def head_log_probs(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor,
                   chunk: int = HEAD_CHUNK) -> torch.Tensor:
    """``F.log_softmax((hidden @ weight.T).float(), -1).gather(-1, ids)``, differentiable in ``hidden`` and
    ``weight``, computed one vocabulary chunk at a time.

    Under autocast the product runs in the autocast dtype, as ``nn.Linear`` would run it; the log-sum-exp, the
    softmax of the backward and the sums of the gradient products over chunks are fp32.

    Args:
        hidden: (n, d) the positions' final hidden states.
        weight: (vocab, d) the output projection (no bias).
        ids: (n, m) the token ids whose log-probabilities are wanted (int64; repeats allowed).
        chunk: vocabulary entries per chunk.

    Returns:
        (n, m) fp32 log-probabilities.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    dtype = compute_dtype(hidden)
    return _HeadLogProbs.apply(hidden.to(dtype), weight.to(dtype), ids, chunk)
