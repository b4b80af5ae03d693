"""Distil a Backpack from a pretrained causal LM: the LM (or its first N layers) becomes the frozen
contextualization network, its embeddings the word embeddings and tied output matrix, and only the sense network and
the alpha head learn, to match the LM's next-token distributions (KL) on a text corpus.

When the contextualizer is the whole LM, one forward pass gives both the teacher's distribution and the hidden states
alpha is computed from, so the teacher costs nothing extra.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from editing.caches.keys import model_code_modules
from editing.core.errors import ConfigError
from editing.core.files import ensure_writable, save_atomically
from editing.models.architecture import LAYER_KEYS, num_layers
from editing.models.backpack.configuration import BackpackConfig
from editing.models.backpack.head_log_probs import compute_dtype, head_log_probs
from editing.models.backpack.modeling import BackpackLMHeadModel
from editing.models.backpack.teacher_cache import (
    HIDDEN_DTYPES,
    TeacherCache,
    TeacherCacheConfig,
    teacher_outputs,
    topk_kl_of,
)
from editing.models.loading import ModelConfig, load_model

log = logging.getLogger(__name__)

KL_CHUNK = 1024  # positions per fp32 vocabulary-wide KL computation (bounds memory at KL_CHUNK x vocab floats)


@dataclass
class BackpackShape:
    """The sense part of a distilled Backpack."""

    num_senses: int = 16
    """Sense vectors per word (k); must divide the embedding width (or ``sense_attention_dim``)."""
    sense_intermediate_scale: int = 4
    """Width of the sense network's final MLP, as a multiple of the embedding width."""
    layers: int | None = None
    """Keep only the LM's first N layers as the contextualizer (None: all of them, which also lets one forward pass
    serve as the teacher)."""
    sense_attention_dim: int | None = None
    """Width of alpha's query/key projection (default: the embedding width)."""


def build_backpack_from(lm, shape: BackpackShape, seed: int = 0) -> BackpackLMHeadModel:
    """A Backpack whose contextualizer and embeddings are copies of ``lm``'s (sense network freshly initialised).

    Args:
        lm: a Hugging Face causal LM with tied or untied embeddings (its input embeddings are used).
        shape: the sense settings and how many layers to keep.
        seed: initialisation seed of the sense network and alpha head.

    Returns:
        The Backpack, in fp32, in eval mode.
    """
    inner = lm.config.to_dict()
    total = num_layers(lm.config)
    layers = shape.layers or total
    if not 1 <= layers <= total:
        raise ConfigError(f"backpack layers={layers} must be between 1 and the LM's {total} layers")
    for key in LAYER_KEYS:
        if key in inner:
            inner[key] = layers
    for key in ("architectures", "auto_map", "transformers_version", "quantization_config", "_name_or_path"):
        inner.pop(key, None)
    config = BackpackConfig(num_senses=shape.num_senses, sense_intermediate_scale=shape.sense_intermediate_scale,
                            contextualizer=inner, sense_attention_dim=shape.sense_attention_dim)
    config.distilled_from = {"layers": layers, "of_layers": total}
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        backpack = BackpackLMHeadModel(config)
    finally:
        torch.random.set_rng_state(state)
    base = lm.get_decoder() if hasattr(lm, "get_decoder") and lm.get_decoder() is not None else lm.base_model
    missing, unexpected = backpack.backpack.contextualizer.load_state_dict(base.state_dict(), strict=False)
    if missing:
        raise ConfigError(f"the LM's base model lacks contextualizer weights, e.g. {missing[:3]}")
    backpack.tie_weights()
    return backpack.eval()


