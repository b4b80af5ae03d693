"""MEMIT as an editing method: one closed-form edit of the MLP down projections, computed in the first epoch.

The deltas are low-rank factors per edited layer, Delta W_l = u_l @ v_l (rank = number of requests), applied by a
forward hook that adds ``(x @ v^T) @ u^T`` to the projection's output. The base weights are never written, so
switching the hooks off (``reference()``, p0) or clearing the factors restores the original model exactly.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from editing.core.digests import code_digest
from editing.evaluation.caching import CacheEntry, model_material
from editing.evaluation.incremental import COUNTERS, FrozenPrefix, key_of
from editing.methods.base import EditingModule, OptimizerConfig, RegularizationConfig
from editing.methods.memit.compute import KEY_CHUNK, layer_update, optimize_targets, request_keys
from editing.methods.memit.config import MEMITConfig, resolve_layers
from editing.methods.memit.covariance import CovarianceStats, layer_covariances
from editing.methods.memit.layers import down_projection, down_projection_name, is_transposed, model_type
from editing.methods.memit.requests import Request, RowBuilder, build_requests, context_templates
from editing.methods.one_shot import OneShotFit
from editing.models.architecture import num_layers
from editing.models.loading import ModelConfig

TARGET_CODE = ("editing.methods.memit.compute",)
"""The code that computes the cached target vectors (``optimize_targets`` and what it imports)."""


class MEMITEditor(OneShotFit, EditingModule):
    """Edit with MEMIT (SPEC section 10): target vectors by gradient steps, layer updates in closed form.

    Fitting computes the whole edit at the start of the first epoch from all canonical examples of the split (the
    requests); the DegradationBudget callback evaluates p0 before and the edited model after that epoch, and the
    run stops there. ``memit.supervision`` chooses the subject: the whole prefix, or an oracle entity span.

    Args:
        base: the base model.
        memit: MEMIT settings.
        optimizer: unused (MEMIT's only optimizer is the target optimization in ``memit``); kept so that configs
            and results have the same shape as the other methods'.
        regularization: unused for the same reason (MEMIT's KL term is ``memit.kl_factor``).
    """

    p0_is_base = True  # the factors start at rank 0: the model before the first step is the base model
    can_continue = True
    deltas_by_name = ("MEMIT factors of other layers", "memit.layers")  # their rank is the number of requests
    key_chunk = KEY_CHUNK
    """Requests whose keys are computed at a time while spreading (``compute.request_keys``): it bounds the memory,
    not the result."""
    config_class: type = MEMITConfig
    """The settings' class (the MEMIT family's other methods, subclasses of this one, have their own)."""
    settings_name = "memit"
    """The settings' constructor argument and hyperparameter group."""
    label = "MEMIT"
    """The method's name in progress messages."""
    one_process_reason = ("it takes no gradient steps, so there is nothing for DDP to average and no optimizer state "
                          "to shard, and a model that fits one device for a forward and backward pass fits it")
    solve_settings = frozenset({"covariance_weight", "covariance_samples", "covariance_batch_size",
                                "request_batch_size"})
    """Settings that do not change the target vectors (so they are left out of the targets' cache key)."""

    def __init__(self, base: ModelConfig | None = None, memit: MEMITConfig | None = None,
                 optimizer: OptimizerConfig | None = None, regularization: RegularizationConfig | None = None) -> None:
        self.memit_config = memit or self.config_class()
        self.memit_config.validate()
        super().__init__(base=base, optimizer=optimizer, regularization=regularization or RegularizationConfig("none"))
        self.hparams[self.settings_name] = asdict(self.memit_config)
        # the edit is one closed-form computation, not optimizer steps over batches
        self.automatic_optimization = False
        self.edit_timings: dict[str, float] = {}
        self.covariance_stats: CovarianceStats | None = None
        self.edit_diagnostics: dict = {}
        """What the last ``compute_edit`` aimed at and reached (``benchmarks/memit_efficacy.py`` reports it):
        ``targets`` z (n, d), ``target_loss`` the task loss per request at each optimization step (steps, n),
        ``templates``, and per edited layer the mean norm of the residual it was given and the fraction of it
        that its update realises at the requests' own keys (<Delta W k_i, r_i> / |r_i|^2)."""

    # deltas ------------------------------------------------------------------------------------------------
    def _prepare_deltas(self) -> None:
        self.memit_layers = self._edited_layers(model_type(self.model), num_layers(self.model.config))
        self.memit_u = nn.ParameterDict()
        self.memit_v = nn.ParameterDict()
        self._deltas_on = True
        self.chat = None  # the task data's chat template, set by compute_edit (editing.data.chat)
        self._handles = []
        for layer in self.memit_layers:
            module = down_projection(self.model, layer)
            out_features, in_features = (module.weight.shape[1], module.weight.shape[0]) if is_transposed(module) \
                else module.weight.shape
            # rank 0 until the edit is computed: the update is exactly zero
            self.memit_u[str(layer)] = nn.Parameter(torch.zeros(out_features, 0), requires_grad=False)
            self.memit_v[str(layer)] = nn.Parameter(torch.zeros(0, in_features), requires_grad=False)
            self._handles.append(module.register_forward_hook(self._make_hook(str(layer))))
        self.edited = False

    def _edited_layers(self, kind: str, total: int) -> list[int]:
        """The layers whose down projections the edit changes (``memit.layers`` or the model's default)."""
        return resolve_layers(self.memit_config, kind, total)

    def _make_hook(self, key: str):
        def hook(_module, args, output):
            u, v = self.memit_u[key], self.memit_v[key]
            if not self._deltas_on or u.shape[1] == 0:
                return output
            x = args[0]
            return output + ((x.float() @ v.T) @ u.T).to(output.dtype)

        return hook

    @contextmanager
    def deltas_off(self) -> Iterator[None]:
        """A context in which the model computes p0."""
        previous = self._deltas_on
        self._deltas_on = False
        try:
            yield
        finally:
            self._deltas_on = previous

    @contextmanager
    def reference(self) -> Iterator[nn.Module]:
        with self.deltas_off():
            yield self.model

    def evaluation_shortcut(self) -> FrozenPrefix:
        """The edit adds to the down projections of ``memit_layers`` only (hooks): the blocks below the lowest one
        are frozen."""
        return FrozenPrefix(min(self.memit_layers))

    def trainable_parameters(self) -> dict[str, torch.Tensor]:
        """The edit's factors by name (closed-form, so they never need gradients)."""
        return {n: p for n, p in self.named_parameters() if n.startswith(("memit_u.", "memit_v."))}

    def load_delta_state(self, state: dict[str, torch.Tensor]) -> None:
        """Set the factors from ``delta_state`` output (their rank may differ from the current one)."""
        params = self._deltas_for(state)
        with torch.no_grad():
            for name, p in params.items():
                p.data = state[name].to(p.device, torch.float32).clone()
        self.edited = any(p.shape[0] * p.shape[1] > 0 for p in params.values())

    def clear_edit(self) -> None:
        """Remove the edit: every factor back to rank 0 (the model is p0 again, bit for bit)."""
        self.load_delta_state({n: p.new_zeros(p.shape[0], 0) if n.startswith("memit_u.") else p.new_zeros(0, p.shape[1])
                               for n, p in self.trainable_parameters().items()})

    def weight_deltas(self, state: dict[str, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
        """Delta W per layer, as (out, in) matrices in float32."""
        state = state if state is not None else self.delta_state()
        return {layer: state[f"memit_u.{layer}"].float() @ state[f"memit_v.{layer}"].float()
                for layer in self.memit_layers}

    def edited_tensors(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """W + Delta W of every edited layer (W: the frozen weight, a base edit's under ``--base_edit``), float32,
        by the base model's parameter names."""
        tensors = {}
        for layer, delta in self.weight_deltas(state).items():
            projection = down_projection(self.model, layer)
            weight = projection.weight.detach().float().cpu()
            tensors[f"{down_projection_name(self.model, layer)}.weight"] = (
                weight + (delta.T if is_transposed(projection) else delta)).contiguous()
        return tensors

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        # the factors' rank is the number of requests: shape them as saved before Lightning loads the state dict
        state = checkpoint.get("state_dict", {})
        for name, p in self.trainable_parameters().items():
            if name in state:
                p.data = torch.zeros_like(state[name], dtype=torch.float32, device=p.device)
        self.edited = any(state[n].numel() > 0 for n in self.trainable_parameters() if n in state)

    # fitting -----------------------------------------------------------------------------------------------
    def canonical_requests(self, datamodule) -> list[Request]:
        """The requests of the DataModule's canonical examples (its records, with all their fields) under the
        configured supervision."""
        records = datamodule.records("canonical")
        return build_requests(records, self.memit_config, datamodule.task.name, str(datamodule.path("canonical")))

    def statistics(self, datamodule, progress: bool = True) -> CovarianceStats:
        """E[k k^T] of every edited layer over R (cached on disk)."""
        from editing.data.tokenize import ExampleTokenizer

        # every text of R (not the DataModule's general_limit), so the cached statistics depend only on the file and
        # the sample count
        path = datamodule.path("regularization")
        texts, _ = ExampleTokenizer(self.tokenizer, self.max_length).examples(
            datamodule.records("regularization", all_lines=True), str(path))
        # on p0: under a base edit the original model, whose fingerprint keys the cached statistics
        with self.reference():
            return layer_covariances(
                self.model, self.memit_layers, texts, fingerprint=self.identity["fingerprint"],
                corpus_sha=datamodule.sha256("regularization"), samples=self.memit_config.covariance_samples,
                precision=self.base_config.precision, batch_size=self.memit_config.covariance_batch_size,
                pad_id=self._pad_id, progress=progress,
                tokenizer=self.base_config.tokenizer or getattr(self.tokenizer, "name_or_path", None),
                max_length=self.max_length)

    @property
    def _pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def compute_edit(self, datamodule, requests: list[Request] | None = None, progress: bool = True) -> None:
        """Compute MEMIT's edit for the canonical examples (or ``requests``) and switch it on.

        Args:
            datamodule: the task's DataModule (canonical records, task loss, general set R).
            requests: the requests (default: from the DataModule's canonical examples).
            progress: show progress bars and log timings.
        """
        if datamodule.tokenizer is None:
            datamodule.attach(self.tokenizer, self.max_length)
        self.chat = getattr(datamodule, "chat", None)  # the prompts are asked as the task data is
        if self.task != datamodule.task:
            self.bind_task(datamodule.task)
        cfg = self.memit_config
        requests = requests if requests is not None else self.canonical_requests(datamodule)
        start = time.perf_counter()
        self.covariance_stats = self.statistics(datamodule, progress=progress)
        self.edit_timings = {"statistics_s": time.perf_counter() - start}
        start = time.perf_counter()
        self.clear_edit()
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.enable_grad():
                self._compute_deltas(requests, cfg, progress)
        finally:
            self.model.train(was_training)
        self.edit_timings["edit_s"] = time.perf_counter() - start
        if progress:
            rank_zero_info(f"{self.label}: {len(requests)} requests, layers {self.memit_layers}, statistics "
                           f"{self.edit_timings['statistics_s']:.1f}s, edit {self.edit_timings['edit_s']:.1f}s")

    def _compute_deltas(self, requests: list[Request], cfg: MEMITConfig, progress: bool) -> None:
        with self.deltas_off():
            templates = context_templates(self.model, self.tokenizer, cfg.context_templates,
                                          cfg.context_template_length)
        z = self.target_vectors(requests, templates, progress)
        self.spread_targets(requests, templates, z)

    def target_vectors(self, requests: list[Request], templates: list[str], progress: bool = False) -> torch.Tensor:
        """Step 1 of the edit: the target hidden states z (n, d) at the last edited layer, a batch of requests at a
        time, on p0; records them, the templates and the task loss per step in ``edit_diagnostics``."""
        cfg = self.memit_config
        builder = RowBuilder(self.tokenizer, self.max_length, chat=self.chat)
        last = self.memit_layers[-1]
        targets, traces = [], []
        with self.deltas_off():
            for start in range(0, len(requests), cfg.request_batch_size):
                chunk = requests[start: start + cfg.request_batch_size]
                label = f"MEMIT targets, requests {start + 1}-{start + len(chunk)} of {len(requests)}"
                rows, kl_rows = builder.rows(chunk, templates, with_suffixes=True), builder.kl_rows(chunk)
                entry = self._target_entry(rows, kl_rows, len(chunk), len(templates), last)
                found = entry.load_tensors() if entry is not None else None
                if found is not None and {"targets", "trace"} <= set(found):
                    COUNTERS["memit_targets_reused"] += 1
                    targets.append(found["targets"].to(self.device))
                    traces.append(found["trace"])
                    continue
                trace: list[torch.Tensor] = []
                targets.append(optimize_targets(
                    self.model, rows, kl_rows, len(chunk), len(templates), last, self.task.loss, cfg, self._pad_id,
                    progress=progress and label, trace=trace))
                traces.append(torch.stack(trace))
                if entry is not None:
                    COUNTERS["memit_targets_computed"] += 1
                    entry.store_tensors({"targets": targets[-1], "trace": traces[-1]})
        z = torch.cat(targets)
        self.edit_diagnostics = {"targets": z.detach().cpu(), "target_loss": torch.cat(traces, dim=1).cpu(),
                                 "templates": templates, "layers": []}
        return z

    def _target_entry(self, rows: list, kl_rows: list, n_requests: int, n_templates: int,
                      layer: int) -> CacheEntry | None:
        """Where a batch's target vectors are cached, or None when this fit does not reuse the base model's numbers.

        The targets are computed on p0 alone, so they depend on the model, the rows (token ids, positions), the task
        loss and the target settings, not on the covariance settings that sweeps vary: trials that differ only in
        ``covariance_weight``, seeds, and a second fit share them.
        """
        if not self.reuse_base_numbers or self.base_edit is not None:
            return None  # under a base edit the targets are computed on the edited model, not the base model
        solve_only = self.solve_settings
        material = {"kind": "memit_targets", "model": model_material(self.model, self.identity),
                    "code": code_digest(*TARGET_CODE),
                    "rows": key_of({"rows": [asdict(r) for r in rows], "kl": [asdict(r) for r in kl_rows]}),
                    "requests": n_requests, "templates": n_templates, "layer": layer, "loss": str(self.task.loss),
                    "pad": self._pad_id,
                    "settings": {k: v for k, v in asdict(self.memit_config).items() if k not in solve_only}}
        return CacheEntry("memit_targets", material, finite=True)

    def spread_targets(self, requests: list[Request], templates: list[str], z: torch.Tensor) -> None:
        """Step 2: spread the change toward ``z`` over the edited layers in ascending order, each seeing the edits
        below it (replaces any edit already there); records per layer what its update realises."""
        self.clear_edit()
        builder = RowBuilder(self.tokenizer, self.max_length, chat=self.chat)
        last = self.memit_layers[-1]
        self.edit_diagnostics.setdefault("layers", []).clear()
        for i, layer in enumerate(self.memit_layers):
            # the keys see the edits of the layers below; one chunk of requests' rows at a time
            keys, current = request_keys(self.model, builder, requests, templates, layer, last, self._pad_id,
                                         self.key_chunk)
            residual = (z.to(current.device) - current) / (len(self.memit_layers) - i)
            moment = self.covariance_stats.moments[layer]
            u, v = self._layer_update(layer, keys, residual)
            self.edit_diagnostics["layers"].append({
                "layer": layer, **_realised(keys, residual, u, v), **_key_geometry(keys, moment)})
            with torch.no_grad():
                self.memit_u[str(layer)].data = u.float().to(self.device)
                self.memit_v[str(layer)].data = v.float().to(self.device)
        self.edited = True

    def _layer_update(self, layer: int, keys: torch.Tensor,
                      residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's update as factors (u, v), Delta W = u @ v: MEMIT's R K^T (lambda C + K K^T)^-1."""
        return layer_update(keys, residual, self.covariance_stats.moments[layer], self.memit_config.covariance_weight)


def _realised(keys: torch.Tensor, residual: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> dict[str, float]:
    """The mean norm of the residuals r_i a layer was given and the mean fraction of r_i its update realises at the
    requests' own keys, <Delta W k_i, r_i> / |r_i|^2.

    Delta W = u v is formed (d_out x d_in) rather than V K^T (n x n): the same numbers up to float64 rounding, with
    memory and work linear in the number of requests."""
    delta_w = u @ v
    realised = keys.to(delta_w) @ delta_w.T  # row i: Delta W k_i
    r = residual.to(realised)
    return {"residual_norm": r.norm(dim=1).mean().item(),
            "realised_fraction": ((realised * r).sum(1) / r.pow(2).sum(1).clamp(min=1e-30)).mean().item()}


def _key_geometry(keys: torch.Tensor, moment: torch.Tensor) -> dict[str, float]:
    """How the requests' keys look to the update, in the metric of C: the mean of k^T C^-1 k (a key drawn like R's
    tokens averages the key width, trace(C^-1 C); against lambda it sets how much of a residual one key's update can
    realise), and the mean cosine between two requests' keys in that metric (near 1: the keys are nearly one
    direction, so the update cannot tell the requests apart).

    The cosines are summed without the (n, n) Gram matrix: with m_i = |k_i|_C, the sum over all pairs of
    k_i^T C^-1 k_j / (m_i m_j) is (sum_i k_i / m_i)^T C^-1 (sum_j k_j / m_j), from which the n diagonal terms are
    taken away."""
    k = keys.double()
    whitened = torch.linalg.solve(moment.double().to(k.device), k.T).T  # rows C^-1 k_i
    square = (k * whitened).sum(1)  # k_i^T C^-1 k_i
    norms = square.clamp(min=1e-30).sqrt()
    n = len(k)
    if n > 1:
        pairs = (k / norms[:, None]).sum(0) @ (whitened / norms[:, None]).sum(0)
        off = (pairs - (square / norms**2).sum()) / (n * (n - 1))
    else:
        off = torch.tensor(float("nan"))
    return {"key_mahalanobis": square.mean().item(), "key_cosine_c": off.item()}
