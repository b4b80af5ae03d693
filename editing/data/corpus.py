"""A plain-text corpus cut into fixed-length token blocks, for distilling (or pretraining) language models.

Sources: a folder of ``.jsonl``/``.jsonl.gz`` files of ``{"text": ...}`` lines and ``.txt`` files (offline:
``../shared/corpus``), or a ``datasets`` id for users online. Token ids are cached per (tokenizer content, files'
bytes, code), so a resumed or repeated run does not tokenize again (``CorpusDataModule.token_stream``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from editing.caches.entries import canonical_json, read_entry, write_entry
from editing.caches.keys import tokenizer_digest
from editing.core.digests import code_digest, library_versions
from editing.core.errors import ConfigError, DataFormatError
from editing.core.paths import REPO_DIR, cache_dir
from editing.core.textfiles import decode_line
from editing.data.resume import ResumableLoader, TrainPositionState

CorpusSample = Literal["prefix", "spread"]
"""Which blocks a token budget (``max_tokens``) takes: the corpus's first ones, or blocks spread over all of it."""

_SUFFIXES = (".jsonl.gz", ".txt.gz", ".jsonl", ".txt")  # longest first: a file's stem drops the first that fits


def _stem(path: Path) -> str:
    return next(path.name[: -len(x)] for x in _SUFFIXES if path.name.endswith(x))


def _is_path(name: str) -> bool:
    """A ``data.files`` entry that names a file by its path rather than by its name in the corpus folder."""
    return "/" in name or name.startswith("~")


def corpus_files(folder: Path, names: list[str] | None = None) -> list[Path]:
    """The text files of a corpus folder, in name order, then any files given by path.

    Args:
        folder: the corpus folder.
        names: keep only these files, each given by its file name or its name without the extension (``brown`` for
            ``brown.jsonl.gz``), or by a path (one with a ``/``: ``../shared/data/general/regularization.jsonl``),
            which adds that file from anywhere, after the folder's files, in the order given; None keeps all the
            folder's files. A file named k times is read k times, one copy after the other.

    Raises:
        DataFormatError: the folder holds no text files and no file is given by path.
        ConfigError: a name matches none of the folder's files, or a path is not a .jsonl, .jsonl.gz, .txt or
            .txt.gz file.
    """
    files = sorted(p for p in folder.iterdir() if p.name.endswith(_SUFFIXES))
    paths = [n for n in names or [] if _is_path(n)]
    if not files and not paths:
        raise DataFormatError(str(folder), None, "the corpus folder holds no .jsonl, .jsonl.gz or .txt files")
    if names is None:
        return files
    extra = []
    for name in paths:
        path = Path(name).expanduser()
        if not path.is_file() or not path.name.endswith(_SUFFIXES):
            raise ConfigError(f"data.files: {name!r} is not a .jsonl, .jsonl.gz, .txt or .txt.gz file (a path is "
                              f"read from the current folder {Path.cwd()}; a name without '/' is a file of the "
                              f"corpus folder {folder})")
        extra.append(path)
    names = [n for n in names if not _is_path(n)]
    known = {p.name for p in files} | {_stem(p) for p in files}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"data.files: {', '.join(map(repr, unknown))} not in the corpus folder {folder}; its "
                          f"files are {', '.join(_stem(p) for p in files)} (give names from these, a path to a file "
                          "elsewhere, or leave data.files unset)")
    # an entry given k times reads its file k times: a small in-domain file can then outweigh a large general one
    return [p for p in files for n in names if n in (p.name, _stem(p))] + extra


