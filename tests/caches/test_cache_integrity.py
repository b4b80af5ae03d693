"""Caches that can never serve a stale number (issue 34): the sense background, MEMIT's statistics (and their partial
sums), the teacher cache's shards, the embedded model and tokenizer folders, and the corpus token ids.

For each cache: an entry made under other settings (precision, max_length, tokenizer content) is not read; an entry
changed after it was written (rows permuted, shards swapped, NaN stored, truncated, a file deleted) is recomputed,
with a warning naming the file, never used and never a raw safetensors/zip error; and a cache folder that cannot be
written (its path runs through a file) costs the cache, never the run. Every cached result is compared with the same
computation with the caches off (a fresh, empty cache folder).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from editing.core.digests import tensor_sha256
from editing.data.tokenize import ExampleTokenizer

# --- tampering with what a cache stored, whatever its file format --------------------------------------------------


def rewrite(path: Path, change, rehash: bool = False) -> None:
    """Replace the tensors stored at ``path`` by ``change(tensors)`` (a dict), keeping the file's format and metadata;
    with ``rehash`` the stored content hash is made to match (an entry *written* that way, e.g. NaN computed)."""
    if path.suffix == ".pt":
        obj = torch.load(path, weights_only=True)
        tensors = dict(obj) if isinstance(obj, dict) else {"value": obj}
        new = change(tensors)
        torch.save(new if isinstance(obj, dict) else new["value"], path)
        return
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        meta = dict(handle.metadata() or {})
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    new = change(tensors)
    if rehash and "content" in meta:
        meta["content"] = tensor_sha256(new)
    save_file({k: v.contiguous() for k, v in new.items()}, str(path), metadata=meta or None)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def files_of(root: Path, pattern: str = "*") -> list[Path]:
    return sorted(p for p in root.rglob(pattern) if p.is_file() and not p.name.startswith("."))


def blocked(root: Path) -> None:
    """Make ``root`` unusable as a folder: it is a file, so nothing can be created below it (works as root too)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    root.write_text("not a folder")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("EDITING_CACHE", str(root))
    return root


def fresh(monkeypatch, tmp_path: Path, name: str) -> None:
    """Point the cache at a new, empty folder: what follows is computed with no cache to read."""
    monkeypatch.setenv("EDITING_CACHE", str(tmp_path / f"fresh-{name}"))


# --- the sense background ----------------------------------------------------------------------------------------


def _backpack(precision: str):
    from editing.models.loading import ModelConfig, load_model

    return load_model(ModelConfig(name="tiny-backpack", precision=precision))


def _r_texts(data_root: Path, loaded, count: int = 6, max_length: int | None = None):
    from editing.data.jsonl import read_jsonl

    path = data_root / "general" / "regularization.jsonl"
    records = read_jsonl(path, "text")[:count]
    texts, _ = ExampleTokenizer(loaded.tokenizer, max_length or loaded.max_length).examples(records, str(path))
    return texts


def _background(loaded, texts):
    from editing.methods.senses.selection import cached_background

    config = loaded.model.config
    return cached_background(loaded.model, loaded.identity["fingerprint"], texts, config.vocab_size,
                             config.num_senses, loaded.tokenizer.eos_token_id, batch_texts=4, progress=False)


def test_a_bf16_background_is_never_read_by_an_fp32_run(cache, tmp_path, monkeypatch, data_root) -> None:
    bf16, fp32 = _backpack("bf16"), _backpack("fp32")
    texts = _r_texts(data_root, fp32)
    _background(bf16, texts)
    got = _background(fp32, texts)
    fresh(monkeypatch, tmp_path, "fp32")
    expected = _background(fp32, texts)
    assert torch.equal(got, expected), float((got - expected).abs().max())


