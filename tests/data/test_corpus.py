"""The distillation corpus (``CorpusDataModule``): which files it reads, which blocks a token budget takes, and when
its cached token ids are another corpus's. The expected streams and blocks are built here with plain loops."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from editing.core.errors import ConfigError
from editing.data.corpus import CorpusDataModule

BLOCK = 16


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITING_CACHE", str(tmp_path / "cache"))  # token ids cached by another test are not ours


def sentences(words: list[str], count: int, seed: int) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    return [" ".join(words[i] for i in torch.randint(0, len(words), (12,), generator=gen).tolist()) + "."
            for _ in range(count)]


A_TEXTS = sentences("apple river morning garden window stone".split(), 30, 0)
B_TEXTS = sentences("seven planet engine silver market thunder".split(), 60, 1)
C_TEXT = "a plain text file of one line\nand a second line\n"


@pytest.fixture
def folder(tmp_path) -> Path:
    """Three files of three kinds: a.jsonl (30 texts), b.jsonl.gz (60 texts of other words), c.txt."""
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in A_TEXTS))
    with gzip.open(root / "b.jsonl.gz", "wt") as handle:
        handle.write("".join(json.dumps({"text": t}) + "\n" for t in B_TEXTS))
    (root / "c.txt").write_text(C_TEXT)
    (root / "notes.md").write_text("not a corpus file")
    return root


def reference_stream(tokenizer, texts: list[str]) -> list[int]:
    ids = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.append(tokenizer.eos_token_id)
    return ids


def reference_blocks(ids: list[int]) -> list[list[int]]:
    return [ids[i * BLOCK: (i + 1) * BLOCK] for i in range(len(ids) // BLOCK)]


def module(folder: Path, tokenizer, **kw) -> CorpusDataModule:
    dm = CorpusDataModule(corpus=str(folder), block_size=BLOCK, batch_size=2, val_blocks=kw.pop("val_blocks", 4), **kw)
    dm.attach(tokenizer)
    dm.setup()
    return dm


def rows(t: torch.Tensor) -> list[list[int]]:
    return [r.tolist() for r in t]


def test_files_selects_corpus_files_by_file_name_or_stem(folder, tokenizer_of) -> None:
    tok = tokenizer_of("gpt2")
    everything = module(folder, tok).token_stream().tolist()
    assert everything == reference_stream(tok, A_TEXTS + B_TEXTS + [C_TEXT])  # name order; notes.md is not read
    chosen = module(folder, tok, files=["b", "c.txt"]).token_stream().tolist()
    assert chosen == reference_stream(tok, B_TEXTS + [C_TEXT])


def test_an_unknown_file_is_named_with_the_folders_files(folder, tokenizer_of) -> None:
    with pytest.raises(ConfigError) as err:
        module(folder, tokenizer_of("gpt2"), files=["a", "brown"])
    message = str(err.value)
    assert "data.files" in message and "'brown'" in message and "'a'" not in message
    assert "a, b, c" in message and str(folder) in message


def test_a_file_given_by_path_is_read_after_the_folders_files(folder, tmp_path, tokenizer_of) -> None:
    tok = tokenizer_of("gpt2")
    elsewhere = tmp_path / "mine" / "web.jsonl"
    elsewhere.parent.mkdir()
    web = ["some text of my own", "and a second text"]
    elsewhere.write_text("".join(json.dumps({"text": t}) + "\n" for t in web))
    chosen = module(folder, tok, files=[str(elsewhere), "c", "a"]).token_stream().tolist()
    assert chosen == reference_stream(tok, A_TEXTS + [C_TEXT] + web)
    alone = CorpusDataModule(corpus=str(folder), files=[str(elsewhere)])
    alone.attach(tok)  # too short for setup's blocks; its stream is what is checked
    assert alone.token_stream().tolist() == reference_stream(tok, web)


def test_a_file_named_k_times_is_read_k_times(folder, tmp_path, tokenizer_of) -> None:
    tok = tokenizer_of("gpt2")
    elsewhere = tmp_path / "web.jsonl"
    web = ["in-domain text", "that should weigh more"]
    elsewhere.write_text("".join(json.dumps({"text": t}) + "\n" for t in web))
    names = [str(elsewhere), "c", "a", "c.txt", str(elsewhere), str(elsewhere)]
    chosen = module(folder, tok, files=names).token_stream().tolist()
    assert chosen == reference_stream(tok, A_TEXTS + [C_TEXT, C_TEXT] + web + web + web)


@pytest.mark.parametrize("name", ["missing/web.jsonl", "notes/notes.md"])
def test_a_path_that_is_no_corpus_file_is_named(folder, name, tokenizer_of) -> None:
    (folder / "notes").mkdir()
    (folder / "notes" / "notes.md").write_text("not a corpus file")
    with pytest.raises(ConfigError) as err:
        module(folder, tokenizer_of("gpt2"), files=["a", str(folder / name)])
    assert "data.files" in str(err.value) and name in str(err.value) and ".jsonl" in str(err.value)


def test_files_needs_a_corpus_folder(tokenizer_of) -> None:
    dm = CorpusDataModule(corpus="wikitext:wikitext-2-raw-v1", files=["train"])
    dm.attach(tokenizer_of("gpt2"))
    with pytest.raises(ConfigError, match="data.files selects files of a corpus folder"):
        dm.setup()


def test_prefix_takes_the_first_blocks_and_validates_on_the_next(folder, tokenizer_of) -> None:
    tok = tokenizer_of("gpt2")
    blocks = reference_blocks(reference_stream(tok, A_TEXTS + B_TEXTS + [C_TEXT]))
    dm = module(folder, tok, max_tokens=10 * BLOCK)
    assert rows(dm.train_set.blocks) == blocks[:10]
    assert rows(dm.val_set.blocks) == blocks[10:14]
    assert rows(dm.blocks) == blocks[:14]


def test_spread_takes_the_budget_from_every_file_in_proportion(folder, tokenizer_of) -> None:
    tok = tokenizer_of("gpt2")
    ids = reference_stream(tok, A_TEXTS + B_TEXTS + [C_TEXT])
    blocks = reference_blocks(ids)
    a_end = len(reference_stream(tok, A_TEXTS)) // BLOCK  # blocks before this one hold only a.jsonl's tokens
    budget, val = 20, 5
    prefix = module(folder, tok, max_tokens=budget * BLOCK, val_blocks=val)
    spread = module(folder, tok, max_tokens=budget * BLOCK, val_blocks=val, sample="spread")
    assert len(spread.train_set) == len(prefix.train_set) == budget and len(spread.val_set) == val

    # where each chosen block sits in the corpus (the test corpus has no repeated block)
    assert len({tuple(b) for b in blocks}) == len(blocks)
    position = {tuple(b): i for i, b in enumerate(blocks)}
    train = [position[tuple(r)] for r in rows(spread.train_set.blocks)]
    held = [position[tuple(r)] for r in rows(spread.val_set.blocks)]
    assert not set(train) & set(held) and len(set(train)) == budget

    # evenly spaced over all blocks: consecutive chosen blocks are floor(n / 25) or one more apart
    chosen = sorted(train + held)
    gaps = {b - a for a, b in zip(chosen, chosen[1:], strict=False)}
    step = len(blocks) // (budget + val)
    assert chosen[0] == 0 and gaps <= {step, step + 1}
    # each file gives a share of the budget that follows its share of the corpus (a prefix takes only a.jsonl)
    share_a = a_end / len(blocks)
    from_a = sum(1 for i in chosen if i < a_end)
    assert abs(from_a - share_a * (budget + val)) <= 1.5
    assert max(position[tuple(r)] for r in rows(prefix.train_set.blocks)) < a_end
    # validation is spread too: some from the first half of the corpus, some from the second
    assert min(held) < len(blocks) // 2 <= max(held)
    # the cache-facing order: training blocks, then validation blocks at the offsets the val set reports
    assert rows(spread.blocks) == rows(spread.train_set.blocks) + rows(spread.val_set.blocks)
    assert spread.val_set.offset == budget


def test_spread_without_a_budget_keeps_every_block_and_spreads_validation(folder, tokenizer_of) -> None:
    tok = tokenizer_of("gpt2")
    blocks = reference_blocks(reference_stream(tok, A_TEXTS + B_TEXTS + [C_TEXT]))
    dm = module(folder, tok, sample="spread")
    assert sorted(rows(dm.blocks)) == sorted(blocks)
    position = {tuple(b): i for i, b in enumerate(blocks)}
    held = sorted(position[tuple(r)] for r in rows(dm.val_set.blocks))
    assert held[0] == 0 and held[-1] >= len(blocks) * 3 // 4


def test_a_file_rewritten_at_the_same_size_is_another_corpus(folder, tokenizer_of) -> None:
    tok = tokenizer_of("gpt2")
    first = module(folder, tok).token_stream().tolist()
    path = folder / "c.txt"
    changed = C_TEXT.replace("plain", "short")
    assert len(changed.encode()) == path.stat().st_size
    path.write_text(changed)
    second = module(folder, tok).token_stream().tolist()
    assert second != first and second == reference_stream(tok, A_TEXTS + B_TEXTS + [changed])
