"""Callbacks the method contract (``tests/methods/test_contract.py``) adds to a method's tiny ``editing fit`` by
``class_path``: one keeps the fitted module and what it computed before the edit for the in-process tests, one pauses
a fit after its first epoch for the kill -9 test."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch
from torch import nn

CAPTURED: dict[str, dict] = {}
"""Per ``Capture.key``: ``module`` (the fitted module), ``before`` (its state dict at the start of the fit, after
setup made the deltas), ``model_before`` and ``reference_before`` (logits of the probe inputs)."""


@torch.no_grad()
def probe_logits(model: nn.Module, probes: list[list[int]]) -> list[torch.Tensor]:
    """The logits of each probe sequence (one forward pass each, no padding), in eval mode; the modules' training
    flags are put back afterwards (Lightning set them for the fit)."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        device = next(model.parameters()).device
        return [model(input_ids=torch.tensor([ids], device=device)).logits[0].detach().to("cpu", copy=True)
                for ids in probes]
    finally:
        for m, mode in modes.items():
            m.training = mode


def probe_ids(module, task: str, limit: int = 3) -> list[list[int]]:
    """Token ids of the first ``limit`` evaluation sequences of ``task`` (what the edit is about), by the module's
    tokenizer."""
    from editing.data.datamodule import TaskDataModule

    dm = TaskDataModule(task=task, eval_limit=limit, general_limit=1)
    dm.attach(module.tokenizer, module.max_length)
    return [s.ids for e in dm.load("evaluation").examples for s in e.sequences][:limit]


class Capture(L.Callback):
    """Keep the module of an in-process fit, its state and probe logits before the edit, under ``key``."""

    def __init__(self, key: str, task: str) -> None:
        self.key, self.task = key, task

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        probes = probe_ids(pl_module, self.task)
        with pl_module.reference() as p0:
            reference = probe_logits(p0, probes)
        CAPTURED[self.key] = {
            "module": pl_module, "probes": probes, "reference_before": reference,
            "model_before": probe_logits(pl_module.model, probes),
            "before": {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}}

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        CAPTURED[self.key]["module"] = pl_module


class PauseAfterFirstEpoch(L.Callback):
    """Once: when the first training epoch is over and checkpointed (at the start of the second; for a method whose
    edit is one epoch, at the end of the fit, after ModelCheckpoint's ``on_train_end`` wrote ``last.ckpt`` and
    before the degradation budget's ``on_fit_end`` writes the results: the CLI adds the budget after the
    ``--trainer.callbacks``), write ``marker`` with the number of finished epochs and wait for the test to kill the
    process (or to create ``go``)."""

    def __init__(self, marker: str, go: str) -> None:
        self.marker, self.go = Path(marker), Path(go)

    def _pause(self, finished: int) -> None:
        if self.marker.exists():
            return
        self.marker.write_text(str(finished))
        deadline = time.time() + 600
        while not self.go.exists() and time.time() < deadline:
            time.sleep(0.05)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.current_epoch == 1:
            self._pause(1)

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        self._pause(trainer.current_epoch)


class DevicesSeen(L.Callback):
    """Record under ``key`` (``CAPTURED[key]["devices"]``) the device types of the module's tensors at the end of
    each training epoch (Lightning moves the module back to the CPU when the fit ends): its parameters and buffers,
    the L2/EWC start values, MEMIT's statistics and full finetuning's frozen p0 copy where the method has them."""

    def __init__(self, key: str) -> None:
        self.key = key

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        tensors = list(pl_module.parameters()) + list(pl_module.buffers())
        tensors += list(getattr(pl_module, "_initial", {}).values())
        stats = getattr(pl_module, "covariance_stats", None)
        if stats is not None:
            tensors += list(stats.moments.values())
        if getattr(pl_module, "_p0", None):
            tensors += list(pl_module._p0[0].parameters())
        CAPTURED.setdefault(self.key, {}).setdefault("devices", set()).update(t.device.type for t in tensors)
