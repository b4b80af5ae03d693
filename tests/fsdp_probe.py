"""A callback for the FSDP tests (``--trainer.callbacks+=fsdp_probe.ShardProbe``): after each training epoch every
process writes, for the model and for p0, how many weights it holds locally and how many the full tensors have."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
from torch.distributed.tensor import DTensor


def _held(model) -> dict:
    local = full = 0
    kinds = set()
    for p in model.parameters():
        kinds.add(type(p).__name__ if not isinstance(p, DTensor) else "DTensor")
        full += p.numel()
        local += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
    return {"local": local, "full": full, "kinds": sorted(kinds),
            "trainable": sum(p.requires_grad for p in model.parameters())}


class ShardProbe(L.Callback):
    """Writes ``<$FSDP_PROBE_DIR>/rank<r>_epoch<e>.json``."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        out = Path(os.environ["FSDP_PROBE_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        record = {"model": _held(pl_module.model), "p0": _held(pl_module._p0[0]), "world": trainer.world_size}
        (out / f"rank{trainer.global_rank}_epoch{trainer.current_epoch}.json").write_text(json.dumps(record))
