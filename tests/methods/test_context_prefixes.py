"""``--data.context_prefixes N`` (issue 36 item 4): the gradient methods train on each canonical example behind N
short prefixes the base model generates (MEMIT's context templates), besides the bare example.

The prefixes are recomputed here by a plain greedy loop and the sequences by SPEC section 3's tokenization.
"""

from __future__ import annotations

import pytest
import torch
from fakes import ref_example

from editing.core.errors import ConfigError
from editing.data.datamodule import TaskDataModule
from editing.methods.lora.config import LoRAConfig
from editing.methods.lora.module import LoRAEditor
from editing.methods.memit.config import MEMITConfig
from editing.methods.memit.module import MEMITEditor
from editing.models.loading import ModelConfig

BASE = ModelConfig(name="tiny-gpt2", precision="fp32")
STARTS = ("The", "Therefore", "Because")  # the fixed first words, as MEMIT's templates start


def _dm(module, **kw) -> TaskDataModule:
    dm = TaskDataModule(task="country_capital", eval_limit=4, general_limit=4, seed=3, **kw)
    dm.attach(module.tokenizer, module.max_length)
    dm.setup("fit")
    return dm


def _batches(dm: TaskDataModule) -> list[dict]:
    return list(dm.train_dataloader())


def _greedy_prefixes(model, tok, count: int, length: int) -> list[str]:
    model.eval()  # p0 without dropout: greedy decoding is the same in every run
    out = []
    for word in STARTS[:count]:
        ids = tok(word)["input_ids"]
        for _ in range(length):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            ids = ids + [int(logits.argmax())]
        text = " ".join(tok.decode(ids, skip_special_tokens=True).replace("{", " ").replace("}", " ").split())
        out.append(text + ". ")
    return out


@pytest.fixture(scope="module")
def lora() -> LoRAEditor:
    return LoRAEditor(BASE, lora=LoRAConfig(rank=2))


def test_without_prefixes_the_training_batches_are_todays(lora) -> None:
    today, zero = _dm(lora), _dm(lora, context_prefixes=0)
    lora.use_context_prefixes(zero)  # nothing to do with N = 0
    a, b = _batches(today), _batches(zero)
    assert len(a) == len(b) == len(today.records("canonical"))
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x if torch.is_tensor(x[k]))


def test_with_prefixes_each_example_trains_bare_and_behind_each_generated_prefix(lora) -> None:
    dm = _dm(lora, context_prefixes=2, context_prefix_tokens=3)
    lora.use_context_prefixes(dm)
    prefixes = _greedy_prefixes(lora.model, lora.tokenizer, 2, 3)
    assert dm.context_prefix_texts == prefixes and all(p.endswith(". ") and len(p) > 4 for p in prefixes)
    want = []
    for r in dm.records("canonical"):
        for p in ["", *prefixes]:
            want.append(ref_example(lora.tokenizer, {"prefix": p + r.prefix, "suffix": r.suffixes[0]})[0])
    got = [(s.ids, s.score_from) for e in dm.training_set().examples for s in e.sequences]
    assert sorted(got) == sorted(want)
    # the reliability the fit reports stays on the bare canonical examples
    assert len(dm.load("canonical").examples) == len(dm.records("canonical"))
    # every training batch is one of those sequences; one epoch sees each once
    seen = sorted((b["input_ids"][0][b["attention_mask"][0].bool()].tolist()) for b in _batches(dm))
    assert seen == sorted(ids for ids, _ in want)
    assert dm.describe()["canonical_training"]["context_prefixes"] == prefixes


def test_methods_that_do_not_train_on_batches_refuse_prefixes() -> None:
    memit = MEMITEditor(BASE, memit=MEMITConfig(layers=[1]))
    dm = _dm(memit, context_prefixes=2)
    with pytest.raises(ConfigError, match="context_prefixes.*lora or full"):
        memit.use_context_prefixes(dm)


def test_bad_prefix_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="context_prefixes"):
        TaskDataModule(task="country_capital", context_prefixes=-1)
    with pytest.raises(ConfigError, match="context_prefix_tokens"):
        TaskDataModule(task="country_capital", context_prefixes=1, context_prefix_tokens=0)