def test_a_background_of_a_model_whose_config_changed_is_not_reused(cache, tmp_path, monkeypatch, data_root) -> None:
    """The same weights under another config.json (here the layer norms' epsilon): another forward pass, the same
    weight fingerprint; the key must see the config."""
    import json

    from editing.models.loading import ModelConfig, load_model

    first = _backpack("fp32")
    folder = tmp_path / "model"
    first.model.save_pretrained(folder)
    first.tokenizer.save_pretrained(folder)
    texts = _r_texts(data_root, first)
    _background(load_model(ModelConfig(name=str(folder), precision="fp32")), texts)
    config = json.loads((folder / "config.json").read_text())
    config["layer_norm_epsilon"] = 0.5
    (folder / "config.json").write_text(json.dumps(config))
    changed = load_model(ModelConfig(name=str(folder), precision="fp32"))
    got = _background(changed, texts)
    fresh(monkeypatch, tmp_path, "config")
    expected = _background(changed, texts)
    assert torch.equal(got, expected), float((got - expected).abs().max())


def test_a_background_with_permuted_rows_is_recomputed(cache, tmp_path, monkeypatch, data_root, caplog) -> None:
    loaded = _backpack("fp32")
    texts = _r_texts(data_root, loaded)
    first = _background(loaded, texts)
    (stored,) = files_of(cache / "sense_background")
    rewrite(stored, lambda t: {k: v.flip(0) for k, v in t.items()})
    with caplog.at_level(logging.WARNING):
        again = _background(loaded, texts)
    assert torch.equal(again, first)
    assert str(stored) in caplog.text
    # NaN stored with a matching content hash (as if computed): never reused
    rewrite(stored, lambda t: {k: v.clone().fill_(float("nan")) for k, v in t.items()}, rehash=True)
    assert torch.equal(_background(loaded, texts), first)
    truncate(stored)
    assert torch.equal(_background(loaded, texts), first)


def test_a_background_cache_that_cannot_be_written_costs_only_speed(cache, tmp_path, monkeypatch, data_root) -> None:
    loaded = _backpack("fp32")
    texts = _r_texts(data_root, loaded)
    blocked(cache / "sense_background")
    got = _background(loaded, texts)
    fresh(monkeypatch, tmp_path, "bg")
    assert torch.equal(got, _background(loaded, texts))


# --- MEMIT statistics --------------------------------------------------------------------------------------------


def _memit(max_length: int | None = None, **kw):
    from editing.methods import MEMITConfig, MEMITEditor
    from editing.models.loading import ModelConfig

    module = MEMITEditor(ModelConfig(name="tiny-gpt2", precision="fp32"),
                         MEMITConfig(**{"covariance_samples": 600, "context_templates": 1,
                                        "context_template_length": 4, "steps": 3, "layers": [1], **kw}))
    if max_length is not None:
        module.loaded.max_length = max_length
    return module


def _stats(module, data_root):
    from editing.data.datamodule import TaskDataModule

    dm = TaskDataModule(task="country_capital", eval_limit=4, general_limit=8)
    dm.attach(module.tokenizer, module.max_length)
    return module.statistics(dm, progress=False)


def test_memit_statistics_of_another_max_length_are_not_reused(cache, tmp_path, monkeypatch, data_root) -> None:
    full = _stats(_memit(), data_root).moments[1]
    short = _stats(_memit(max_length=6), data_root)
    fresh(monkeypatch, tmp_path, "short")
    expected = _stats(_memit(max_length=6), data_root).moments[1]
    assert not torch.equal(full, expected)  # the setting matters
    assert short.computed_layers == [1]
    assert torch.equal(short.moments[1], expected)


def test_memit_statistics_changed_nan_or_truncated_are_recomputed(cache, data_root, caplog) -> None:
    first = _stats(_memit(), data_root).moments[1]
    (stored,) = files_of(cache / "memit_stats", "*.safetensors")
    rewrite(stored, lambda t: {k: v * 2 for k, v in t.items()})
    with caplog.at_level(logging.WARNING):
        again = _stats(_memit(), data_root)
    assert again.computed_layers == [1] and torch.equal(again.moments[1], first)
    assert str(stored) in caplog.text
    rewrite(stored, lambda t: {k: v.clone().fill_(float("nan")) for k, v in t.items()}, rehash=True)
    again = _stats(_memit(), data_root)
    assert again.computed_layers == [1] and torch.equal(again.moments[1], first)
    truncate(stored)
    again = _stats(_memit(), data_root)  # not a raw safetensors error
    assert again.computed_layers == [1] and torch.equal(again.moments[1], first)