def spread_indices(total: int, count: int) -> list[int]:
    """``count`` distinct indices of ``range(total)``, evenly spaced from the first (all of them if count >= total)."""
    if count >= total:
        return list(range(total))
    return [i * total // count for i in range(count)]


def read_texts(path: Path) -> list[str]:
    """Texts of one corpus file: one per JSONL line (its ``text`` field), or the whole of a .txt file."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as handle:  # bytes, so that a line that is not UTF-8 is reported with its number
        if ".jsonl" not in path.name:
            data = handle.read()
            return ["".join(decode_line(line, path, n) for n, line in enumerate(data.splitlines(True), 1))]
        texts = []
        for number, raw in enumerate(handle, 1):
            line = decode_line(raw, path, number)
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise DataFormatError(str(path), number, "expected a JSON object with a 'text' field") from err
        return texts


def default_corpus() -> Path:
    """``../shared/corpus`` beside the checkout."""
    return REPO_DIR.parent / "shared" / "corpus"


class BlockDataset(Dataset):
    """Fixed-length blocks of a token stream.

    Args:
        blocks: (n, block_size) token ids.
        offset: index of the first block among all the corpus's blocks.
    """

    def __init__(self, blocks: torch.Tensor, offset: int = 0) -> None:
        self.blocks = blocks
        self.offset = offset
        self.indexed = False
        """Yield ``{"input_ids", "index"}`` (the block's index among all blocks) instead of the bare block: what
        distillation from a teacher cache needs to find the block's stored teacher outputs."""

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor | dict[str, torch.Tensor | int]:
        if self.indexed:
            return {"input_ids": self.blocks[i], "index": self.offset + i}
        return self.blocks[i]


class EpochShuffleSampler(Sampler[int]):
    """A permutation drawn from (seed, epoch), sharded by rank: a resumed run sees the same order as an
    uninterrupted one (Lightning calls ``set_epoch``)."""

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0
        self.skip = 0
        """Indices to leave out at the start of the next iteration only (a resumed run's consumed samples)."""

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> list[int]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 7919 + self.epoch))
        rank, world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        usable = self.size - self.size % world
        return order[:usable][rank::world].tolist()

    def __iter__(self):
        skip, self.skip = self.skip, 0
        return iter(self._indices()[skip:])

    def __len__(self) -> int:
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        return self.size // world


