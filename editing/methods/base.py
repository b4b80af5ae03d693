"""The editing base LightningModule: a frozen base model plus trainable deltas and its training step (SPEC section 4).

Methods subclass it: they say which parameters are trainable (``_prepare_deltas``) and how p0 is obtained
(``reference``); their sub-package registers how their edit is written and loaded (``editing.methods.registry``). The
training step, the regularizers and the optimizer are shared, and every method is measured by the same
``editing.evaluation.Evaluator``, so every method is trained and measured the same way. ``reference``,
``delta_state``/``load_delta_state`` and ``export_edit`` are the small interface the callbacks use.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning as L
import torch
from torch import nn

from editing.core.errors import ConfigError
from editing.core.files import write_text
from editing.core.types import MethodName
from editing.evaluation.evaluator import METRIC_NAMES, Evaluator
from editing.evaluation.incremental import FrozenPrefix, Shortcut, first_changed_block
from editing.evaluation.scorer import example_nll, sequence_nll
from editing.methods.base_edit import BaseEdit
from editing.methods.regularizers import REGULARIZERS, ewc_penalty, kl_to_reference, l2_to_reference
from editing.models.loading import LoadedModel, ModelConfig, load_model
from editing.rules.losses import training_loss
from editing.rules.tasks import TaskSpec

log = logging.getLogger(__name__)


@dataclass
class OptimizerConfig:
    """Adam with cosine decay to zero over the run (SPEC section 6)."""

    lr: float = 1e-4
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.995)
    """Adam betas."""
    weight_decay: float = 0.0
    """Adam weight decay."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """Learning-rate schedule over all optimizer steps of the run."""
    eight_bit: bool = False
    """8-bit Adam from bitsandbytes (CUDA only)."""

    def __post_init__(self) -> None:
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"model.optimizer.lr={self.lr} must be a positive learning rate, e.g. 1e-4")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"model.optimizer.betas={list(self.betas)} must be two numbers in [0, 1), "
                              "e.g. [0.9, 0.995]")
        if not self.weight_decay >= 0:
            raise ConfigError(f"model.optimizer.weight_decay={self.weight_decay} must be >= 0")


@dataclass
class RegularizationConfig:
    """Pull toward the unedited model p0, computed on the general set R (SPEC section 4)."""

    kind: Literal["kl", "l2", "ewc", "none"] = "kl"
    """``kl``: KL(p0 || p) on one batch of R per optimizer step; ``l2``/``ewc``: toward p0's parameters."""
    weight: float = 0.5
    """Weight of the regularization term."""
    fisher_batches: int = 8
    """Batches of R used to estimate EWC's Fisher information."""


