"""Tokenization with suffix masks (SPEC section 3) and truncation."""

from __future__ import annotations

import json

import pytest
import torch

from editing.core.errors import DataFormatError
from editing.data.batching import IGNORE, collate
from editing.data.jsonl import read_jsonl
from editing.data.tokenize import GPT2_SEPARATOR, ExampleTokenizer, TokenizationStats, strips_suffix_space

ALIASES = ("gpt2", "neox", "smollm2")
WORDS = ["hello", "world", "Paris", "is", "The", "capital", "of", "France", "a", "b", "Rome", "Italy"]


def _sentencepiece_style(bos: bool = True):
    """A small Llama/SentencePiece-style tokenizer: a word-boundary marker "\u2581" is prepended to the string and
    replaces spaces, so " Paris" alone gives an extra "\u2581" token. Adds a BOS when ``bos``; has no
    ``<|endoftext|>``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, "\u2581": 3}
    for w in WORDS:
        vocab["\u2581" + w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


def _write(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _labels_positions(batch, row):
    return (batch["labels"][row] != IGNORE).nonzero().flatten().tolist()


# --- prefix ids + separately tokenized suffix ids --------------------------------------------------------------

@pytest.mark.parametrize("alias", ALIASES)
def test_input_is_prefix_ids_then_suffix_ids(alias, tokenizer_of, data_root):
    tok = tokenizer_of(alias)
    path = data_root / "stereoset" / "split" / "stereoset_hard_neg-val.jsonl"
    records = read_jsonl(path, "single", limit=6)
    examples, stats = ExampleTokenizer(tok, 512).examples(records, str(path))
    assert stats.examples == 6 and stats.truncated_examples == 0
    differs = 0
    for rec, ex in zip(records, examples, strict=True):
        prefix_ids = tok(rec.prefix)["input_ids"]
        suffix_ids = tok(rec.suffixes[0], add_special_tokens=False)["input_ids"]
        (seq,) = ex.sequences
        assert seq.ids == prefix_ids + suffix_ids
        assert seq.score_from == len(prefix_ids)
        assert ex.truncated == 0 and not ex.is_text
        differs += seq.ids != tok(rec.prefix + rec.suffixes[0])["input_ids"]
    # these prefixes end with a space ("The definition of Japanese is "): the joined string tokenizes differently
    assert records[0].prefix.endswith(" ")
    assert differs >= 1


@pytest.mark.parametrize("alias", ALIASES)
def test_pair_example_has_one_sequence_per_suffix(alias, tokenizer_of, data_root):
    tok = tokenizer_of(alias)
    path = data_root / "verb_conjugation" / "split" / "verb_conjugation_eval-val.jsonl"
    (rec,) = read_jsonl(path, "pair", limit=1)
    ex = ExampleTokenizer(tok, 512).example(rec, str(path))
    prefix_ids = tok(rec.prefix)["input_ids"]
    assert len(ex.sequences) == 2
    for seq, suffix in zip(ex.sequences, rec.suffixes, strict=True):
        assert seq.ids == prefix_ids + tok(suffix, add_special_tokens=False)["input_ids"]
        assert seq.score_from == len(prefix_ids)


@pytest.mark.parametrize("alias", ALIASES)
def test_scored_positions_are_exactly_the_suffix_tokens(alias, tokenizer_of, data_root):
    tok = tokenizer_of(alias)
    path = data_root / "verb_conjugation" / "split" / "verb_conjugation_eval-val.jsonl"
    records = read_jsonl(path, "pair", limit=3)
    examples, _ = ExampleTokenizer(tok, 512).examples(records, str(path))
    batch = collate(examples, role="evaluation", pad_id=tok.pad_token_id or 0)
    assert batch["input_ids"].shape[0] == 6 and batch["n_slots"] == 2
    assert batch["seq_example"].tolist() == [0, 0, 1, 1, 2, 2]
    assert batch["seq_slot"].tolist() == [0, 1, 0, 1, 0, 1]
    row = 0
    for ex in examples:
        for seq in ex.sequences:
            n = len(seq.ids)
            assert batch["input_ids"][row, :n].tolist() == seq.ids
            assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
            # position t predicts token t+1: scored positions predict exactly the suffix tokens
            assert _labels_positions(batch, row) == list(range(seq.score_from - 1, n - 1))
            assert batch["labels"][row, seq.score_from - 1: n - 1].tolist() == seq.ids[seq.score_from:]
            row += 1


@pytest.mark.parametrize("alias", ALIASES)
def test_text_scores_every_token_but_the_first(alias, tokenizer_of, tmp_path):
    tok = tokenizer_of(alias)
    path = _write(tmp_path / "t.jsonl", [{"text": "The capital of France is Paris, and Rome is in Italy."}])
    (rec,) = read_jsonl(path, "text")
    ex = ExampleTokenizer(tok, 512).example(rec, path)
    assert ex.is_text
    (seq,) = ex.sequences
    assert seq.ids == tok(rec.text)["input_ids"]
    assert seq.score_from == 1
    batch = collate([ex], role="general")
    n = len(seq.ids)
    assert _labels_positions(batch, 0) == list(range(0, n - 1))
    assert batch["labels"][0, : n - 1].tolist() == seq.ids[1:]


# --- the GPT-2 document separator ------------------------------------------------------------------------------

def test_gpt2_separator_is_kept_as_is(tokenizer_of, data_root):
    tok = tokenizer_of("gpt2")
    path = data_root / "stereoset" / "split" / "stereoset_unconditional-val.jsonl"
    records = read_jsonl(path, "text", limit=3)
    assert records[0].text.startswith(GPT2_SEPARATOR)
    for rec in records:
        ids = ExampleTokenizer(tok, 1024).example(rec, str(path)).sequences[0].ids
        assert ids == tok(rec.text)["input_ids"]
        assert ids[0] == 50256 and ids.count(50256) == 1


@pytest.mark.parametrize("alias", ["neox", "smollm2"])
def test_separator_maps_to_the_tokenizers_own_token(alias, tokenizer_of, data_root):
    tok = tokenizer_of(alias)
    path = data_root / "general" / "degradation.jsonl"
    (rec,) = read_jsonl(path, "text", limit=1)
    assert rec.text.startswith(GPT2_SEPARATOR)
    ids = ExampleTokenizer(tok, 100_000).example(rec, str(path)).sequences[0].ids
    sep = tok.get_vocab()[GPT2_SEPARATOR]
    rest = tok(rec.text[len(GPT2_SEPARATOR):])["input_ids"]
    assert ids == [sep] + rest
    assert ids.count(sep) == 1


def test_separator_without_endoftext_maps_to_bos_without_doubling(tmp_path):
    tok = _sentencepiece_style(bos=True)
    assert GPT2_SEPARATOR not in tok.get_vocab()
    path = _write(tmp_path / "t.jsonl", [{"text": GPT2_SEPARATOR + "The capital of France is Paris"},
                                         {"text": "The capital of France is Paris"}])
    recs = read_jsonl(path, "text")
    et = ExampleTokenizer(tok, 64)
    assert et.separator_id == tok.bos_token_id == 0
    with_sep = et.example(recs[0], path).sequences[0].ids
    plain = et.example(recs[1], path).sequences[0].ids
    assert with_sep == [0, 8, 9, 10, 11, 7, 6]  # <s> The capital of France is Paris: a single BOS
    assert with_sep.count(tok.bos_token_id) == 1
    assert plain == with_sep


def test_separator_without_bos_maps_to_eos(tmp_path):
    tok = _sentencepiece_style(bos=False)
    assert tok.bos_token_id is None
    path = _write(tmp_path / "t.jsonl", [{"text": GPT2_SEPARATOR + "hello world"}])
    (rec,) = read_jsonl(path, "text")
    ids = ExampleTokenizer(tok, 64).example(rec, path).sequences[0].ids
    assert ids == [tok.eos_token_id, 4, 5]


# --- SentencePiece-style suffix space ----------------------------------------------------------------------------

@pytest.mark.parametrize("alias", ALIASES)
def test_byte_level_bpe_keeps_suffix_space(alias, tokenizer_of):
    tok = tokenizer_of(alias)
    assert strips_suffix_space(tok) is False
    assert ExampleTokenizer(tok, 512)._encode_suffix(" Paris") == tok(" Paris", add_special_tokens=False)["input_ids"]


def test_sentencepiece_style_strips_suffix_space(tmp_path):
    tok = _sentencepiece_style(bos=True)
    assert strips_suffix_space(tok) is True
    # without stripping, " Paris" alone would carry an extra word-boundary token
    assert tok(" Paris", add_special_tokens=False)["input_ids"] == [3, 6]
    path = _write(tmp_path / "e.jsonl", [{"prefix": "The capital of France is", "suffix": " Paris"}])
    (rec,) = read_jsonl(path, "single")
    (seq,) = ExampleTokenizer(tok, 64).example(rec, path).sequences
    assert seq.ids == [0, 8, 9, 10, 11, 7, 6]
    assert seq.score_from == 6
    # an explicit setting overrides the detection
    (seq,) = ExampleTokenizer(tok, 64, strip_suffix_space=False).example(rec, path).sequences
    assert seq.ids == [0, 8, 9, 10, 11, 7, 3, 6]


@pytest.mark.parametrize("suffix", [" Paris ", "  Paris", "Paris  ", "   Paris   "])
def test_sentencepiece_style_strips_spaces_from_both_ends(tmp_path, suffix):
    """SPEC section 3: the reference tokenizes ``suffix.strip(' ')`` (a few stereoset hard-negative suffixes end in
    a space); without it a trailing or second leading space becomes an extra word-boundary token."""
    tok = _sentencepiece_style(bos=True)
    assert tok(suffix, add_special_tokens=False)["input_ids"] != [6]  # the spaces would cost tokens
    path = _write(tmp_path / "e.jsonl", [{"prefix": "The capital of France is", "suffix": suffix}])
    (rec,) = read_jsonl(path, "single")
    (seq,) = ExampleTokenizer(tok, 64).example(rec, path).sequences
    assert seq.ids == [0, 8, 9, 10, 11, 7] + tok(suffix.strip(" "), add_special_tokens=False)["input_ids"]
    assert seq.ids[seq.score_from:] == [6]


def test_suffix_of_spaces_only_is_a_clear_error_on_sentencepiece(tmp_path):
    tok = _sentencepiece_style(bos=True)
    path = _write(tmp_path / "e.jsonl", [{"prefix": "The capital of France is", "suffix": "  "}])
    (rec,) = read_jsonl(path, "single")
    with pytest.raises(DataFormatError, match="e.jsonl, line 1.*no tokens"):
        ExampleTokenizer(tok, 64).example(rec, path)


def test_byte_level_bpe_keeps_trailing_suffix_space(tokenizer_of):
    tok = tokenizer_of("gpt2")
    assert ExampleTokenizer(tok, 512)._encode_suffix(" Paris ") == tok(" Paris ", add_special_tokens=False)["input_ids"]


def test_empty_prefix_scores_from_bos(tmp_path):
    tok = _sentencepiece_style(bos=True)
    path = _write(tmp_path / "e.jsonl", [{"prefix": "", "suffix": " Paris"}])
    (rec,) = read_jsonl(path, "single")
    (seq,) = ExampleTokenizer(tok, 64).example(rec, path).sequences
    assert seq.ids == [0, 6] and seq.score_from == 1


def test_empty_prefix_without_bos_is_an_error(tokenizer_of, tmp_path):
    path = _write(tmp_path / "e.jsonl", [{"prefix": "", "suffix": " Paris"}])
    (rec,) = read_jsonl(path, "single")
    with pytest.raises(DataFormatError, match=r"line 1.*empty prefix"):
        ExampleTokenizer(tokenizer_of("gpt2"), 64).example(rec, path)


# --- truncation ----------------------------------------------------------------------------------------------------

def test_long_example_loses_prefix_start_and_keeps_suffix(tokenizer_of, tmp_path):
    tok = tokenizer_of("gpt2")
    prefix = " ".join(["word"] * 20)
    path = _write(tmp_path / "e.jsonl", [
        {"prefix": "short prefix", "suffix": " here"},
        {"prefix": prefix, "suffix": " and more"},
    ])
    records = read_jsonl(path, "single")
    prefix_ids = tok(prefix)["input_ids"]
    suffix_ids = tok(" and more", add_special_tokens=False)["input_ids"]
    assert len(prefix_ids) == 20 and len(suffix_ids) == 2
    examples, stats = ExampleTokenizer(tok, 12).examples(records, path)
    short, long = examples
    assert short.truncated == 0
    cut = 20 + 2 - 12
    assert long.truncated == cut
    (seq,) = long.sequences
    assert seq.ids == prefix_ids[cut:] + suffix_ids
    assert len(seq.ids) == 12 and seq.score_from == 20 - cut
    assert stats == TokenizationStats(examples=2, truncated_examples=1, truncated_tokens=cut, notes=stats.notes)
    assert len(stats.notes) == 1 and path in stats.notes[0] and str(cut) in stats.notes[0]


def test_pair_truncation_fits_the_longer_suffix(tokenizer_of, tmp_path):
    tok = tokenizer_of("gpt2")
    prefix = " ".join(["word"] * 10)
    path = _write(tmp_path / "e.jsonl", [{"prefix": prefix, "suffix1": " a", "suffix2": " b c d"}])
    (rec,) = read_jsonl(path, "pair")
    ex = ExampleTokenizer(tok, 8).example(rec, path)
    assert ex.truncated == 10 + 3 - 8
    s1, s2 = ex.sequences
    assert len(s2.ids) == 8 and len(s1.ids) == 6
    assert s1.ids[: s1.score_from] == s2.ids[: s2.score_from] == tok(prefix)["input_ids"][5:]


def test_long_text_keeps_its_last_tokens(tokenizer_of, tmp_path):
    tok = tokenizer_of("gpt2")
    text = " ".join(["word"] * 30)
    path = _write(tmp_path / "t.jsonl", [{"text": text}])
    (rec,) = read_jsonl(path, "text")
    stats = TokenizationStats()
    ex = ExampleTokenizer(tok, 16).example(rec, path, stats)
    assert ex.truncated == 14 and stats.truncated_tokens == 14
    assert ex.sequences[0].ids == tok(text)["input_ids"][14:]


def test_suffix_longer_than_context_is_an_error(tokenizer_of, tmp_path):
    tok = tokenizer_of("gpt2")
    path = _write(tmp_path / "e.jsonl", [
        {"prefix": "fine", "suffix": " ok"},
        {"prefix": "The prefix", "suffix": " " + " ".join(["word"] * 12)},
    ])
    records = read_jsonl(path, "single")
    with pytest.raises(DataFormatError) as info:
        ExampleTokenizer(tok, 10).examples(records, path)
    assert info.value.path == path and info.value.line == 2
    assert f"{path}, line 2" in str(info.value) and "suffix" in str(info.value)


def test_truncation_is_reported_by_the_datamodule(tiny_module, tmp_path):
    """An over-long example of a user task is truncated, reported in describe(), and scored on what is kept."""
    from conftest import reference_scores

    from editing.data.datamodule import TaskDataModule
    from editing.evaluation import evaluate

    module = tiny_module("tiny-gpt2")
    long_prefix = " ".join(["word"] * 600)
    _write(tmp_path / "ev-val.jsonl", [{"prefix": "The capital of France is", "suffix": " Paris"},
                                       {"prefix": long_prefix, "suffix": " Rome"}])
    (tmp_path / "trunc_task.yaml").write_text(
        "loss: good\nthreshold: 20.0\ncanonical: ev-{split}.jsonl\nevaluation: ev-{split}.jsonl\n")
    dm = TaskDataModule(task=str(tmp_path / "trunc_task.yaml"), general_limit=2)
    summary = evaluate(module, dm, roles=["evaluation"])
    info = dm.describe()["evaluation"]
    assert info["examples"] == 2 and info["truncated_examples"] == 1
    assert info["truncated_tokens"] == 600 + 1 - 512
    examples = dm.sets["evaluation"].examples
    assert len(examples[1].sequences[0].ids) == 512
    ref = reference_scores(module.model, examples, "good")
    got = torch.tensor([p["score"] for p in summary["per_example"]], dtype=torch.float64)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
