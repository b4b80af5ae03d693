"""GRACE as an editing method (SPEC section 13): a codebook adapter at one layer's MLP down projection.

The edit, per canonical example in file order: the query q is the down projection's input at the last prefix token;
SPEC 13's rules add an entry (key q), grow one's radius or halve two; then only that entry's value is trained, by
plain gradient descent (``grace.steps`` steps of ``grace.lr``), on the example's own task loss (SPEC section 4, the
task's loss type, as every method's), with the codebook replacing the module's output wherever a position matches.

Why one epoch and no Lightning optimizer: each entry is trained alone, on its own example, for its own steps, and
the next example's entry sees the codebook as the earlier ones left it; that is not a loop over shuffled batches
with one optimizer and schedule. So, as ROME and MEMIT do, the whole edit is made at the start of the first epoch
(the canonical batches are not iterated); the DegradationBudget callback evaluates p0 before it (epoch 0: the empty
codebook is the base model bit for bit) and the edit after it (epoch 1), and the run stops there.

A sequence of edits grows one codebook: ``start_from`` (the tensors of a saved GRACE edit, or an edit folder with
``start_from_edit``) loads earlier entries, and the next ``compute_edit`` adds to them; ``reference()`` is always
the base model (the whole codebook off).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from editing.core.errors import ConfigError
from editing.data.batching import collate
from editing.data.tokenize import TokenizedExample
from editing.evaluation.incremental import FrozenPrefix
from editing.evaluation.scorer import example_nll
from editing.methods.base import EditingModule, OptimizerConfig, RegularizationConfig
from editing.methods.grace.codebook import (
    BUFFERS,
    CHILD,
    CODEBOOK_FILE,
    SEPARATOR,
    Codebook,
    attach,
    distances,
    projection_widths,
    read_codebook_file,
)
from editing.methods.grace.config import GRACEConfig, resolve_layer
from editing.methods.one_shot import OneShotFit
from editing.models.architecture import blocks, down_projection, down_projection_name, num_layers
from editing.models.loading import ModelConfig
from editing.rules.losses import training_loss


def example_label(example: TokenizedExample) -> tuple[int, ...]:
    """An example's label: its target (scored) ids, suffix after suffix with a separator between them."""
    label: list[int] = []
    for i, seq in enumerate(example.sequences):
        label += ([SEPARATOR] if i else []) + list(seq.ids[seq.score_from:])
    return tuple(label)


def query_position(example: TokenizedExample) -> int:
    """The position of the last prefix token (the one predicting the first target token)."""
    return example.sequences[0].score_from - 1