def test_changed_partial_sums_are_not_resumed(cache, tmp_path, monkeypatch, data_root) -> None:
    from editing.methods.memit import covariance

    settings = {"covariance_samples": 2400, "covariance_batch_size": 2}
    reference = _stats(_memit(**settings), data_root).moments[1]
    module = _memit(**settings)
    calls = {"n": 0}

    def stop(*_):
        calls["n"] += 1
        if calls["n"] > covariance.SAVE_EVERY + 2:
            raise KeyboardInterrupt

    for path in files_of(cache / "memit_stats"):
        path.unlink()
    handle = module.model.register_forward_pre_hook(stop)
    try:
        with pytest.raises(KeyboardInterrupt):
            _stats(module, data_root)
    finally:
        handle.remove()
    (partial,) = files_of(cache / "memit_stats", "*.partial.safetensors")
    rewrite(partial, lambda t: {k: (v * 3 if v.is_floating_point() else v) for k, v in t.items()})
    resumed = _stats(module, data_root).moments[1]
    torch.testing.assert_close(resumed, reference, rtol=1e-10, atol=1e-12)


def test_a_memit_statistics_folder_that_cannot_be_written_costs_only_speed(cache, tmp_path, monkeypatch,
                                                                            data_root) -> None:
    blocked(cache / "memit_stats")
    got = _stats(_memit(), data_root).moments[1]
    fresh(monkeypatch, tmp_path, "memit")
    assert torch.equal(got, _stats(_memit(), data_root).moments[1])


# --- the teacher cache -------------------------------------------------------------------------------------------


def _distiller(folder: Path):
    from editing.models.backpack.distill import BackpackDistillation, BackpackShape
    from editing.models.backpack.teacher_cache import TeacherCacheConfig
    from editing.models.loading import ModelConfig

    config = TeacherCacheConfig(enabled=True, top_k=5, hidden_precision="fp32", teacher_bf16=False, shard_blocks=4,
                                batch_size=3, folder=str(folder))
    return BackpackDistillation(teacher=ModelConfig(name="tiny-llama"), shape=BackpackShape(num_senses=4),
                                teacher_cache=config)


def _corpus_blocks(corpus: Path, module):
    from editing.data.corpus import CorpusDataModule

    dm = CorpusDataModule(corpus=str(corpus), block_size=32, batch_size=4, val_blocks=4)
    dm.attach(module.tokenizer)
    dm.setup()
    return dm


INDICES = torch.tensor([1, 4, 5, 9, 11])  # shards 0, 1, 1, 2, 2


def _same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _shard_files(cache) -> list[Path]:
    return sorted(p for p in cache.folder.iterdir() if p.name.startswith("shard-"))


def test_swapped_damaged_or_truncated_teacher_shards_are_recomputed(cache, tmp_path, corpus, caplog) -> None:
    module = _distiller(tmp_path / "teacher")
    dm = _corpus_blocks(corpus, module)
    filled = module.fill_teacher_cache(dm, progress=False)
    expected = filled.read(INDICES)
    first, second, third = _shard_files(filled)[:3]
    aside = first.with_name("aside")
    os.replace(first, aside)
    os.replace(second, first)
    os.replace(aside, second)
    with caplog.at_level(logging.WARNING):
        again = _distiller(tmp_path / "teacher").fill_teacher_cache(dm, progress=False)
        _same(again.read(INDICES), expected)
    assert first.name in caplog.text
    # one value changed inside a shard whose name and layout are intact
    rewrite(third, lambda t: {k: (v.clone().index_fill_(0, torch.tensor([1]), 0.5) if v.is_floating_point() else v)
                              for k, v in t.items()})
    again = _distiller(tmp_path / "teacher").fill_teacher_cache(dm, progress=False)
    _same(again.read(INDICES), expected)
    truncate(second)
    again = _distiller(tmp_path / "teacher").fill_teacher_cache(dm, progress=False)
    _same(again.read(INDICES), expected)


def test_a_damaged_shard_read_without_a_teacher_is_refused_naming_it(cache, tmp_path, corpus) -> None:
    from editing.core.errors import ConfigError

    module = _distiller(tmp_path / "teacher")
    dm = _corpus_blocks(corpus, module)
    filled = module.fill_teacher_cache(dm, progress=False)
    shard = _shard_files(filled)[1]
    rewrite(shard, lambda t: {k: (v.flip(0) if v.is_floating_point() else v) for k, v in t.items()})
    reader = module.teacher_cache_of(dm)  # opened, not filled: it has no teacher to recompute with
    with pytest.raises(ConfigError, match=f"{shard.name}.*cache-teacher"):
        reader.read(INDICES)