class BackpackDistillation(L.LightningModule):
    """Train a Backpack's sense network and alpha head to match a teacher LM (KL(teacher || Backpack)).

    Args:
        teacher: the pretrained LM to distil (default: the embedded SmolLM2-135M).
        shape: the Backpack's sense settings.
        lr: peak AdamW learning rate of the sense network and alpha head.
        warmup_steps: linear warm-up steps before cosine decay.
        weight_decay: AdamW weight decay.
        kl_fraction: share of each batch's positions whose vocabulary-wide KL is computed in training (drawn anew
            each step, seeded by the step). Every position still feeds the Backpack's sums; on a CPU the two
            vocabulary-sized matmuls per position cost as much as the contextualizer, so 0.25 trains about twice
            as many tokens per hour. Validation always uses every position.
        output: folder to write the distilled model to when training ends (``from_pretrained`` loads it).
        overwrite: replace an existing model folder at ``output``.
        seed: initialisation seed.
        teacher_cache: train from stored teacher outputs (``editing backpack cache-teacher``): the teacher never
            runs in a training step, and the KL is over the teacher's top-k tokens plus "any other token" (the full
            KL when top_k covers the vocabulary). Validation then reports that KL too.
    """

    def __init__(self, teacher: ModelConfig | None = None, shape: BackpackShape | None = None, lr: float = 1e-3,
                 warmup_steps: int = 100, weight_decay: float = 0.0, kl_fraction: float = 1.0,
                 output: str | None = None, overwrite: bool = False, seed: int = 0,
                 teacher_cache: TeacherCacheConfig | None = None) -> None:
        super().__init__()
        self.teacher_config = teacher or ModelConfig()
        self.shape = shape or BackpackShape()
        self.cache_config = teacher_cache or TeacherCacheConfig()
        self.save_hyperparameters({"teacher": asdict(self.teacher_config), "shape": asdict(self.shape), "lr": lr,
                                   "warmup_steps": warmup_steps, "weight_decay": weight_decay,
                                   "kl_fraction": kl_fraction, "output": output,
                                   "seed": seed, "teacher_cache": asdict(self.cache_config)})
        if not 0 < kl_fraction <= 1:
            raise ConfigError(f"model.kl_fraction={kl_fraction} must be in (0, 1]")
        self.lr, self.warmup_steps, self.weight_decay = lr, warmup_steps, weight_decay
        self.kl_fraction = kl_fraction
        self.output, self.overwrite = output, overwrite
        if output is not None:
            output = str(Path(output).expanduser())
            ensure_writable(Path(output) / "config.json", overwrite, "--model.overwrite true")
        loaded = load_model(self.teacher_config)
        self.tokenizer = loaded.tokenizer
        self.teacher_identity = loaded.identity
        # the teacher stays out of the module tree: it is frozen and shares its body with the student
        object.__setattr__(self, "teacher", loaded.model.float().eval())
        self.student = build_backpack_from(self.teacher, self.shape, seed)
        self.student.requires_grad_(False)
        for module in (self.student.backpack.sense_network, self.student.backpack.sense_weight_net):
            module.requires_grad_(True)
        self.shares_teacher_pass = (self.shape.layers or num_layers(self.teacher.config)) == num_layers(
            self.teacher.config)
        self.strict_loading = False
        self.cache: TeacherCache | None = None

    def teacher_cache_of(self, datamodule) -> TeacherCache:
        """The teacher cache of ``datamodule``'s blocks (set up) under this module's teacher and cache settings."""
        datamodule.setup()
        layers = self.shape.layers or num_layers(self.teacher.config)
        return TeacherCache.for_run(self.teacher_identity, datamodule.blocks, layers, self.cache_config,
                                    device=next(self.teacher.parameters()).device.type,
                                    code_modules=tuple(model_code_modules(self.teacher)))

    def fill_teacher_cache(self, datamodule, progress: bool = True, rank: int = 0, world: int = 1) -> TeacherCache:
        """Compute and store the teacher's outputs on every block of ``datamodule`` not cached yet (resumable).

        Args:
            datamodule: the corpus (a ``CorpusDataModule`` with this module's tokenizer attached).
            progress: print a line per shard.
            rank: this process's share of the shards, with ``world`` processes filling together.
            world: how many processes fill together.

        Returns:
            The cache.
        """
        cache = self.teacher_cache_of(datamodule)
        config = self.cache_config
        head = self.teacher.get_output_embeddings()
        device = next(self.teacher.parameters()).device

        def compute(ids: torch.Tensor) -> dict[str, torch.Tensor]:
            ids = ids.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.teacher_bf16):
                return teacher_outputs(lambda x: self._teacher_pass(x, torch.ones_like(x)), head, ids.long(),
                                       config.top_k, HIDDEN_DTYPES[config.hidden_precision])

        cache.fill(compute, datamodule.blocks, config.batch_size, progress=progress, rank=rank, world=world)
        return cache

    def setup(self, stage: str) -> None:
        if not self.cache_config.enabled:
            return
        datamodule = self.trainer.datamodule
        if not hasattr(datamodule, "index_batches"):
            raise ConfigError("model.teacher_cache.enabled needs the corpus DataModule of `editing backpack "
                              "distill` (its blocks are what the cache indexes)")
        if datamodule.tokenizer is None:
            datamodule.attach(self.tokenizer)
        strategy = self.trainer.strategy
        # each process fills its share of the missing shards, then every process reads all of them
        self.fill_teacher_cache(datamodule, progress=self.trainer.is_global_zero, rank=self.trainer.global_rank,
                                world=self.trainer.world_size)
        strategy.barrier("teacher_cache")
        self.cache = self.fill_teacher_cache(datamodule, progress=False)
        datamodule.index_batches()

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trained tensors (what a checkpoint holds)."""
        return {f"student.{n}": p for n, p in self.student.named_parameters() if p.requires_grad}

    def _teacher_pass(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor,
                                                                                             torch.Tensor]:
        """(contextualizer hidden states, teacher's final hidden states before its head)."""
        contextual = self.student.backpack.contextualizer(input_ids=input_ids, attention_mask=attention_mask,
                                                          use_cache=False).last_hidden_state
        if self.shares_teacher_pass:
            return contextual, contextual
        store: dict = {}
        head = self.teacher.get_output_embeddings()
        handle = head.register_forward_pre_hook(lambda m, a: store.__setitem__("h", a[0]))
        try:
            self.teacher(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            handle.remove()
        return contextual, store["h"]

    def kl_loss(self, batch: torch.Tensor | dict, fraction: float = 1.0, step: int = 0) -> tuple[torch.Tensor,
                                                                                                torch.Tensor]:
        """Mean KL(teacher || Backpack) per token and the Backpack's mean NLL of the next token, over all positions
        or a seeded random ``fraction`` of them.

        ``batch`` is a tensor of token blocks (the teacher runs now), or a dict with the blocks' ``input_ids`` and
        their ``index`` in the teacher cache (the teacher's outputs are read; the KL is over its top-k tokens plus
        one "any other token" outcome).

        Long because the teacher's source (a pass now, or the top-k cache) and the seeded choice of positions decide
        the shapes every later line uses (the next tokens, the teacher's rows, the student's rows and slots), and the
        chunked loop sums the KL and the NLL in a fixed order over them; pieces would pass that state between them,
        and the seeded picks (the same positions on a resumed run) would be easy to change by accident.
        """
        cached = None
        if isinstance(batch, dict):
            if self.cache is None:
                raise ConfigError("a batch of cached blocks, but no teacher cache is open (set "
                                  "model.teacher_cache.enabled true)")
            input_ids = batch["input_ids"]
            cached = {k: v.to(input_ids.device) for k, v in self.cache.read(batch["index"].cpu()).items()}
            contextual = cached.pop("hidden").to(self.student.dtype)
        else:
            input_ids = batch
        mask = torch.ones_like(input_ids)
        if cached is None:
            with torch.no_grad():
                contextual, teacher_hidden = self._teacher_pass(input_ids, mask)
            teacher_hidden = teacher_hidden.flatten(0, 1)
        teacher = {k: v.flatten(0, 1) for k, v in cached.items()} if cached is not None else {"hidden": teacher_hidden}
        # the last position of each block has no next token in the block, but the KL is defined there too
        next_token = torch.full((input_ids.numel(),), -100, dtype=torch.long, device=input_ids.device)
        next_token.view(input_ids.shape[0], -1)[:, :-1] = input_ids[:, 1:]
        targets = None
        if fraction < 1.0:
            count = max(1, int(round(fraction * input_ids.numel())))
            generator = torch.Generator().manual_seed(1_000_003 * (self.hparams.get("seed", 0) + 1) + step)
            picks = torch.randperm(input_ids.numel(), generator=generator)[:count].to(input_ids.device)
            next_token = next_token[picks]
            teacher = {k: v[picks] for k, v in teacher.items()}
            # the sums only where the KL is taken (every position is still a source): alpha and the weighted sum
            # shrink from s to the most picks of a row, per row
            rows, slots, targets = pick_slots(picks, tuple(input_ids.shape))
        out = self.student.backpack(input_ids, attention_mask=mask, contextual_hidden=contextual.detach(),
                                    positions=targets)
        student_hidden = out.hidden_states.flatten(0, 1) if targets is None else out.hidden_states[rows, slots]
        head_t = self.teacher.get_output_embeddings()
        head_s = self.student.get_output_embeddings()
        kl_total = student_hidden.new_zeros((), dtype=torch.float32)
        nll_total = student_hidden.new_zeros((), dtype=torch.float32)
        positions = student_hidden.shape[0]
        for start in range(0, positions, KL_CHUNK):
            end = min(positions, start + KL_CHUNK)
            hidden = student_hidden[start:end]
            if cached is None:
                s_logp = F.log_softmax(head_s(hidden).float(), dim=-1)
                with torch.no_grad():
                    t_logits = head_t(teacher["hidden"][start:end]).float()
                    t_logp = F.log_softmax(t_logits, dim=-1)
                kl_total = kl_total + (t_logp.exp() * (t_logp - s_logp)).sum()
                nll_total = nll_total + F.nll_loss(s_logp, next_token[start:end], ignore_index=-100,
                                                   reduction="sum")
                continue
            # from the teacher's top k, only k + 1 of the student's log-probabilities per position are needed
            ids = teacher["topk_ids"][start:end].long()
            target = next_token[start:end]
            picked = head_log_probs(hidden, self._head_weight(head_s.weight, compute_dtype(hidden)),
                                    torch.cat([ids, target.clamp(min=0)[:, None]], dim=-1))

            def rest_of(rows: torch.Tensor, hidden=hidden, ids=ids) -> torch.Tensor:
                s_logp = F.log_softmax(head_s(hidden[rows]).float(), dim=-1)
                return torch.logsumexp(s_logp.scatter(-1, ids[rows], float("-inf")), dim=-1)

            kl_total = kl_total + topk_kl_of(picked[:, :-1], teacher["topk_logp"][start:end],
                                             teacher["tail_logp"][start:end], rest_of)
            nll_total = nll_total - picked[:, -1][target != -100].sum()
        return kl_total / positions, nll_total / max(1, int((next_token != -100).sum()))

    def _head_weight(self, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``weight`` in ``dtype``; a frozen weight's copy is kept across steps (autocast would cast the 49,152 x d
        head every step) and made again when the weight changes in place."""
        if weight.requires_grad or weight.dtype == dtype:
            return weight.to(dtype)
        key = (weight.data_ptr(), weight._version, weight.device, dtype)
        if getattr(self, "_head_copy", (None,))[0] != key:
            object.__setattr__(self, "_head_copy", (key, weight.detach().to(dtype)))
        return self._head_copy[1]

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self.student.eval()  # no dropout: the sense network is deterministic, as the teacher is

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        kl, nll = self.kl_loss(batch, self.kl_fraction, self.global_step)
        self.log("train/kl", kl, prog_bar=True)
        self.log("train/nll", nll, prog_bar=True)
        return kl

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        kl, nll = self.kl_loss(batch)
        size = (batch["input_ids"] if isinstance(batch, dict) else batch).shape[0]
        self.log("val/kl", kl, prog_bar=True, batch_size=size)
        self.log("val/nll", nll, prog_bar=True, batch_size=size)

    def configure_optimizers(self):
        optimizer = sense_optimizer(self.student, self.lr, self.weight_decay,
                                    clips=bool(self.trainer.gradient_clip_val))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(self.warmup_steps, total // 2)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = set(self.trainable_state())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["teacher_identity"] = dict(self.teacher_identity)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("teacher_identity", {})
        if saved.get("fingerprint") != self.teacher_identity["fingerprint"]:
            raise ConfigError(f"checkpoint was distilled from {saved.get('name')!r}, not from "
                              f"{self.teacher_identity['name']!r}; resume with the same --model.teacher")

    def on_train_end(self) -> None:
        if self.output is not None and self.trainer.is_global_zero:
            path = save_distilled(self.student, self.tokenizer, self.output, self.overwrite)
            print(f"distilled Backpack: {path}", file=sys.stderr)


def pick_slots(picks: torch.Tensor, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where flat positions of (b, s) blocks go in a per-row layout.

    Args:
        picks: (n,) distinct flat indices ``row * s + column``.
        shape: the blocks' (b, s).

    Returns:
        ``rows``, ``slots`` (n,) and ``targets`` (b, m), m the most picks of any row: ``targets[rows[i], slots[i]]``
        is the column of ``picks[i]``; the slots a row does not fill hold column 0 (computed, never read).
    """
    rows, columns = picks // shape[1], picks % shape[1]
    order = torch.argsort(picks)
    counts = torch.bincount(rows, minlength=shape[0])
    starts = torch.cumsum(counts, 0) - counts
    slots = torch.empty_like(picks)
    slots[order] = torch.arange(picks.numel(), device=picks.device) - starts[rows[order]]
    targets = torch.zeros(counts.numel(), int(counts.max()), dtype=torch.long, device=picks.device)
    targets[rows, slots] = columns
    return rows, slots, targets


def sense_optimizer(student: BackpackLMHeadModel, lr: float, weight_decay: float = 0.0,
                    clips: bool = True) -> torch.optim.AdamW:
    """AdamW over the student's trainable tensors (the sense network and the alpha head).

    The one-loop-per-tensor step walks the sense network's parameters a dozen times; it took about a sixth of a
    cached distillation step on a CPU. So the step is the fused kernel, or, where gradients are clipped (Lightning
    refuses to clip for a fused optimizer under mixed precision), the multi-tensor one.

    Args:
        student: the Backpack being distilled.
        lr: the peak learning rate.
        weight_decay: AdamW's weight decay.
        clips: the trainer clips gradients (``trainer.gradient_clip_val``).
    """
    params = [p for p in student.parameters() if p.requires_grad]
    fast = {"foreach": True} if clips else {"fused": all(p.device.type in ("cpu", "cuda") for p in params)}
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay, **fast)


def save_distilled(student: BackpackLMHeadModel, tokenizer, output: str | Path, overwrite: bool = False) -> Path:
    """Write the Backpack and its tokenizer as a model folder, atomically."""
    target = Path(output).expanduser()
    if target.exists():
        if not overwrite:
            ensure_writable(target / "config.json", overwrite, "--model.overwrite true")

    def save(folder: Path) -> None:
        student.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))

    save_atomically(target, save, folder=True, overwrite=True)
    return target


