"""Full fp32 for evaluation, whatever the rest of the process set.

The 1e-5 degradation ball is a relative change of general NLL of 1e-5, below what bf16 (about 3 significant
digits) or TF32 (a 10-bit mantissa in matmuls) resolves. Training may run under ``--trainer.precision bf16-mixed``
or with TF32 matmuls switched on; scoring must not: inside ``full_precision()`` autocast is off (it would run the
LM head in bf16 even on ``.float()`` inputs) and every float32 matmul/convolution backend computes in IEEE fp32.
Everything is put back as it was on leaving.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch

# Backends of torch's per-backend float32 precision settings (torch >= 2.9), parents before children: setting a
# parent also sets its children, so restoring in this order leaves each one at its own saved value.
_PRECISION_KNOBS = ("", "cuda.matmul", "cudnn", "cudnn.conv", "cudnn.rnn", "mkldnn", "mkldnn.matmul",
                    "mkldnn.conv", "mkldnn.rnn")
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


def _precision_knobs() -> list[object]:
    """The ``torch.backends`` objects with an ``fp32_precision`` setting in this torch version."""
    found = []
    for path in _PRECISION_KNOBS:
        obj: object = torch.backends
        for part in filter(None, path.split(".")):
            obj = getattr(obj, part, None)
        if obj is not None and hasattr(obj, "fp32_precision"):
            found.append(obj)
    return found


def _legacy_tf32_flags() -> list[tuple[object, bool]]:
    """The legacy ``allow_tf32`` flags that can be read now (torch refuses to read one that the newer API made
    ambiguous; such a flag is then carried by the ``fp32_precision`` settings, which are restored instead)."""
    flags = []
    for obj in (torch.backends.cuda.matmul, torch.backends.cudnn):
        try:
            flags.append((obj, bool(obj.allow_tf32)))
        except (RuntimeError, AttributeError):
            pass
    return flags


def _autocast_off(stack: ExitStack) -> None:
    for device in _AUTOCAST_DEVICES:
        try:
            enabled = torch.is_autocast_enabled(device)
        except (RuntimeError, TypeError, ValueError):  # a device type this build does not know
            continue
        if enabled:
            stack.enter_context(torch.autocast(device_type=device, enabled=False))


@contextmanager
def full_precision() -> Iterator[None]:
    """Within the context: autocast off on every device type, and float32 matmuls and convolutions in full IEEE
    fp32 (``torch.set_float32_matmul_precision('highest')``, TF32 off for cuBLAS and cuDNN, and every
    ``fp32_precision`` backend setting at ``'ieee'``). The previous settings are restored on leaving, also on an
    exception. Nesting is fine."""
    try:
        matmul = torch.get_float32_matmul_precision()
    except RuntimeError:  # the legacy and new APIs were mixed elsewhere: only the new settings are readable
        matmul = None
    legacy = _legacy_tf32_flags()
    knobs = [(obj, obj.fp32_precision) for obj in _precision_knobs()]
    with ExitStack() as stack:
        try:
            if matmul is not None:
                torch.set_float32_matmul_precision("highest")
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            for obj, _ in knobs:
                obj.fp32_precision = "ieee"
            _autocast_off(stack)
            yield
        finally:
            # legacy flags first (they also move the matmul precision), then the precision, then the per-backend
            # settings that were saved after both
            for obj, value in legacy:
                obj.allow_tf32 = value
            if matmul is not None:
                torch.set_float32_matmul_precision(matmul)
            for obj, value in knobs:
                obj.fp32_precision = value