class CorpusDataModule(TrainPositionState, L.LightningDataModule):
    """Token blocks of a text corpus; the held-out tail serves as validation.

    Args:
        corpus: a corpus folder, or a ``datasets`` id (``name`` or ``name:config``, its ``train`` split's ``text``).
        block_size: tokens per training sequence.
        batch_size: sequences per batch.
        max_tokens: train on at most this many tokens of the corpus (None: all); ``val_blocks`` come on top.
        val_blocks: blocks held out for validation.
        seed: shuffle seed.
        files: use only these files of a corpus folder, by file name or name without extension (None: all), and any
            files given by a path with a ``/`` (text from elsewhere, e.g. in-domain text of one's own). A file
            named k times is read k times, which weights it k-fold; its validation blocks then have copies in
            training, so ``val/kl`` no longer measures held-out text for that file.
        sample: which blocks ``max_tokens`` takes. ``prefix``: the first ones, validation the blocks right after
            them. ``spread``: blocks evenly spaced over the whole corpus (a corpus of several files contributes from
            each in proportion to its size), validation every so many of them. Without ``max_tokens``, ``spread``
            still spreads the validation blocks over the corpus instead of taking its tail.
    """

    def __init__(self, corpus: str | None = None, block_size: int = 256, batch_size: int = 16,
                 max_tokens: int | None = None, val_blocks: int = 64, seed: int = 0, files: list[str] | None = None,
                 sample: CorpusSample = "prefix") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.corpus = corpus
        self.block_size = block_size
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.val_blocks = val_blocks
        self.seed = seed
        self.files = files
        self.sample = sample
        self.tokenizer = None
        self.train_set: BlockDataset | None = None
        self.val_set: BlockDataset | None = None
        self.blocks: torch.Tensor | None = None
        """All blocks, training then validation (what a teacher cache indexes)."""

    def attach(self, tokenizer) -> None:
        """Give the DataModule the model's tokenizer (done by ``setup`` from the LightningModule)."""
        self.tokenizer = tokenizer

    def _source(self) -> tuple[list[Path] | str, str]:
        """The corpus's files (or its ``datasets`` id) and a digest of their contents, without parsing any text."""
        source = self.corpus
        folder = Path(source).expanduser() if source else default_corpus()
        if folder.is_dir():
            files = corpus_files(folder, self.files)
            # the files' bytes, not their names and sizes: a file rewritten at the same size is another corpus
            digest = hashlib.sha256()
            for path in files:
                digest.update(f"{path.name}\0".encode())
                digest.update(hashlib.sha256(path.read_bytes()).digest())
            return files, digest.hexdigest()[:16]
        if source is None:
            raise ConfigError(f"no corpus given and the default {folder} does not exist; set data.corpus")
        if self.files is not None:
            raise ConfigError(f"data.files selects files of a corpus folder, but data.corpus={source!r} is not a "
                              "folder; unset data.files")
        return source, hashlib.sha256(source.encode()).hexdigest()[:16]

    @staticmethod
    def _texts(source: list[Path] | str) -> list[str]:
        if isinstance(source, list):
            return [t for p in source for t in read_texts(p)]
        import datasets

        name, _, config = source.partition(":")
        return list(datasets.load_dataset(name, config or None, split="train")["text"])

    def token_stream(self) -> torch.Tensor:
        """The whole corpus as one stream of token ids, texts separated by the EOS token (cached: a second run reads
        no text).

        The cache is a checked entry (``editing.caches.entries``): one that is damaged or changed since it was written
        is tokenized again, with a warning naming it; a cache folder that cannot be written costs only the cache.

        Key covers: the corpus files' names and bytes (or the ``datasets`` id, whose content is the hub's), the
        tokenizer's content (``editing.caches.keys.tokenizer_digest``: its serialized vocabulary, merges, normalizer
        and pre-tokenizer, special and added tokens, and the tokenizers version), the EOS id, the code digest of
        this module, and the torch/transformers/python versions.
        Why that is enough: the stream is the tokenizer applied to those texts, in file order, with EOS between.
        """
        source, digest = self._source()
        tok = self.tokenizer
        material = {"kind": "corpus tokens", "source": digest, "tokenizer": tokenizer_digest(tok),
                    "eos": tok.eos_token_id, "code": code_digest("editing.data.corpus"),
                    "libraries": library_versions()}
        key = hashlib.sha256(canonical_json(material).encode()).hexdigest()[:24]
        path = cache_dir() / "corpus_tokens" / f"{key}.safetensors"

        def one_stream(tensors: dict[str, torch.Tensor]) -> str | None:
            stream = tensors.get("stream")
            if set(tensors) != {"stream"} or stream.ndim != 1 or stream.dtype != torch.int32:
                return "does not hold one int32 token stream"
            return None

        found = read_entry(path, material, what="corpus token cache", check=one_stream)
        if found is not None:
            return found["stream"]
        texts = self._texts(source)
        eos = tok.eos_token_id
        ids: list[int] = []
        for start in range(0, len(texts), 512):
            for piece in tok(texts[start: start + 512], add_special_tokens=False)["input_ids"]:
                ids.extend(piece)
                ids.append(eos)
        stream = torch.tensor(ids, dtype=torch.int32)
        write_entry(path, {"stream": stream}, material, what="corpus token cache")
        return stream

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.tokenizer is None and self.trainer is not None:
            self.attach(self.trainer.lightning_module.tokenizer)
        if self.sample not in ("prefix", "spread"):
            raise ConfigError(f"data.sample={self.sample!r}; expected 'prefix' or 'spread'")
        stream = self.token_stream()
        if self.max_tokens is not None and self.sample == "prefix":
            stream = stream[: self.max_tokens + self.val_blocks * self.block_size]
        n = stream.numel() // self.block_size
        if n <= self.val_blocks:
            raise ConfigError(f"the corpus has {n} blocks of {self.block_size} tokens; it needs more than "
                              f"data.val_blocks={self.val_blocks}")
        blocks = stream[: n * self.block_size].view(n, self.block_size).long()
        if self.sample == "spread":
            # the same number of blocks a prefix would take, but from all of the corpus: a corpus that is several
            # files one after the other (a prefix of it may be one or two of them) is sampled in proportion
            wanted = n if self.max_tokens is None else self.max_tokens // self.block_size + self.val_blocks
            chosen = spread_indices(n, wanted)
            held = set(spread_indices(len(chosen), self.val_blocks))
            train = [b for j, b in enumerate(chosen) if j not in held]
            blocks = blocks[train + [chosen[j] for j in sorted(held)]]
            n = blocks.shape[0]
        # validation is the last val_blocks rows (the corpus's tail for a prefix), so training never sees it
        self.blocks = blocks
        self.train_set = BlockDataset(blocks[: n - self.val_blocks])
        self.val_set = BlockDataset(blocks[n - self.val_blocks:], offset=n - self.val_blocks)

    def index_batches(self) -> None:
        """Make every batch a dict with the blocks' global indices (see ``BlockDataset.indexed``)."""
        self.setup()
        self.train_set.indexed = self.val_set.indexed = True

    def train_dataloader(self) -> DataLoader:
        sampler = EpochShuffleSampler(len(self.train_set), self.seed)
        loader = ResumableLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, drop_last=True)
        return self.track_train_loader(loader)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)