def export_checkpoint(checkpoint: str | Path, output_dir: str | Path, overwrite: bool = False) -> Path:
    """Write the Backpack of a distillation checkpoint (e.g. an interrupted run's ``last.ckpt``) as a model folder.

    Args:
        checkpoint: a checkpoint written by ``editing backpack distill``.
        output_dir: the model folder to write.
        overwrite: replace an existing folder.

    Returns:
        The model folder.
    """
    from dataclasses import fields

    from editing.runs.checkpoints import load_checkpoint_file

    ensure_writable(Path(output_dir).expanduser() / "config.json", overwrite, "--overwrite true")
    # never unpickled with code: a checkpoint is a file anyone may hand over
    state = load_checkpoint_file(checkpoint, fix="pass a checkpoint written by `editing backpack distill` (its "
                                                 "last.ckpt or interrupted.ckpt)")
    hp = state.get("hyper_parameters")
    not_ours = (f"{checkpoint} is not a Backpack distillation checkpoint (it lacks the teacher and shape settings "
                "of `editing backpack distill`); pass the last.ckpt of a distillation run")
    if not isinstance(hp, dict) or not isinstance(hp.get("shape"), dict) or not isinstance(hp.get("teacher"), dict):
        raise ConfigError(not_ours)
    for key, cls in (("teacher", ModelConfig), ("shape", BackpackShape)):
        unknown = set(hp[key]) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"{checkpoint}: hyper_parameters.{key} has unknown settings {sorted(unknown)}; "
                              "it was written by another version of canonical-editing")
    if not isinstance(state.get("state_dict"), dict):
        raise ConfigError(not_ours)
    module = BackpackDistillation(teacher=ModelConfig(**hp["teacher"]), shape=BackpackShape(**hp["shape"]),
                                  seed=hp.get("seed", 0))
    module.on_load_checkpoint(state)
    missing = set(module.trainable_state()) - set(state["state_dict"])
    if missing:
        raise ConfigError(f"{checkpoint} lacks trained tensors, e.g. {sorted(missing)[:3]}")
    trained = {k: v for k, v in state["state_dict"].items() if k in module.trainable_state()}
    for name, value in trained.items():
        expected = tuple(module.trainable_state()[name].shape)
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != expected:
            raise ConfigError(f"{checkpoint}: tensor {name} has shape {tuple(getattr(value, 'shape', ()))}, the "
                              f"Backpack of its settings needs {expected}; the checkpoint is damaged")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ConfigError(f"{checkpoint}: tensor {name} holds NaN or infinite values (the run diverged); export "
                              "an earlier checkpoint")
    module.load_state_dict(state["state_dict"], strict=False)
    return save_distilled(module.student, module.tokenizer, output_dir, overwrite)
