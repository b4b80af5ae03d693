"""AlphaEdit as an editing method (SPEC section 12): MEMIT's edit with each layer's update projected onto the null
space of the general corpus's keys.

A member of the MEMIT family: the requests, context templates, target vectors (and their cache), the spread over
the layers, the covariance statistics and the edit's form (low-rank factors applied by hooks, the base weights never
written) are MEMIT's; only the layer's solve differs. The keys of the edit (K, per layer) are kept, with those of
earlier edits of a sequence (Kp, ``previous_keys``), so that a later step can pass them on (``sequence_keys``; the
saved edit holds them too, ``editing.methods.alphaedit.edit``).
"""

from __future__ import annotations

import torch

from editing.methods.alphaedit.compute import null_space_projector, null_space_update
from editing.methods.alphaedit.config import AlphaEditConfig
from editing.methods.base import OptimizerConfig, RegularizationConfig
from editing.methods.memit.module import MEMITEditor
from editing.methods.memit.requests import Request
from editing.models.loading import ModelConfig

KEYS_FILE = "alphaedit_keys.safetensors"
"""The saved edit's file of sequence keys (``layer.<l>``: (m, d_in) float64), written by
``editing.methods.alphaedit.edit``."""


class AlphaEditEditor(MEMITEditor):
    """Edit with AlphaEdit (SPEC section 12): MEMIT's targets and residuals, the update of each layer confined to
    the null space P of C: Delta^T = (P (K K^T + Kp Kp^T) + L2 I)^-1 P K R^T.

    Args:
        base: the base model.
        alphaedit: AlphaEdit settings.
        optimizer: unused (the target optimization's settings are in ``alphaedit``); kept for the configs' shape.
        regularization: unused (the KL term is ``alphaedit.kl_factor``).
    """

    config_class = AlphaEditConfig
    settings_name = "alphaedit"
    label = "AlphaEdit"
    solve_settings = frozenset({"threshold", "l2", "covariance_samples", "covariance_batch_size",
                                "request_batch_size"})

    def __init__(self, base: ModelConfig | None = None, alphaedit: AlphaEditConfig | None = None,
                 optimizer: OptimizerConfig | None = None, regularization: RegularizationConfig | None = None) -> None:
        super().__init__(base=base, memit=alphaedit, optimizer=optimizer, regularization=regularization)
        self.previous_keys: dict[int, torch.Tensor] = {}
        """Kp per layer: the keys (m, d_in) of the edits made earlier in a sequence (empty: a single batch)."""
        self.edit_keys: dict[int, torch.Tensor] = {}
        """K per layer: the keys (n, d_in) of this edit's requests, as the layer's solve saw them."""
        self.projectors: dict[int, torch.Tensor] = {}
        """P per layer, from the last ``compute_edit``."""

    @property
    def alphaedit_config(self) -> AlphaEditConfig:
        """The AlphaEdit settings."""
        return self.memit_config

    def set_previous_keys(self, keys: dict[int, torch.Tensor]) -> None:
        """Set Kp (per edited layer, (m, d_in)) for the next ``compute_edit``: a sequence's earlier edits' keys,
        e.g. ``sequence_keys()`` of the previous step or the keys file of its saved edit."""
        unknown = set(keys) - set(self.memit_layers)
        if unknown:
            from editing.core.errors import ConfigError

            raise ConfigError(f"previous AlphaEdit keys of layers {sorted(unknown)}, but this edit changes layers "
                              f"{self.memit_layers}; pass the keys of an edit of the same alphaedit.layers")
        self.previous_keys = {int(layer): k.detach().double().cpu() for layer, k in keys.items()}

    def _continue_sequence(self, base_edit) -> None:
        """A fit on top of an AlphaEdit edit (``--base_edit``) keeps its Kp: the keys of every earlier step (the
        base edit's keys file) join the preserved keys. A base edit of another method brings none."""
        keys = base_edit.files.get(KEYS_FILE)
        if keys is not None:
            self.set_previous_keys({int(name.split(".", 1)[1]): k for name, k in keys.items()})

    def sequence_keys(self, state: dict[str, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
        """Kp for the next step of a sequence: per layer the previous keys followed by this edit's, or the previous
        ones alone when ``state`` (default: the current deltas) holds no edit (rank 0, e.g. a ball's empty edit)."""
        state = state if state is not None else self.delta_state()
        edited = any(t.numel() for n, t in state.items() if n.startswith("memit_v."))
        out = {}
        for layer in self.memit_layers:
            width = self.memit_v[str(layer)].shape[1]
            parts = [self.previous_keys.get(layer, torch.zeros(0, width, dtype=torch.float64))]
            if edited and layer in self.edit_keys:
                parts.append(self.edit_keys[layer])
            out[layer] = torch.cat([p.double().cpu() for p in parts])
        return out

    def _compute_deltas(self, requests: list[Request], cfg: AlphaEditConfig, progress: bool) -> None:
        stats = self.covariance_stats
        self.projectors = {layer: null_space_projector(stats.moments[layer], cfg.threshold,
                                                       stats.materials.get(layer))[0]
                           for layer in self.memit_layers}
        self.edit_keys = {}
        super()._compute_deltas(requests, cfg, progress)

    def _layer_update(self, layer: int, keys: torch.Tensor,
                      residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.edit_keys[layer] = keys.detach().double().cpu()
        return null_space_update(keys, residual, self.projectors[layer], self.previous_keys.get(layer),
                                 self.memit_config.l2)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["alphaedit_keys"] = {"previous": self.previous_keys, "edit": self.edit_keys}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        keys = checkpoint.get("alphaedit_keys") or {}
        self.previous_keys = dict(keys.get("previous") or {})
        self.edit_keys = dict(keys.get("edit") or {})