def test_a_teacher_cache_folder_that_cannot_be_written_costs_only_speed(cache, tmp_path, corpus) -> None:
    blocked(tmp_path / "teacher")
    module = _distiller(tmp_path / "teacher" / "inside")
    dm = _corpus_blocks(corpus, module)
    got = module.fill_teacher_cache(dm, progress=False).read(INDICES)
    expected = _distiller(tmp_path / "writable").fill_teacher_cache(dm, progress=False).read(INDICES)
    _same(got, expected)


# --- the embedded model and tokenizer folders ------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_tokenizer():
    """SmolLM2's tokenizer read from the package's GGUF file directly (no cache)."""
    from transformers import AutoTokenizer

    from editing.models import tokenizers as offline

    gguf = offline.smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


SAMPLE = "The capital of Mauritius is Port Louis; naïve café, 1234567."


def test_a_damaged_tokenizer_folder_is_rebuilt(cache, gguf_tokenizer, caplog) -> None:
    from editing.models.loading import _smollm2_tokenizer

    expected = gguf_tokenizer(SAMPLE)["input_ids"]
    assert _smollm2_tokenizer()(SAMPLE)["input_ids"] == expected
    folder = cache / "tokenizers" / "smollm2-135m"
    (folder / "tokenizer.json").unlink()
    with caplog.at_level(logging.WARNING):
        assert _smollm2_tokenizer()(SAMPLE)["input_ids"] == expected
    assert "tokenizer.json" in caplog.text
    truncate(folder / "tokenizer.json")
    assert _smollm2_tokenizer()(SAMPLE)["input_ids"] == expected


def test_a_tokenizer_cache_that_cannot_be_written_costs_only_speed(cache, gguf_tokenizer, caplog) -> None:
    from editing.models.loading import _smollm2_tokenizer

    blocked(cache / "tokenizers")
    with caplog.at_level(logging.WARNING):
        assert _smollm2_tokenizer()(SAMPLE)["input_ids"] == gguf_tokenizer(SAMPLE)["input_ids"]
    assert "tokenizers" in caplog.text


@pytest.fixture
def tiny_gguf(monkeypatch):
    """The embedded model's loader with a tiny model in place of the dequantized GGUF (the folder logic is the same;
    SmolLM2 itself is too slow for a unit test)."""
    from editing.models import loading
    from editing.models.tiny import build_tiny

    tok = loading._offline_tokenizer("gpt2")
    calls = []

    def fake_gguf(path):
        calls.append(path)
        return build_tiny("tiny-llama", len(tok), seed=3), tok

    monkeypatch.setattr(loading, "_load_gguf", fake_gguf)
    monkeypatch.setattr(loading, "_smollm2_tokenizer", lambda: tok)
    return calls


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("damage", ["delete", "truncate", "config", "late_byte"])
def test_a_damaged_embedded_model_folder_is_rebuilt(cache, tiny_gguf, caplog, damage, monkeypatch) -> None:
    from editing.models import loading
    from editing.models.loading import _load_embedded

    if damage == "late_byte":  # the weights checked by size and first MiB only, as SmolLM2's 540 MB are
        monkeypatch.setattr(loading, "FULL_HASH_LIMIT", 0)
    expected = _weights(_load_embedded()[0])
    folder = cache / "models" / "smollm2-135m-instruct-q4_1"
    weights = folder / "model.safetensors"
    if damage == "delete":
        weights.unlink()
    elif damage == "truncate":
        truncate(weights)
    elif damage == "late_byte":  # one byte past the first MiB: only the weights' content hash can see it
        data = bytearray(weights.read_bytes())
        assert len(data) > (1 << 20) + 8
        data[-5] ^= 0x40
        weights.write_bytes(bytes(data))
    else:
        (folder / "config.json").write_text("{")
    with caplog.at_level(logging.WARNING):
        model, _ = _load_embedded()
    _same(_weights(model), expected)
    assert len(tiny_gguf) == 2 and str(folder) in caplog.text


