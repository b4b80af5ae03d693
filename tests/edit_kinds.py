"""Saved edits of every kind on tiny models, made without a fit (random deltas, then the method's own export), for
the tests of ``editing generate`` and of combining edits."""

from __future__ import annotations

from pathlib import Path

import torch

from editing.models.loading import ModelConfig

KINDS = ("lora", "full", "memit", "senses")
BASES = {"lora": "tiny-gpt2", "full": "tiny-gpt2", "memit": "tiny-gpt2", "senses": "tiny-backpack"}


def make_module(kind: str, seed: int = 0, scale: float = 1.0,
                tensors: tuple[str, ...] = ("transformer.h.1.mlp.c_fc.weight",),
                layers: tuple[int, ...] = (1,), data_root: Path | None = None, model: str | None = None):
    """A module of method ``kind`` whose deltas are random and large enough to change greedy continuations.

    Args:
        kind: lora, full, memit or senses.
        seed: the seed of the random deltas.
        scale: their size.
        tensors: full finetuning: the parameters to change (each gets a random addition).
        layers: MEMIT: the edited layers (each a random rank-2 update).
        data_root: senses: the task data the sense selection reads.
        model: the base model (default: ``BASES[kind]``).
    """
    generator = torch.Generator().manual_seed(seed)
    base = ModelConfig(name=model or BASES[kind], precision="fp32")
    if kind == "lora":
        from editing.methods.lora import LoRAConfig, LoRAEditor

        module = LoRAEditor(base, lora=LoRAConfig(rank=2))
        with torch.no_grad():
            for p in module.trainable_parameters().values():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5 * scale)
    elif kind == "full":
        from editing.methods.full import FullEditor

        module = FullEditor(base, gradient_checkpointing=False)
        params = dict(module.model.named_parameters())
        with torch.no_grad():
            for name in tensors:
                params[name].add_(torch.randn(params[name].shape, generator=generator) * scale)
    elif kind == "memit":
        from editing.methods.memit import MEMITConfig, MEMITEditor

        module = MEMITEditor(base, memit=MEMITConfig(layers=list(layers)))
        state = {}
        for name, p in module.trainable_parameters().items():
            shape = (p.shape[0], 2) if name.startswith("memit_u.") else (2, p.shape[1])
            state[name] = torch.randn(shape, generator=generator) * scale
        module.load_delta_state(state)
    elif kind == "senses":
        from editing.data.datamodule import TaskDataModule
        from editing.methods.senses import SensesConfig, SensesEditor

        module = SensesEditor(base, senses=SensesConfig(senses_per_example=5))
        dm = TaskDataModule(task="country_capital", data_root=str(data_root), eval_limit=6, general_limit=8)
        dm.attach(module.tokenizer, module.max_length)
        module.select(dm)
        with torch.no_grad():
            vectors = module.sense_deltas.vectors
            vectors.copy_(torch.randn(vectors.shape, generator=generator) * 5.0 * scale)
    else:
        raise ValueError(kind)
    return module


def make_edit(kind: str, folder: Path, **kwargs) -> Path:
    """``make_module(kind, ...)`` exported into ``folder``."""
    return make_module(kind, **kwargs).export_edit(folder)
