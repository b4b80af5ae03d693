"""The chunked head log-probabilities against references written here by plain loops: the logits as sums over the
hidden width, each log-probability against a log-sum-exp over the whole vocabulary, and the gradients of
sum(w * logp[ids]) by hand, for the hidden states and for the head's weight."""

from __future__ import annotations

import math

import pytest
import torch

from editing.models.backpack.head_log_probs import head_log_probs


def reference(hidden: list, weight: list, ids: list, w: list) -> tuple[list, list, list]:
    """log-probabilities (n, m), d/dhidden (n, d) and d/dweight (vocab, d) of sum(w * logp[ids]), float64 loops."""
    n, vocab, d = len(hidden), len(weight), len(weight[0])
    logp, grad_h, grad_w = [], [[0.0] * d for _ in range(n)], [[0.0] * d for _ in range(vocab)]
    for i in range(n):
        z = [sum(hidden[i][c] * weight[v][c] for c in range(d)) for v in range(vocab)]
        top = max(z)
        norm = top + math.log(sum(math.exp(x - top) for x in z))
        logp.append([z[v] - norm for v in ids[i]])
        total = sum(w[i])
        for v in range(vocab):
            # d/dz_v of sum_j w_j (z_{id_j} - norm): w at each of its ids, minus softmax_v times the sum of w
            g = -math.exp(z[v] - norm) * total + sum(w[i][j] for j, u in enumerate(ids[i]) if u == v)
            for c in range(d):
                grad_h[i][c] += g * weight[v][c]
                grad_w[v][c] += g * hidden[i][c]
    return logp, grad_h, grad_w


def close(actual: torch.Tensor, expected: list, tol: float) -> None:
    got = actual.double().tolist()
    scale = max(abs(x) for row in expected for x in row)
    for r, (row_got, row_exp) in enumerate(zip(got, expected, strict=True)):
        for c, (a, e) in enumerate(zip(row_got, row_exp, strict=True)):
            assert abs(a - e) <= tol * scale, (r, c, a, e)


@pytest.mark.parametrize("chunk", [1, 5, 17, 64])
def test_log_probs_and_both_gradients_are_the_dense_ones_at_every_chunk_size(chunk) -> None:
    """Chunks of 1, of 5 (17 is not a multiple: a short last chunk), the whole vocabulary and more than it."""
    torch.manual_seed(3)
    n, d, vocab, m = 4, 3, 17, 5
    hidden = (torch.randn(n, d, dtype=torch.float64) * 2).requires_grad_(True)
    weight = torch.randn(vocab, d, dtype=torch.float64).requires_grad_(True)
    ids = torch.randint(0, vocab, (n, m))
    ids[0, 1] = ids[0, 0]  # the next token is often among the teacher's top k: the same id twice in a row
    ids[1, :2] = torch.tensor([0, vocab - 1])  # the first and last entries of the vocabulary
    w = torch.randn(n, m, dtype=torch.float64)
    out = head_log_probs(hidden, weight, ids, chunk=chunk)
    assert out.dtype == torch.float32 and out.shape == (n, m)
    (out.double() * w).sum().backward()
    logp, grad_h, grad_w = reference(hidden.tolist(), weight.tolist(), ids.tolist(), w.tolist())
    close(out, logp, 1e-6)
    close(hidden.grad, grad_h, 1e-6)  # fp32 arithmetic, as the dense form's .float()
    close(weight.grad, grad_w, 1e-6)


def test_under_bf16_autocast_the_product_is_bf16_and_the_rest_fp32() -> None:
    """The head's product in bf16, as nn.Linear under autocast would run it; the reference is taken over the
    bf16-rounded inputs, so what remains is the rounding of the bf16 logits and of the gradient products."""
    torch.manual_seed(4)
    n, d, vocab, m = 3, 8, 23, 4
    hidden = torch.randn(n, d).requires_grad_(True)
    weight = (torch.randn(vocab, d) * 0.5).requires_grad_(True)
    ids = torch.randint(0, vocab, (n, m))
    w = torch.randn(n, m)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head_log_probs(hidden, weight, ids, chunk=6)
    assert out.dtype == torch.float32
    (out * w).sum().backward()
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    rounded = lambda t: t.detach().bfloat16().double().tolist()  # noqa: E731
    logp, grad_h, grad_w = reference(rounded(hidden), rounded(weight), ids.tolist(), w.double().tolist())
    close(out, logp, 2e-2)
    close(hidden.grad, grad_h, 2e-2)
    close(weight.grad, grad_w, 2e-2)


def test_a_frozen_head_gets_no_gradient_and_a_chunk_below_one_is_refused() -> None:
    hidden = torch.randn(2, 3, requires_grad=True)
    weight = torch.randn(7, 3)
    head_log_probs(hidden, weight, torch.tensor([[1], [6]]), chunk=2).sum().backward()
    assert hidden.grad is not None and weight.grad is None
    with pytest.raises(ValueError, match="chunk"):
        head_log_probs(hidden, weight, torch.tensor([[1], [6]]), chunk=0)
