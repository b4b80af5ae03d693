"""Full finetuning: all weights train; p0 is a frozen copy kept outside the module's parameters (sharded like the
model under FSDP2)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from editing.core.errors import ConfigError
from editing.methods.base import EditingModule, OptimizerConfig, RegularizationConfig
from editing.models.architecture import blocks
from editing.models.loading import ModelConfig


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability of ``model`` to zero (modules and the float attributes attention reads)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for attr in ("attention_dropout", "dropout", "dropout_p"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)


class FullEditor(EditingModule):
    """Edit by finetuning every weight of the model.

    Args:
        base: the base model.
        gradient_checkpointing: recompute activations in the backward pass when the model supports it (saves
            memory for a copy-heavy method; costs about one more forward pass).
        layers: train only these transformer blocks (0-based); the embeddings, the other blocks, the final norm and
            the LM head stay frozen. None (the default): every weight trains. Evaluation then runs only the blocks
            from the lowest one up each epoch (``editing.evaluation.incremental``).
        optimizer: optimizer settings.
        regularization: regularization toward p0.
    """

    trains_behind_context_prefixes = True

    p0_is_base = True  # the model before the first step is the base model (p0 is a frozen copy of it)
    can_continue = True
    reference_shares_weights = False  # p0 is the copy taken before a base edit was written: the original

    def __init__(self, base: ModelConfig | None = None, gradient_checkpointing: bool = True,
                 layers: list[int] | None = None, optimizer: OptimizerConfig | None = None,
                 regularization: RegularizationConfig | None = None) -> None:
        self.gradient_checkpointing = gradient_checkpointing
        self.layers = None if layers is None else list(layers)
        super().__init__(base=base, optimizer=optimizer, regularization=regularization)
        self.hparams["gradient_checkpointing"] = gradient_checkpointing
        self.hparams["layers"] = self.layers

    def _prepare_deltas(self) -> None:
        # p0 lives in a plain list so it is neither a parameter of this module nor in its state dict.
        frozen = copy.deepcopy(self.model)
        frozen.requires_grad_(False)
        frozen.eval()
        self._p0 = [frozen]
        if self.layers is None:
            self.model.requires_grad_(True)
        else:
            stack = blocks(self.model)
            bad = [i for i in self.layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(stack)]
            if bad or not self.layers or len(set(self.layers)) != len(self.layers):
                raise ConfigError(f"--model.init_args.layers={self.layers!r}: give distinct block numbers in "
                                  f"0..{len(stack) - 1} (or null to train every weight)")
            for i in self.layers:
                stack[i].requires_grad_(True)
        self._checkpointing = bool(self.gradient_checkpointing
                                   and getattr(self.model, "supports_gradient_checkpointing", False))
        if self._checkpointing:
            # Hugging Face checkpoints only in train mode, so the model trains in train mode with every dropout
            # off: p stays as deterministic as p0 (KL is still exactly zero before the first step).
            disable_dropout(self.model)
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def train_mode_modules(self) -> list[nn.Module]:
        return [self.model] if self._checkpointing else []

    @property
    def sharded(self) -> bool:
        """Whether the model and p0 are sharded over the devices (FSDP2, see ``configure_model``)."""
        return getattr(self, "_sharded", False)

    def configure_model(self) -> None:
        """Under Lightning's ``ModelParallelStrategy`` (FSDP2): shard each transformer block, then the rest of the
        model, over the data-parallel devices; p0 is sharded the same way and stays frozen, so each device holds
        1/N of the model, of p0 and of the optimizer state. Without a device mesh (one device, DDP) nothing
        changes."""
        mesh = self.device_mesh
        if mesh is None or self.sharded:
            return
        from torch.distributed.fsdp import fully_shard

        if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() != 1:
            raise ConfigError("full finetuning shards the model over data-parallel devices only: use "
                              "ModelParallelStrategy(tensor_parallel_size=1)")
        data_parallel = mesh["data_parallel"] if mesh.mesh_dim_names else mesh
        for model in (self.model, self._p0[0]):
            for block in blocks(model):
                fully_shard(block, mesh=data_parallel)
            fully_shard(model, mesh=data_parallel)
        self._sharded = True

    def evaluation_shortcut(self):
        # sharded, every process must run the same forward passes in the same order (their all-gathers meet):
        # the full model on every batch
        return None if self.sharded else super().evaluation_shortcut()

    @contextmanager
    def reference(self) -> Iterator[nn.Module]:
        p0 = self._p0[0]
        if self.sharded:
            try:
                yield p0
            finally:
                p0.reshard()  # the root's gathered weights (kept after a forward pass) are freed again
            return
        if p0.device != self.device:  # the frozen copy follows the module across devices
            p0.to(self.device)
        yield p0

    def edited_tensors(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The tensors that differ from p0 (the original base model, under a base edit too)."""
        return self.changed_tensors(state)

    def changed_tensors(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Tensors of the edit that differ from p0, by the base model's parameter names."""
        state = state if state is not None else self.delta_state()
        reference = dict(self._p0[0].named_parameters())
        out = {}
        for name, value in state.items():
            key = name[len("model."):] if name.startswith("model.") else name
            if not torch.equal(value, reference[key].detach().to(value.device, value.dtype)):
                out[key] = value.contiguous()
        return out