class EditingModule(L.LightningModule):
    """A language model under evaluation, and (in subclasses) under editing.

    Args:
        base: which model to load and at what precision.
        optimizer: optimizer settings (training only).
        regularization: regularization toward p0 (training only).
    """

    method: MethodName = MethodName.NONE
    """The method's name in results and checkpoints; set by ``editing.methods.registry.register`` (``none``: the
    unedited model)."""
    registered: ClassVar[Any] = None
    """The method's registered parts (``editing.methods.registry.MethodSpec``: its edit writer and kind), set with
    ``method`` by ``register``. The registry imports this module, never the other way round."""
    reuse_base_numbers: bool = False
    """Whether a method may read (and store) what it computes from the base model alone in the caches of
    ``editing.evaluation.caching`` (MEMIT's target vectors). The degradation budget sets it from its p0 cache
    setting at the start of a fit."""

    def __init__(self, base: ModelConfig | None = None, optimizer: OptimizerConfig | None = None,
                 regularization: RegularizationConfig | None = None) -> None:
        super().__init__()
        self.base_config = base or ModelConfig()
        self.optim_config = optimizer or OptimizerConfig()
        self.reg_config = regularization or RegularizationConfig()
        if self.reg_config.kind not in REGULARIZERS:
            raise ConfigError(f"regularization.kind={self.reg_config.kind!r}; expected one of {REGULARIZERS}")
        self.save_hyperparameters({"method": self.method.value, "base": asdict(self.base_config),
                                   "optimizer": asdict(self.optim_config),
                                   "regularization": asdict(self.reg_config)})
        self.loaded: LoadedModel = load_model(self.base_config)
        self.model = self.loaded.model
        self.task: TaskSpec | None = None
        self.evaluator: Evaluator | None = None
        self.diverged = False
        # checkpoints hold only the trainable deltas, so loading them into the full module is never strict
        self.strict_loading = False
        self._prepare_deltas()
        self._initial: dict[str, torch.Tensor] = {}
        self._fisher: dict[str, torch.Tensor] = {}
        self.base_edit: BaseEdit | None = None
        """The earlier edit this fit continues (``set_base_edit``); None: a fit on the base model."""

    # what a method defines ----------------------------------------------------------------------------------
    def _prepare_deltas(self) -> None:
        """Make the method's deltas and mark exactly them trainable (the base class trains nothing)."""

    @contextmanager
    def reference(self) -> Iterator[nn.Module]:
        """A context in which the yielded model computes p0 (the unedited model)."""
        yield self.model

    can_continue: ClassVar[bool] = False
    """Whether a fit of this method can start from an earlier edit (``editing fit --base_edit``, the rule in
    ``editing.methods.base_edit``): its edit is a weight change that ``edited_tensors`` writes as plain weights."""
    cannot_continue: ClassVar[str] = "its edit is not a weight change of the model"
    """Why not, for the message when ``can_continue`` is false."""
    continues_from: ClassVar[tuple[str, ...]] = ("weights",)
    """Which base edits it continues (``BaseEdit.continues``): ``weights`` (any weight-change edit), or an edit kind
    of its own (GRACE: ``grace_codebook``)."""
    reference_shares_weights: ClassVar[bool] = True
    """Whether ``reference()`` computes p0 with the model's own base weights (an adapter or hooks switched off), so
    that under a base edit the original weights must be swapped back in; false when p0 is a separate copy."""

    trains_behind_context_prefixes: ClassVar[bool] = False
    """Whether the method trains on the DataModule's canonical batches (the gradient methods), so that
    ``--data.context_prefixes`` can put generated prefixes in front of them (``use_context_prefixes``)."""

    def set_base_edit(self, base_edit: BaseEdit) -> None:
        """Continue the sequence of edits ending in ``base_edit``: write its weights into the frozen base weights
        (the model the fit starts from), and keep p0 (``reference()``) the original base model (see
        ``editing.methods.base_edit`` for the rule). Call it before the fit starts.

        Raises:
            ConfigError: the method cannot continue a sequence, a base edit was set already, or the edit's tensors
                do not fit the model (each naming ``--base_edit`` and the fix).
        """
        from editing.methods.base_edit import write_into

        where = f"--base_edit {base_edit.folder}"
        if not self.can_continue:
            raise ConfigError(f"{where}: method {self.method.value!r} cannot continue a sequence of edits "
                              f"({self.cannot_continue}); fit it on the base model without --base_edit, or continue "
                              "the sequence with a weight-change method (full, lora, memit, rome, alphaedit)")
        if self.base_edit is not None:
            raise ConfigError(f"{where}: this fit continues {self.base_edit.folder} already; give one --base_edit")
        if base_edit.continues not in self.continues_from:
            ours = self.method.value
            raise ConfigError(
                f"{where} is a {base_edit.kind!r} edit of method {base_edit.method!r}, which a {ours!r} fit cannot "
                "continue: " + (f"it is not a weight change; continue it with a {base_edit.method!r} fit" if
                                not base_edit.weights else
                                f"a {ours!r} fit continues only an edit of its own ({', '.join(self.continues_from)})"
                                "; fit it on the base model without --base_edit, or continue this edit with a "
                                "weight-change method (full, lora, memit, rome, alphaedit)"))
        self._continue_sequence(base_edit)
        swap = write_into(self.loaded.model, base_edit, where)
        self.base_edit = base_edit
        if base_edit.weights:
            self.p0_is_base = False  # the model before the first step carries the base edit: never p0's cache
        if self.reference_shares_weights and base_edit.tensors:
            method_reference = type(self).reference

            @contextmanager
            def reference() -> Iterator[nn.Module]:
                with swap.original(), method_reference(self) as model:
                    yield model

            self.reference = reference  # this instance's p0: the method's, with the original weights back
        step = base_edit.step()
        self.hparams["base_edit"] = step
        self.loaded.identity = {**self.loaded.identity, "base_edit": {**step, "sequence": base_edit.sequence}}

    def _continue_sequence(self, base_edit: BaseEdit) -> None:
        """What a method carries over from the base edit besides its weights (AlphaEdit: its keys, as Kp)."""

    def edited_tensors(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The parameters the edit ``state`` (default: the current deltas) changes, at their edited values, by the
        base model's parameter names: what a fit under ``--base_edit`` saves (with the base edit's own)."""
        raise NotImplementedError(f"{type(self).__name__} cannot write its edit as plain weights")

    p0_is_base: bool = False
    """True when the model before the first step computes the base model as loaded bit for bit (deltas that start
    at zero, a frozen copy): epoch 0's evaluation is then read from, and written to, the p0 cache that every method
    shares (``editing.evaluation.caching``). False (the default, safe for any method) always computes epoch 0."""

    def evaluation_shortcut(self) -> Shortcut | None:
        """What the evaluation may skip because the edit cannot change it (``editing.evaluation.incremental``).

        By default: when every trainable delta lies inside the transformer blocks, the blocks below the lowest of
        them (and the embeddings) are frozen. A method whose deltas act otherwise (hooks, sense vectors) overrides
        this; None means a full evaluation every epoch.
        """
        start = first_changed_block(self.model, self.trainable_parameters().values())
        return None if start is None else FrozenPrefix(start)

    def trainable_parameters(self) -> dict[str, torch.Tensor]:
        """The trainable deltas by name."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def delta_state(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the current deltas (what a checkpoint and a ball's saved edit hold)."""
        return {n: p.detach().to("cpu", copy=True) for n, p in self.trainable_parameters().items()}

    def _deltas_for(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The trainable deltas, after checking that ``state`` holds a value for each."""
        params = self.trainable_parameters()
        missing = set(params) - set(state)
        if missing:
            raise ConfigError(f"edit state lacks {len(missing)} delta(s), e.g. {sorted(missing)[:3]}")
        return params

    def load_delta_state(self, state: dict[str, torch.Tensor]) -> None:
        """Set the deltas from ``delta_state`` output."""
        params = self._deltas_for(state)
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state[name].to(p.device, p.dtype))

    def export_edit(self, folder: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
        """Write an edit (the deltas ``state``, default: current) as files a user can apply elsewhere: the tensor
        files by the method's registered ``write_edit``, then the base model's identity and the manifest recording
        the edit's kind (``editing.edits.load.load_edited`` reads all three).

        Args:
            folder: the edit folder (made if missing).
            state: the deltas to write (``delta_state`` output; default: the current ones).

        Returns:
            The folder.
        """
        spec = self.registered
        if spec is None or spec.name != self.method:
            raise NotImplementedError(f"{type(self).__name__} has no edit to export")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.base_edit is None or not self.base_edit.weights:
            # on a base edit of its own form (GRACE's codebook) the method's edit is the cumulative one already
            spec.write_edit(self, folder, state)
            chain = self.base_edit.chain() if self.base_edit is not None else None
            self.write_base_identity(folder, spec.edit_kind, sequence=chain)
            return folder
        from editing.methods.tensor_edit import TENSORS_KIND, write_tensor_edit

        # on top of a base edit: the cumulative weights, as a changed-tensors edit (editing.methods.base_edit)
        if spec.edit_kind == TENSORS_KIND:
            spec.write_edit(self, folder, state)  # the method's own extra files (AlphaEdit's keys) come along
        tensors = {**self.base_edit.tensors, **self.edited_tensors(state)}
        write_tensor_edit(folder, {n: t.detach().cpu().contiguous() for n, t in tensors.items()}, self.method.value,
                          self.identity["fingerprint"])
        self.write_base_identity(folder, TENSORS_KIND, sequence=self.base_edit.chain())
        return folder

    def write_base_identity(self, folder: str | Path, kind: str, sequence: list[dict] | None = None) -> None:
        """Record beside an edit which base model it applies to, and the edit's kind and the hashes of its tensors
        (``editing.edits.load.load_edited`` checks them); ``export_edit`` calls it once the tensor files are written.
        ``sequence``: the earlier edits it was fitted on top of, oldest first (``--base_edit``).
        """
        from editing.runs.manifest import write_edit_manifest

        write_text(Path(folder) / "base_model.json", json.dumps(self.identity, indent=2) + "\n", overwrite=True)
        write_edit_manifest(folder, kind=kind, method=self.method.value, sequence=sequence)

    @property
    def tokenizer(self):
        """The model's tokenizer."""
        return self.loaded.tokenizer

    @property
    def max_length(self) -> int:
        """The model's context length."""
        return self.loaded.max_length

    @property
    def identity(self) -> dict:
        """Name, source and weight fingerprint of the base model."""
        return self.loaded.identity

    def bind_task(self, task: TaskSpec) -> None:
        """Set the task the training loss uses, and a fresh ``Evaluator`` for Lightning's validation/test steps."""
        self.task = task
        self.evaluator = Evaluator(task).to(next(self.model.parameters()).device)

    def setup(self, stage: str) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        if self._trainer is not None and isinstance(getattr(self.trainer, "strategy", None), FSDPStrategy):
            # FSDP1 wraps the whole module: the evaluation's forward passes (outside training_step) would meet
            # sharded weights
            raise ConfigError("--trainer.strategy fsdp (FSDPStrategy) is not supported: shard a full finetuning "
                              "with --trainer.strategy ModelParallelStrategy (FSDP2, see the README's 'Several "
                              "devices'), or use --trainer.strategy ddp")
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and self.task != datamodule.task:
            self.bind_task(datamodule.task)
        if datamodule is not None and stage == "fit":
            # here, before the optimizer's schedule counts the training batches (and before a checkpoint's weights
            # are restored: the unedited model generates the prefixes)
            self.use_context_prefixes(datamodule)

    def use_context_prefixes(self, datamodule: Any) -> None:
        """Generate ``datamodule.context_prefixes`` prefixes with the unedited model and give them to the
        DataModule (issue 36 item 4): MEMIT's context templates (greedy continuations of fixed first words, the same
        in every run and on resume, since p0 generates them). A method that does not train on the canonical
        batches refuses them.

        Raises:
            ConfigError: the method cannot use them.
        """
        count = int(getattr(datamodule, "context_prefixes", 0) or 0)
        if count == 0:
            return
        if not self.trains_behind_context_prefixes:
            raise ConfigError(f"--data.context_prefixes {count}: method {self.method.value!r} does not train on "
                              "the canonical examples' batches, so it cannot train behind generated prefixes; "
                              "use --data.context_prefixes with lora or full, or leave it at 0 (MEMIT and ROME "
                              "average over their own context templates: --model.init_args.memit.context_templates)")
        from editing.methods.memit.requests import context_templates

        with self.reference() as model:
            training = model.training
            model.eval()
            try:
                templates = context_templates(model, self.tokenizer, count, datamodule.context_prefix_tokens)
            finally:
                model.train(training)
        datamodule.set_context_prefixes(templates[1:])  # templates[0] is the bare "": the example itself
        log.info("training behind %d context prefixes: %s", count, templates[1:])

    # training ----------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        params = self.trainable_parameters()
        if not params:
            raise ConfigError(f"method {self.method.value!r} has no trainable parameters: use an editing method "
                              "(e.g. editing.methods.LoRAEditor or editing.methods.FullFinetune) to fit")
        if self.reg_config.kind in ("l2", "ewc") and not self._initial:
            self._initial = {n: p.detach().clone() for n, p in params.items()}
        if self.reg_config.kind == "ewc" and not self._fisher:
            self._fisher = self._estimate_fisher()
        # a checkpoint's p0 values and Fisher weights were read onto the CPU before the strategy moved the module
        # to its device: they follow each parameter there
        self._initial = {n: t.to(params[n].device) if n in params else t for n, t in self._initial.items()}
        self._fisher = {n: t.to(params[n].device) if n in params else t for n, t in self._fisher.items()}

    def train_mode_modules(self) -> list[nn.Module]:
        """Submodules that stay in train mode while editing (e.g. LoRA dropout). The base model itself runs in
        eval mode so that p and p0 see the same deterministic network (KL is exactly zero before the first step)."""
        return []

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        self.model.eval()
        for module in self.train_mode_modules():
            module.train()

    def _estimate_fisher(self) -> dict[str, torch.Tensor]:
        # Diagonal Fisher of the model's own next-token likelihood on R, at p0.
        datamodule = self.trainer.datamodule
        params = self.trainable_parameters()
        fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        for i in range(self.reg_config.fisher_batches):
            batch = self._to_device(datamodule.regularization_batch(-1 - i))
            self.zero_grad(set_to_none=True)
            sums, counts = sequence_nll(self.model, batch)
            (sums.sum() / counts.sum()).backward()
            for n, p in params.items():
                if p.grad is not None:
                    fisher[n] += p.grad.detach().float().pow(2) / self.reg_config.fisher_batches
        self.zero_grad(set_to_none=True)
        return fisher

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def regularization_loss(self) -> torch.Tensor:
        """The unweighted regularization term for the current optimizer step."""
        kind = self.reg_config.kind
        if kind == "kl":
            batch = self._to_device(self.trainer.datamodule.regularization_batch(self.global_step))
            return kl_to_reference(self.model, self.reference, batch)
        if kind == "l2":
            return l2_to_reference(self.trainable_parameters(), self._initial)
        if kind == "ewc":
            return ewc_penalty(self.trainable_parameters(), self._initial, self._fisher)
        return torch.zeros((), device=self.device)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        sums, counts = example_nll(self.model, batch)
        task_loss = training_loss(sums / counts.clamp(min=1), self.task.loss).mean().float()
        loss = task_loss
        accumulate = max(1, int(self.trainer.accumulate_grad_batches))
        reg = None
        if self.reg_config.kind != "none" and self.reg_config.weight > 0 and batch_idx % accumulate == 0:
            # One regularization batch per optimizer step, on its first micro-batch. Lightning divides every
            # micro-batch loss by `accumulate`, so the term is scaled back up to count once per step.
            reg = self.regularization_loss().float()
            loss = loss + self.reg_config.weight * reg * accumulate
        if not torch.isfinite(loss):
            # Stop cleanly: skip this update (returning None) and let the callback record the run as diverged.
            self.diverged = True
            self.trainer.should_stop = True
            return None
        self.last_task_loss = task_loss.detach()  # the console's per-epoch train loss (DegradationBudget)
        self.log("train/loss", loss, prog_bar=True, batch_size=int(batch["example_index"].numel()))
        self.log("train/task_loss", task_loss, batch_size=int(batch["example_index"].numel()))
        if reg is not None:
            self.log("train/regularization", reg, batch_size=int(batch["example_index"].numel()))
        return loss

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        cfg = self.optim_config
        if cfg.eight_bit:
            if not torch.cuda.is_available():
                raise ConfigError("optimizer.eight_bit=true needs a CUDA device (bitsandbytes); set it to false")
            try:
                import bitsandbytes as bnb
            except ImportError as err:
                raise ConfigError("optimizer.eight_bit=true needs `pip install bitsandbytes`") from err
            optimizer = bnb.optim.Adam8bit(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        else:
            optimizer = torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        if cfg.schedule == "constant":
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # checkpoints: only the deltas, plus the base model's identity ----------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = set(self.trainable_parameters())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["base_identity"] = dict(self.identity)
        checkpoint["editing_state"] = {"diverged": self.diverged, "initial": self._initial, "fisher": self._fisher}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.check_checkpoint(checkpoint)
        state = checkpoint.get("editing_state", {})
        self.diverged = bool(state.get("diverged", False))
        self._initial = state.get("initial", {}) or {}
        self._fisher = state.get("fisher", {}) or {}

    def check_checkpoint(self, checkpoint: dict, source: str | None = None) -> None:
        """Refuse a checkpoint this run cannot continue: another method, another base model, or deltas of other
        names or shapes (other method settings, e.g. a LoRA rank).

        Args:
            checkpoint: the loaded checkpoint.
            source: its path, for the message.

        Raises:
            ConfigError: naming what the checkpoint was made with and what this run has.
        """
        where = f"checkpoint {source}" if source else "the checkpoint"
        saved = checkpoint.get("base_identity")
        if saved is None:
            raise ConfigError(f"{where} has no base model identity: it was not written by a canonical-editing fit")
        method = (checkpoint.get("hyper_parameters") or {}).get("method")
        ours = getattr(self.method, "value", self.method)
        if method is not None and getattr(method, "value", method) != ours:
            raise ConfigError(
                f"{where} was made by method {getattr(method, 'value', method)!r} on base model "
                f"{saved.get('name')!r}, but this run is method {ours!r} on {self.identity['name']!r}; resume with "
                "the --model (class_path) the checkpoint was made with, or start a new run without --ckpt_path"
            )
        if saved.get("fingerprint") != self.identity["fingerprint"]:
            raise ConfigError(
                f"{where} was made on base model {saved.get('name')!r} (fingerprint {saved.get('fingerprint')}), "
                f"but this run loads {self.identity['name']!r} (fingerprint {self.identity['fingerprint']}); "
                "resume with the same --model.base settings"
            )
        theirs = ((checkpoint.get("hyper_parameters") or {}).get("base_edit") or {}).get("manifest_sha256")
        ours = (self.base_edit.manifest_sha256 if self.base_edit is not None else None)
        if theirs != ours:
            made = f"on top of the edit {checkpoint['hyper_parameters']['base_edit'].get('edit')}" if theirs else \
                "on the base model alone"
            now = f"--base_edit {self.base_edit.folder}" if self.base_edit is not None else "no --base_edit"
            raise ConfigError(f"{where} was made {made} (manifest sha256 {str(theirs)[:12]}), but this run has {now} "
                              f"(manifest sha256 {str(ours)[:12]}): the base edit differs or its folder changed since; "
                              "resume with the --base_edit the checkpoint was made with, or start a new run without "
                              "--ckpt_path")
        self._check_checkpoint_deltas(checkpoint, where)

    deltas_by_name: tuple[str, str] | None = None
    """For a method whose deltas take their shape from the data (MEMIT's factors: one column per request; GRACE's
    codebook: one entry per edit), only the names in a checkpoint can be checked: (what a checkpoint of other names
    holds, the setting that names the deltas), e.g. ``("MEMIT factors of other layers", "memit.layers")``."""

    def _check_checkpoint_deltas(self, checkpoint: dict, where: str) -> None:
        if self.deltas_by_name is not None:
            state = checkpoint.get("state_dict") or {}
            if set(state) != set(self.trainable_parameters()):
                what, setting = self.deltas_by_name
                raise ConfigError(f"{where} holds {what} ({sorted(state)[:4]}); resume with the {setting} it was "
                                  "made with")
            return
        # Loading is not strict (a checkpoint holds only the deltas), so deltas of other names would be skipped
        # silently and other shapes would fail deep inside torch: compare them first. Methods whose deltas are made
        # later (sense selection in setup) have none yet; those whose deltas change shape set deltas_by_name.
        params = {n: tuple(p.shape) for n, p in self.trainable_parameters().items()}
        if not params:
            return
        state = {n: tuple(t.shape) for n, t in (checkpoint.get("state_dict") or {}).items()}
        if state == params:
            return
        # the method's own settings (e.g. lora.rank) shape the deltas; base, optimizer and regularization do not
        skip = ("method", "base", "optimizer", "regularization")
        theirs = _flatten({k: v for k, v in (checkpoint.get("hyper_parameters") or {}).items() if k not in skip})
        ours = _flatten({k: v for k, v in dict(self.hparams).items() if k not in skip})
        differ = [f"{k}: {theirs.get(k)!r} in the checkpoint, {ours.get(k)!r} here"
                  for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
        if not differ:
            names = sorted(set(state) ^ set(params)) or sorted(n for n in params if state[n] != params[n])
            differ = [f"deltas of other names or shapes, e.g. {names[:2]}"]
        raise ConfigError(f"{where} holds deltas made with other settings ({'; '.join(differ)}); resume with the "
                          "settings it was made with, or start a new run without --ckpt_path")

    # evaluation (the loop and its metrics: editing.evaluation.evaluator) -----------------------------------------
    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.evaluator.update(self.model, batch)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.evaluator.update(self.model, batch)

    def _log_summary(self, stage: str) -> None:
        self.last_evaluation = self.evaluator.summary()
        for name in METRIC_NAMES:
            value = self.last_evaluation[name]
            if value is not None:
                self.log(f"{stage}/{name}", value, rank_zero_only=True, add_dataloader_idx=False)

    def on_validation_epoch_end(self) -> None:
        self._log_summary("val")

    def on_test_epoch_end(self) -> None:
        self._log_summary("test")


def _flatten(tree: dict, prefix: str = "") -> dict:
    """``{"lora": {"rank": 4}}`` -> ``{"lora.rank": 4}``."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
