"""LoRA editing: adapters are the only trainable deltas; p0 is the same model with the adapter disabled."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from editing.methods.base import EditingModule, OptimizerConfig, RegularizationConfig
from editing.methods.lora.config import LoRAConfig, lora_layers, mlp_target_modules
from editing.methods.lora.merged import merged_adapters
from editing.models.architecture import num_layers
from editing.models.loading import ModelConfig


class LoRAEditor(EditingModule):
    """Edit with LoRA adapters on the MLP up/down projections (peft).

    Args:
        base: the base model.
        lora: adapter settings.
        optimizer: optimizer settings.
        regularization: regularization toward p0.
    """

    trains_behind_context_prefixes = True

    p0_is_base = True  # LoRA B starts at zero: the model before the first step is the base model
    can_continue = True

    def __init__(self, base: ModelConfig | None = None, lora: LoRAConfig | None = None,
                 optimizer: OptimizerConfig | None = None, regularization: RegularizationConfig | None = None) -> None:
        self.lora_config = lora or LoRAConfig()
        super().__init__(base=base, optimizer=optimizer, regularization=regularization)
        self.hparams["lora"] = dict(vars(self.lora_config))

    def _prepare_deltas(self) -> None:
        from peft import LoraConfig, get_peft_model

        cfg = self.lora_config
        config = self.model.config
        layers = lora_layers(cfg, num_layers(config))
        targets = cfg.target_modules or mlp_target_modules(config.model_type)
        peft_config = LoraConfig(
            r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
            layers_to_transform=layers, bias="none", fan_in_fan_out=config.model_type in ("gpt2", "backpack-gpt2"),
        )
        self.model = get_peft_model(self.model, peft_config)
        self.lora_layers = layers

    @contextmanager
    def reference(self) -> Iterator[nn.Module]:
        with self.model.disable_adapter():
            yield self.model

    @contextmanager
    def evaluation_weights(self) -> Iterator[nn.Module]:
        """The adapter merged into the base weights for an epoch's evaluation (one product per adapted layer instead
        of the rank-r branch beside it); the base weights are back bit for bit on exit (``merged_adapters``)."""
        with merged_adapters(self.model) as model:
            yield model

    def edited_tensors(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Each adapted weight merged, W + scale * B A (W: the frozen weight, a base edit's under ``--base_edit``),
        by the base model's parameter names, for the adapter ``state`` (default: the current one)."""
        from peft.tuners.lora.layer import LoraLayer

        current = None
        if state is not None:
            current = self.delta_state()
            self.load_delta_state(state)
        try:
            with merged_adapters(self.model):
                return {f"{name}.weight": module.get_base_layer().weight.detach().to("cpu", copy=True)
                        for name, module in self.loaded.model.named_modules() if isinstance(module, LoraLayer)}
        finally:
            if current is not None:
                self.load_delta_state(current)

    def train_mode_modules(self) -> list[nn.Module]:
        return [m for n, m in self.model.named_modules() if n.endswith("lora_dropout")]
