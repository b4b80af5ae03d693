"""LightningDataModule for one task: canonical examples, evaluation set, targeted and general texts, hard negatives."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from editing.core.errors import ConfigError
from editing.core.paths import resolve_data_root
from editing.data.batching import TokenBudgetBatchSampler, collate
from editing.data.chat import ChatTemplate, load_chat_template
from editing.data.jsonl import Record, read_jsonl
from editing.data.resume import ResumableLoader, TrainPositionState
from editing.data.tokenize import ExampleTokenizer, TokenizationStats, TokenizedExample
from editing.rules.tasks import SPLITS, TaskSpec, get_task

log = logging.getLogger(__name__)

# Evaluation roles in the order their dataloaders are served.
EVAL_ROLES: tuple[str, ...] = ("evaluation", "general", "targeted", "hard_negatives")
CANONICAL_ROLE = "canonical"
"""The canonical examples scored as an evaluation set (reliability): asked for with ``eval_roles(canonical=True)``."""
TRAINING_ROLE = "canonical_training"
"""The training set when it differs from the canonical examples (behind context prefixes)."""
GENERAL_FILES = {"regularization": "regularization.jsonl", "general": "degradation.jsonl"}


class ExampleDataset(Dataset):
    """A list of tokenized examples."""

    def __init__(self, examples: list[TokenizedExample]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> TokenizedExample:
        return self.examples[i]


@dataclass
class LoadedSet:
    """One role's data: file, examples and tokenization counts."""

    role: str
    path: Path
    examples: list[TokenizedExample]
    stats: TokenizationStats
    sha256: str


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class TaskDataModule(TrainPositionState, L.LightningDataModule):
    """Data for one task and split.

    Args:
        task: a built-in task name or a path to a task YAML.
        split: ``val`` or ``test`` pair of (canonical, evaluation) files.
        data_root: folder of the task data; None searches the defaults (see ``editing.core.paths``).
        eval_limit: keep only the first N examples of the evaluation, targeted and hard-negative sets.
        general_limit: keep only the first N texts of the general sets (R and G).
        max_tokens: padded-token budget of an evaluation batch.
        max_examples: most examples in an evaluation batch.
        batch_size: canonical examples per training batch.
        regularization_batch_size: texts of the general set R per regularization batch (one per optimizer step).
        seed: training shuffle seed (and the seed of the regularization batches).
        num_workers: dataloader workers.
        chat_template: ask the prefixes of the canonical, evaluation and hard-negative examples through a chat
            template, the prefix as the user's turn and the suffix as the start of the assistant's reply
            (``editing.data.chat``): true for the tokenizer's own, or a Jinja template (its text or a file) for a
            tokenizer without one; texts (R, G, targeted texts) stay bare. For chat models deployed behind their
            template (SmolLM2-Instruct, Llama-2-chat); false (default) for the paper's bare prefixes.
        context_prefixes: train on each canonical example also behind this many short prefixes that the base
            model generates (MEMIT's context templates: greedy continuations of fixed first words, the same in
            every run), so that the edit holds when the fact is asked inside other text (issue 36 item 4). An
            epoch then holds ``(N + 1)`` sequences per example: the bare one and one per prefix. Only the
            gradient methods (lora, full) train on them; reliability stays on the bare canonical examples.
            0 (default) trains on the canonical examples alone, as the paper does.
        context_prefix_tokens: the generated tokens of each prefix.
    """

    def __init__(self, task: str = "country_capital", split: str = "val", data_root: str | None = None,
                 eval_limit: int | None = None, general_limit: int | None = None, max_tokens: int = 1024,
                 max_examples: int = 64, batch_size: int = 1, regularization_batch_size: int = 2, seed: int = 0,
                 num_workers: int = 0, chat_template: bool | str = False, context_prefixes: int = 0,
                 context_prefix_tokens: int = 10) -> None:
        super().__init__()
        if split not in SPLITS:
            raise ConfigError(f"data.split={split!r} is not valid; expected 'val' or 'test'")
        if context_prefixes < 0:
            raise ConfigError(f"data.context_prefixes={context_prefixes}: give 0 (train on the canonical examples "
                              "alone) or a number of generated prefixes per example")
        if context_prefix_tokens < 1:
            raise ConfigError(f"data.context_prefix_tokens={context_prefix_tokens}: a prefix needs at least 1 "
                              "generated token")
        for name, value in (("eval_limit", eval_limit), ("general_limit", general_limit)):
            if value is not None and value < 1:
                raise ConfigError(f"data.{name}={value} must be a positive number of examples (or null for all)")
        self.save_hyperparameters()
        self.task: TaskSpec = get_task(task)
        self.split = split
        self.data_root = resolve_data_root(data_root) if self.task.builtin or data_root else None
        self.eval_limit = eval_limit
        self.general_limit = general_limit
        self.max_tokens = max_tokens
        self.max_examples = max_examples
        self.batch_size = batch_size
        self.regularization_batch_size = regularization_batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.chat_template = chat_template
        self.context_prefixes = context_prefixes
        self.context_prefix_tokens = context_prefix_tokens
        self.context_prefix_texts: list[str] = []
        """The generated prefixes (without the bare ``""``), set by the editing method (``use_context_prefixes``)."""
        self.chat: ChatTemplate | None = None
        self.tokenizer = None
        self.max_length: int | None = None
        self.sets: dict[str, LoadedSet] = {}
        self._records: dict[str, list[Record]] = {}

    def attach(self, tokenizer, max_length: int) -> None:
        """Give the DataModule the model's tokenizer and context length (done by the CLI or ``setup``)."""
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.chat = load_chat_template(tokenizer, self.chat_template)

    def path(self, role: str) -> Path | None:
        """The file serving ``role`` (task roles, or ``general``/``regularization``)."""
        if role in GENERAL_FILES:
            root = self.data_root if self.data_root is not None else resolve_data_root(None)
            return Path(root) / "general" / GENERAL_FILES[role]
        return self.task.file(role, self.split, self.data_root)

    def _kind(self, role: str) -> str:
        if role in ("canonical", "evaluation"):
            return "pair" if self.task.pair else "single"
        if role == "hard_negatives":
            return "suffix_or_text"
        return "text"

    def _limit(self, role: str) -> int | None:
        return self.general_limit if role in GENERAL_FILES else None if role == "canonical" else self.eval_limit

    def records(self, role: str, all_lines: bool = False) -> list[Record]:
        """The parsed lines of ``role``'s file with all their fields (e.g. the subject field MEMIT's oracle
        supervision reads), as this DataModule serves them: under its limit for the role (cached).

        Args:
            role: a task role (``canonical``, ``evaluation``, ...) or ``general``/``regularization``.
            all_lines: every line of the file, ignoring the limit (not cached).

        Raises:
            ConfigError: the task has no file for ``role``.
        """
        if not all_lines and role in self._records:
            return self._records[role]
        path = self.path(role)
        if path is None:
            raise ConfigError(f"task {self.task.name!r} has no {role} set")
        records = read_jsonl(path, self._kind(role), limit=None if all_lines else self._limit(role))
        if not all_lines:
            self._records[role] = records
        return records

    def sha256(self, role: str) -> str:
        """Hex SHA-256 of ``role``'s file (of the whole file, whatever the limit)."""
        return self.sets[role].sha256 if role in self.sets else file_sha256(self.path(role))

    def load(self, role: str) -> LoadedSet | None:
        """Read and tokenize one role's file (cached)."""
        if role in self.sets:
            return self.sets[role]
        if self.tokenizer is None:
            raise RuntimeError("TaskDataModule.attach(tokenizer, max_length) must be called before loading data")
        path = self.path(role)
        if path is None:
            return None
        records = self.records(role)
        examples, stats = ExampleTokenizer(self.tokenizer, self.max_length, chat=self.chat).examples(records, str(path))
        for note in stats.notes:
            log.warning(note)
        self.sets[role] = LoadedSet(role, path, examples, stats, file_sha256(path))
        return self.sets[role]

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None and self.trainer is not None:
            module = self.trainer.lightning_module
            self.attach(module.tokenizer, module.max_length)
        for role in self.eval_roles():
            self.load(role)
        if stage == "fit":
            self.load("canonical")
            self.load("regularization")

    def set_context_prefixes(self, prefixes: list[str]) -> None:
        """Train on each canonical example bare and behind each of ``prefixes`` (generated by the method, which
        holds the model; the data layer does not)."""
        self.context_prefix_texts = list(prefixes)
        self.sets.pop(TRAINING_ROLE, None)

    def training_set(self) -> LoadedSet:
        """What an epoch trains on: the canonical examples, each also behind every context prefix if any."""
        if not self.context_prefix_texts:
            return self.load("canonical")
        if TRAINING_ROLE not in self.sets:
            canonical = self.load("canonical")
            records = [Record(r.index, r.line, prefix=p + r.prefix, suffixes=r.suffixes, fields=r.fields)
                       for r in self.records("canonical") for p in ["", *self.context_prefix_texts]]
            examples, stats = ExampleTokenizer(self.tokenizer, self.max_length, chat=self.chat).examples(
                records, f"{canonical.path} behind context prefixes")
            for note in stats.notes:
                log.warning(note)
            self.sets[TRAINING_ROLE] = LoadedSet(TRAINING_ROLE, canonical.path, examples, stats, canonical.sha256)
        return self.sets[TRAINING_ROLE]

    @property
    def pad_id(self) -> int:
        """Token id used for padding (never scored, never attended to)."""
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def train_dataloader(self) -> DataLoader:
        """Canonical examples, ``batch_size`` per batch, reshuffled each epoch (seeded)."""
        data = self.training_set()
        sampler = TokenBudgetBatchSampler([e.length for e in data.examples], max_tokens=1 << 30,
                                          max_examples=self.batch_size, shuffle=True, seed=self.seed)
        loader = ResumableLoader(ExampleDataset(data.examples), batch_sampler=sampler,
                                      num_workers=self.num_workers,
                                      collate_fn=partial(collate, role="canonical", pad_id=self.pad_id))
        return self.track_train_loader(loader)

    def regularization_batch(self, step: int) -> dict:
        """The batch of R used at optimizer step ``step``: random texts, chosen by (seed, step) so a resumed run
        draws the same batches as an uninterrupted one."""
        data = self.load("regularization")
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        picks = torch.randperm(len(data.examples), generator=generator)[: self.regularization_batch_size]
        return collate([data.examples[i] for i in picks.tolist()], role="regularization", pad_id=self.pad_id)

    def eval_roles(self, canonical: bool = False) -> list[str]:
        """Evaluation roles this task has, in dataloader order.

        Args:
            canonical: add the canonical examples (last), scored like an evaluation set for ``reliability`` (the
                fit's per-epoch evaluation does; Lightning's validate and test do not).
        """
        roles = [r for r in EVAL_ROLES if r in GENERAL_FILES or getattr(self.task, r) is not None]
        return [*roles, CANONICAL_ROLE] if canonical else roles

    def eval_dataloader(self, role: str) -> DataLoader:
        """A dataloader over one evaluation role, batched by token budget."""
        data = self.load(role)
        sampler = TokenBudgetBatchSampler(
            [e.length * len(e.sequences) for e in data.examples], self.max_tokens, self.max_examples
        )
        return DataLoader(
            ExampleDataset(data.examples), batch_sampler=sampler, num_workers=self.num_workers,
            collate_fn=partial(collate, role=role, pad_id=self.pad_id),
        )

    def val_dataloader(self) -> list[DataLoader]:
        if self.trainer is not None and self.trainer.state.fn == "fit":
            return []  # while fitting, the DegradationBudget callback evaluates (epoch 0 and after each epoch)
        return [self.eval_dataloader(role) for role in self.eval_roles()]

    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()

    def describe(self) -> dict:
        """Files, hashes and counts of the loaded sets (for results files); the training set behind context
        prefixes, when used, with its prefixes."""
        out = {
            role: {
                "path": str(s.path), "sha256": s.sha256, "examples": len(s.examples),
                "truncated_examples": s.stats.truncated_examples, "truncated_tokens": s.stats.truncated_tokens,
            }
            for role, s in self.sets.items()
        }
        if TRAINING_ROLE in out:
            out[TRAINING_ROLE].update(context_prefixes=self.context_prefix_texts,
                                      context_prefix_tokens=self.context_prefix_tokens)
        return out
