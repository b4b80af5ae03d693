"""ROME as an editing method (SPEC section 11): per request, a value v* by gradient steps at one layer's down
projection output, then a rank-one closed-form update of that projection, requests one after another.

It is a member of the MEMIT family and reuses MEMIT's parts: the requests and their subjects, the context templates,
the rows, the target optimization (at the down projection's output, with the decay divided by |v0|^2), the
covariance statistics and their cache, and the edit's form (low-rank factors applied by a hook, the base weights
never written, so ``reference()`` is exact; rank = the number of requests).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from editing.methods.base import OptimizerConfig, RegularizationConfig
from editing.methods.memit.compute import mean_over_templates, optimize_targets, subject_activations
from editing.methods.memit.covariance import CovarianceStats
from editing.methods.memit.module import MEMITEditor
from editing.methods.memit.requests import Request, RowBuilder, context_templates
from editing.methods.rome.compute import rank_one_update
from editing.methods.rome.config import ROMEConfig, resolve_layer
from editing.models.loading import ModelConfig


class ROMEEditor(MEMITEditor):
    """Edit with ROME (SPEC section 11): one layer, one rank-one update per request, each computed on the model as
    already edited by the earlier ones.

    The edit is computed at the start of the first epoch, as MEMIT's. ``rome.use_statistics`` false takes C = I
    (no pass over R).

    Args:
        base: the base model.
        rome: ROME settings.
        optimizer: unused (the value optimization's settings are in ``rome``); kept for the configs' shape.
        regularization: unused (the KL term is ``rome.kl_factor``).
    """

    config_class = ROMEConfig
    settings_name = "rome"
    label = "ROME"

    def __init__(self, base: ModelConfig | None = None, rome: ROMEConfig | None = None,
                 optimizer: OptimizerConfig | None = None, regularization: RegularizationConfig | None = None) -> None:
        super().__init__(base=base, memit=rome, optimizer=optimizer, regularization=regularization)

    @property
    def rome_config(self) -> ROMEConfig:
        """The ROME settings."""
        return self.memit_config

    def _edited_layers(self, kind: str, total: int) -> list[int]:
        return [resolve_layer(self.memit_config, kind, total)]

    def statistics(self, datamodule, progress: bool = True) -> CovarianceStats:
        """C of the edited layer over R (MEMIT's cached statistics), or the identity when ``use_statistics`` is
        false."""
        if self.memit_config.use_statistics:
            return super().statistics(datamodule, progress)
        layer = self.memit_layers[0]
        width = self.memit_v[str(layer)].shape[1]
        return CovarianceStats({layer: torch.eye(width, dtype=torch.float64, device=self.device)}, [], 0.0)

    def _compute_deltas(self, requests: list[Request], cfg: ROMEConfig, progress: bool) -> None:
        with self.deltas_off():
            templates = context_templates(self.model, self.tokenizer, cfg.context_templates,
                                          cfg.context_template_length)
        columns, rows, targets, traces = [], [], [], []
        for column, row, target, trace in self.rank_one_updates(requests, templates, progress):
            columns.append(column)
            rows.append(row)
            targets.append(target)
            traces.append(trace)
            self._set_factors(torch.cat(columns, dim=1), torch.cat(rows, dim=0))
        self.edit_diagnostics = {"targets": torch.cat(targets).cpu(), "templates": templates, "layers": [],
                                 "target_loss": torch.cat(traces, dim=1).cpu() if traces else torch.zeros(0, 0)}

    def rank_one_updates(self, requests: list[Request], templates: list[str],
                         progress: bool = False) -> Iterator[tuple[torch.Tensor, ...]]:
        """Per request, in order: its update's factors (column (d_out, 1), row (1, d_in); float64), its value v*
        (1, d_out) and the task loss per optimization step (steps, 1). The caller applies each update before asking
        for the next, so every request sees the earlier ones."""
        cfg = self.memit_config
        layer = self.memit_layers[0]
        builder = RowBuilder(self.tokenizer, self.max_length, chat=self.chat)
        moment = self.covariance_stats.moments[layer]
        # one bar over the requests, not one per request's steps: a fit's stderr stays short (a parent reading it
        # through a pipe only at the end would otherwise block the fit once the pipe is full)
        for request in tqdm(requests, desc="ROME requests", disable=not progress, file=sys.stderr, leave=False):
            trace: list[torch.Tensor] = []
            target = optimize_targets(self.model, builder.rows([request], templates, with_suffixes=True),
                                      builder.kl_rows([request]), 1, len(templates), layer, self.task.loss, cfg,
                                      self._pad_id, trace=trace, site="value", decay_power=2)
            key_rows = builder.rows([request], templates, with_suffixes=False)
            key = mean_over_templates(subject_activations(self.model, key_rows, layer, "key", self._pad_id),
                                      key_rows, 1)
            bare = [r for r in key_rows if r.template == 0]
            bare_key = subject_activations(self.model, bare, layer, "key", self._pad_id)
            bare_value = subject_activations(self.model, bare, layer, "value", self._pad_id)
            column, row = rank_one_update(key[0], bare_key[0], bare_value[0], target[0], moment)
            yield column, row, target, torch.stack(trace)

    def _set_factors(self, column: torch.Tensor, row: torch.Tensor) -> None:
        key = str(self.memit_layers[0])
        with torch.no_grad():
            self.memit_u[key].data = column.float().to(self.device)
            self.memit_v[key].data = row.float().to(self.device)
        self.edited = True