class GRACEEditor(OneShotFit, EditingModule):
    """Edit with GRACE (SPEC section 13): a codebook at one layer's MLP down projection, one entry rule and one
    value training per canonical example, in file order.

    Args:
        base: the base model.
        grace: GRACE settings.
        optimizer: unused (the value's gradient descent is ``grace.lr``/``grace.steps``); kept for the configs' shape.
        regularization: unused (SPEC 13 trains the value on the task loss alone).
    """

    can_continue = True
    deltas_by_name = ("a GRACE codebook of another layer", "grace.layer")  # its size is the number of entries
    continues_from = ("grace_codebook",)  # one codebook grows over a sequence (editing fit --base_edit)
    label = "GRACE"
    one_process_reason = ("its entries are trained one after another, each on its own example, so there is nothing "
                          "for DDP to average")

    def __init__(self, base: ModelConfig | None = None, grace: GRACEConfig | None = None,
                 optimizer: OptimizerConfig | None = None, regularization: RegularizationConfig | None = None) -> None:
        self.grace_config = grace or GRACEConfig()
        self.grace_config.validate()
        super().__init__(base=base, optimizer=optimizer, regularization=regularization or RegularizationConfig("none"))
        self.hparams["grace"] = asdict(self.grace_config)
        self.automatic_optimization = False
        self.edited = False
        self.start_entries = 0
        """Entries the codebook held before this fit's edit (a sequence's earlier edits)."""
        self.edit_timings: dict[str, float] = {}
        self.edit_diagnostics: dict = {}
        """What the last ``compute_edit`` did: per example the entry it trained (``entries``), the radius of new
        entries (``init_eps``) and the task loss at each step (``losses``, (examples, steps))."""

    # deltas: the codebook's buffers ---------------------------------------------------------------------------
    def _prepare_deltas(self) -> None:
        for p in self.model.parameters():
            p.requires_grad_(False)
        blocks(self.model)  # a family whose blocks are not located (a Backpack) is refused here, naming the supported
        self.grace_layer = resolve_layer(self.grace_config, num_layers(self.model.config))
        module = down_projection(self.model, self.grace_layer)
        d_in, d_out = projection_widths(module)
        book = Codebook(d_in, d_out, self.grace_config.span)
        self._handle = attach(module, book)
        # a plain attribute, not a second registration: the codebook's state lives once, inside the model
        object.__setattr__(self, "_codebook", book)
        # the codebook is registered inside the model (it moves with it); its names as this module's state
        self._prefix = f"model.{down_projection_name(self.model, self.grace_layer)}.{CHILD}."

    @property
    def codebook(self) -> Codebook:
        """The codebook attached to the wrapped down projection."""
        return self._codebook

    @property
    def p0_is_base(self) -> bool:  # an empty codebook computes the base model bit for bit
        return self.start_entries == 0

    def trainable_parameters(self) -> dict[str, torch.Tensor]:
        """The codebook's buffers by their state-dict names (keys, values, eps, labels; no gradients: each value is
        trained on a copy, ``compute_edit``)."""
        return {self._prefix + name: getattr(self.codebook, name) for name in BUFFERS}

    def load_delta_state(self, state: dict[str, torch.Tensor]) -> None:
        """Set the codebook from ``delta_state`` output (its size may differ from the current one)."""
        self._deltas_for(state)
        self.codebook.set_entries(*(state[self._prefix + name] for name in BUFFERS))

    def codebook_state(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The codebook of ``state`` (default: the current one) by short names: keys, values, eps, labels."""
        state = state if state is not None else self.delta_state()
        return {name: state[self._prefix + name] for name in BUFFERS}

    def start_from(self, tensors: dict[str, torch.Tensor]) -> None:
        """Start from an earlier codebook (a saved GRACE edit's tensors: keys, values, eps, labels, and its layer):
        the next edit adds entries to it. ``reference()`` stays the base model.

        Raises:
            ConfigError: the codebook was made at another layer or for other widths.
        """
        layer = int(tensors["layer"]) if "layer" in tensors else self.grace_layer
        if layer != self.grace_layer:
            raise ConfigError(f"the earlier GRACE codebook wraps layer {layer}, this edit layer {self.grace_layer}; "
                              f"set grace.layer={layer} to grow it")
        keys, values = tensors["keys"], tensors["values"]
        if keys.shape[1:] != self.codebook.keys.shape[1:] or values.shape[1:] != self.codebook.values.shape[1:]:
            raise ConfigError(f"the earlier GRACE codebook has keys of width {keys.shape[1]} and values of width "
                              f"{values.shape[1]}, but layer {layer} of this model takes {self.codebook.keys.shape[1]} "
                              f"and gives {self.codebook.values.shape[1]}: it was made on another model")
        self.codebook.set_entries(keys, values, tensors["eps"], tensors["labels"])
        self.start_entries = len(self.codebook)
        self.edited = False

    def start_from_edit(self, folder: str | Path) -> None:
        """``start_from`` the codebook of a saved GRACE edit folder (its tensors verified against its manifest)."""
        self.start_from(read_codebook_file(folder))

    def _continue_sequence(self, base_edit) -> None:
        """``--base_edit`` of a GRACE edit: ``start_from`` its codebook (verified with the edit), so that one codebook
        grows over the sequence; the saved edit is then the whole codebook."""
        self.start_from(base_edit.files[CODEBOOK_FILE])

    @contextmanager
    def reference(self) -> Iterator[nn.Module]:
        with self.codebook.disabled():
            yield self.model

    def evaluation_shortcut(self) -> FrozenPrefix:
        """The codebook replaces outputs of the wrapped layer's down projection only: the blocks below are frozen."""
        return FrozenPrefix(self.grace_layer)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["grace"] = {"edited": self.edited, "start_entries": self.start_entries}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        # shape the codebook as saved before Lightning loads the state dict into it
        state = checkpoint.get("state_dict", {})
        if all(self._prefix + name in state for name in BUFFERS):
            self.codebook.set_entries(*(state[self._prefix + name] for name in BUFFERS))
        extra = checkpoint.get("grace") or {}
        self.edited = bool(extra.get("edited", len(self.codebook) > 0))
        self.start_entries = int(extra.get("start_entries", 0))

    # fitting ---------------------------------------------------------------------------------------------------
    def compute_edit(self, datamodule, examples: list[TokenizedExample] | None = None, progress: bool = True) -> None:
        """Add the canonical examples (or ``examples``) to the codebook, one after another, and train each one's
        entry.

        Args:
            datamodule: the task's DataModule (canonical examples, task loss).
            examples: tokenized examples (default: the DataModule's canonical examples, in file order).
            progress: log a summary line.
        """
        if datamodule.tokenizer is None:
            datamodule.attach(self.tokenizer, self.max_length)
        if self.task != datamodule.task:
            self.bind_task(datamodule.task)
        examples = examples if examples is not None else datamodule.load("canonical").examples
        if not examples:
            raise ConfigError(f"task {datamodule.task.name!r} has no canonical examples to edit with")
        start = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        try:
            batches = [self._to_device(collate([e], "canonical", datamodule.pad_id)) for e in examples]
            queries, outputs = self.queries(examples, batches)
            init_eps = self._init_eps(queries)
            entries, losses = [], []
            generator = torch.Generator().manual_seed(self.grace_config.seed)
            for example, batch, query, output in zip(examples, batches, queries, outputs, strict=True):
                draw = torch.randn(output.shape, generator=generator)  # drawn for every example, warm or cold
                value = output if self.grace_config.value_init == "warm" else draw.to(output.device)
                entry = self.codebook.add_query(query, example_label(example), init_eps, value)
                entries.append(entry)
                losses.append(self.train_value(entry, batch))
                if self.diverged:
                    break
        finally:
            self.model.train(was_training)
        self.edited = True
        trace = torch.stack(losses).cpu()
        self.last_task_loss = trace[:, -1].mean()
        self.edit_diagnostics = {"entries": entries, "init_eps": init_eps, "losses": trace}
        self.edit_timings = {"edit_s": time.perf_counter() - start}
        if progress:
            rank_zero_info(f"GRACE: {len(examples)} examples, layer {self.grace_layer}, {len(self.codebook)} entries "
                           f"({self.start_entries} before), init_eps {init_eps:.4g}, "
                           f"edit {self.edit_timings['edit_s']:.1f}s")

    @torch.no_grad()
    def queries(self, examples: list[TokenizedExample],
                batches: list[dict]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per example, the wrapped module's input (the query, fp32) and its own output at the last prefix token.

        The input there does not depend on the codebook (it is computed by the layers below and this block's
        attention), so the queries of all examples can be read before any entry is made."""
        queries, outputs = [], []
        self.codebook.capture = {}
        try:
            for example, batch in zip(examples, batches, strict=True):
                self.model(input_ids=batch["input_ids"][:1], attention_mask=batch["attention_mask"][:1])
                pos = query_position(example)
                queries.append(self.codebook.capture["inputs"][0, pos].float())
                outputs.append(self.codebook.capture["outputs"][0, pos].float())
        finally:
            self.codebook.capture = None
        return queries, outputs

    def _init_eps(self, queries: list[torch.Tensor]) -> float:
        """The radius of a new entry: ``grace.init_eps``, or ``init_eps_factor`` times the median over the queries of
        the distance to the nearest other query.

        Repeated queries (examples sharing a prefix, e.g. two completions of one sentence) count once: otherwise a
        task whose prefixes mostly repeat would have a median of 0 and no radius could be drawn for it."""
        factor = self.grace_config.init_eps_factor
        if factor is None:
            return float(self.grace_config.init_eps)
        stacked = torch.unique(torch.stack(queries), dim=0)
        if len(stacked) < 2:
            raise ConfigError("grace.init_eps_factor scales the median distance between the canonical examples' "
                              f"distinct queries, but there is {len(stacked)}; set grace.init_eps instead")
        dists = distances(stacked, stacked)
        dists.fill_diagonal_(float("inf"))
        return factor * statistics.median(dists.min(dim=1).values.tolist())

    def train_value(self, entry: int, batch: dict) -> torch.Tensor:
        """Train entry ``entry``'s value alone by gradient descent on the task loss of ``batch`` (one example);
        returns the loss at each step (before that step's update)."""
        cfg = self.grace_config
        value = self.codebook.values[entry].detach().clone().requires_grad_(True)
        self.codebook.live = (entry, value)
        losses = []
        try:
            with torch.enable_grad():
                for _ in range(cfg.steps):
                    sums, counts = example_nll(self.model, batch)
                    loss = training_loss(sums / counts.clamp(min=1), self.task.loss).mean().float()
                    losses.append(loss.detach())
                    if not torch.isfinite(loss):
                        self.diverged = True
                        break
                    (grad,) = torch.autograd.grad(loss, value)
                    with torch.no_grad():
                        value -= cfg.lr * grad
        finally:
            self.codebook.live = None
        with torch.no_grad():
            self.codebook.values[entry] = value.detach()
        losses += [losses[-1]] * (cfg.steps - len(losses))  # a diverged entry's trace keeps its length
        return torch.stack(losses)
