"""Issue 37 item 2: the product backend choice takes only modes exact to fp32 rounding."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from editing.evaluation import backend


@contextmanager
def _fake_bf16():
    # a mode that is "faster" but rounds its inputs to bf16, as oneDNN's bf16 math mode does on an AMX CPU
    original = torch.nn.functional.linear
    torch.nn.functional.linear = lambda x, w: original(x.bfloat16().float(), w.bfloat16().float())
    try:
        yield
    finally:
        torch.nn.functional.linear = original


def test_the_choice_refuses_a_mode_with_bf16_error() -> None:
    modes = {"default": backend.MODES["default"], "fake-bf16": _fake_bf16}
    choice = backend.choose_mode(modes=modes, shapes=[(64, 96, 128)], repeat=1,
                                 faster={"fake-bf16": 0.0})  # it would win on speed
    assert choice.mode == "default"
    assert "fake-bf16" in choice.rejected and choice.rejected["fake-bf16"] > 1e-4