def test_an_embedded_model_cache_that_cannot_be_written_costs_only_speed(cache, tiny_gguf, caplog) -> None:
    from editing.models.loading import _load_embedded

    blocked(cache / "models")
    with caplog.at_level(logging.WARNING):
        model, _ = _load_embedded()
    from editing.models.tiny import build_tiny

    assert "models" in caplog.text
    _same(_weights(model), _weights(build_tiny("tiny-llama", model.config.vocab_size, seed=3)))


# --- corpus token ids --------------------------------------------------------------------------------------------


def _stream(corpus: Path, tok):
    from editing.data.corpus import CorpusDataModule

    dm = CorpusDataModule(corpus=str(corpus), block_size=16, batch_size=2, val_blocks=2)
    dm.attach(tok)
    return dm.token_stream()


def _lowercasing_gpt2():
    """The gpt2 tokenizer with a lowercasing normalizer: the same name, length and EOS, other ids."""
    from tokenizers import normalizers

    from editing.models import tokenizers as offline

    tok = offline.gpt2_tokenizer()
    tok.backend_tokenizer.normalizer = normalizers.Lowercase()
    return tok


def test_corpus_token_ids_of_another_tokenizer_content_are_not_reused(cache, tmp_path, monkeypatch, corpus) -> None:
    from editing.models import tokenizers as offline

    text = (corpus / "part.jsonl").read_text()
    (corpus / "part.jsonl").write_text(text.replace('"text": "', '"text": "Upper Case '))
    plain = _stream(corpus, offline.gpt2_tokenizer())
    lower = _lowercasing_gpt2()
    assert lower.name_or_path == offline.gpt2_tokenizer().name_or_path
    got = _stream(corpus, lower)
    fresh(monkeypatch, tmp_path, "lower")
    expected = _stream(corpus, _lowercasing_gpt2())
    assert not torch.equal(plain, expected)
    assert torch.equal(got, expected)


def test_corpus_token_ids_changed_or_truncated_are_recomputed(cache, corpus, caplog) -> None:
    from editing.models import tokenizers as offline

    tok = offline.gpt2_tokenizer()
    first = _stream(corpus, tok)
    (stored,) = files_of(cache / "corpus_tokens")
    rewrite(stored, lambda t: {k: v.flip(0) for k, v in t.items()})
    with caplog.at_level(logging.WARNING):
        assert torch.equal(_stream(corpus, tok), first)
    assert str(stored) in caplog.text
    truncate(stored)
    assert torch.equal(_stream(corpus, tok), first)


def test_a_corpus_token_cache_that_cannot_be_written_costs_only_speed(cache, corpus) -> None:
    from editing.models import tokenizers as offline

    blocked(cache / "corpus_tokens")
    tok = offline.gpt2_tokenizer()
    got = _stream(corpus, tok)
    ids = []
    for line in (corpus / "part.jsonl").read_text().splitlines():
        ids += tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert got.tolist() == ids


# --- `editing cache list/clear` after the format change ---------------------------------------------------------


def test_cache_list_and_clear_see_the_new_formats_and_old_files_are_misses(cache, corpus, data_root) -> None:
    from editing.caches.contents import cache_entries
    from editing.commands.cache import cache_clear
    from editing.models import tokenizers as offline

    loaded = _backpack("fp32")
    texts = _r_texts(data_root, loaded, count=3)
    old = cache / "sense_background" / loaded.identity["fingerprint"] / "old-format.pt"
    old.parent.mkdir(parents=True)
    torch.save(torch.zeros(2, 2), old)  # what the previous version wrote: never read, listed, removable
    got = _background(loaded, texts)
    _stream(corpus, offline.gpt2_tokenizer())
    kinds = {e.kind.value for e in cache_entries()}
    assert {"sense_background", "corpus_tokens"} <= kinds
    assert any(p.suffix == ".safetensors" for p in files_of(cache / "sense_background"))
    assert torch.equal(got, _background(loaded, texts))
    cache_clear(kinds="sense_background,corpus_tokens")
    assert not files_of(cache / "sense_background") and not files_of(cache / "corpus_tokens")
