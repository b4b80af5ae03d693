"""The ensemble of a large model and a Backpack edit (SPEC section 9), checked against a plain loop written here:
one sequence at a time, the three models' full logits, log p_large + beta (log p_edit - log p_base) over the shared
vocabulary, renormalised.

The edits come from every method that edits a Backpack (LoRA, full finetuning, senses), in memory and loaded from
their saved files (``editing.edits.load.load_edited``); the base Backpack of the reference loop is a fresh load of
the base model, never the module's own ``reference()``.
"""

from __future__ import annotations

import math

import pytest
import torch

from editing.data.datamodule import TaskDataModule
from editing.edits.load import load_edited
from editing.evaluation import evaluate
from editing.methods import FullEditor, LoRAConfig, LoRAEditor, SensesConfig, SensesEditor
from editing.models.ensemble import beta_set_to
from editing.models.loading import ModelConfig, load_model
from editing.protocol.ensemble_search import BETAS, ball_key, ensemble_module, general_nll_by_beta, search

LIMITS = {"eval_limit": 4, "general_limit": 5}
VOCAB = 50257  # both tiny models use the GPT-2 tokenizer: its 50257 ids are the shared vocabulary
# one task per loss type (SPEC section 2)
TASKS = {"good": "country_capital", "bad": "stereoset", "balance": "pronoun_gender_bias",
         "good-v-bad": "verb_conjugation"}
THRESHOLDS = {"good": -math.log(0.2), "bad": math.log(0.001), "balance": math.log(1.5),
              "good-v-bad": math.log(1 / 16)}


# ---- the plain reference loop (SPEC sections 3, 5 and 9) ----------------------------------------------------------
class PlainEnsemble:
    """The ensemble's log-probabilities at any beta, one sequence at a time, from the three models' full logits."""

    def __init__(self, large, edited, base) -> None:
        self.models = (large, edited, base)
        self._cache: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def _parts(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        key = tuple(ids)
        if key not in self._cache:
            x = torch.tensor([ids])
            large, edited, base = (m(input_ids=x).logits[0].double()[:, :VOCAB] for m in self.models)
            change = torch.log_softmax(edited, -1) - torch.log_softmax(base, -1)
            self._cache[key] = (large, change)
        return self._cache[key]

    def suffix_nll(self, seq, beta: float) -> tuple[float, int]:
        """Sum of NLL of the scored tokens of one tokenized sequence, and their number."""
        large, change = self._parts(seq.ids)
        logprobs = torch.log_softmax(large + beta * change, -1)
        total = 0.0
        for t in range(seq.score_from, len(seq.ids)):
            total -= float(logprobs[t - 1, seq.ids[t]])
        return total, len(seq.ids) - seq.score_from

    def token_mean_nll(self, examples, beta: float) -> float:
        total, tokens = 0.0, 0
        for example in examples:
            s, n = self.suffix_nll(example.sequences[0], beta)
            total, tokens = total + s, tokens + n
        return total / tokens

    def scores(self, examples, loss: str, beta: float) -> list[float]:
        out = []
        for example in examples:
            sums = [self.suffix_nll(seq, beta)[0] for seq in example.sequences]
            if loss == "good":
                out.append(sums[0])
            elif loss == "bad":
                out.append(-sums[0])
            elif loss == "balance":
                out.append(abs(sums[0] - sums[1]))
            else:  # good-v-bad
                out.append(sums[0] - sums[1])
        return out

    def hard_negative_nll(self, examples, beta: float) -> float:
        values = []
        for example in examples:
            s, n = self.suffix_nll(example.sequences[0], beta)
            values.append(s / n if example.is_text else s)
        return sum(values) / len(values)

    def metrics(self, dm: TaskDataModule, loss: str, beta: float) -> dict:
        scores = self.scores(dm.load("evaluation").examples, loss, beta)
        return {"scores": scores,
                "success_rate": sum(s <= THRESHOLDS[loss] for s in scores) / len(scores),
                "general_nll": self.token_mean_nll(dm.load("general").examples, beta),
                "targeted_nll": self.token_mean_nll(dm.load("targeted").examples, beta),
                "hard_negative_nll": self.hard_negative_nll(dm.load("hard_negatives").examples, beta)}


def plain_choose_beta(nll: dict[float, float], eps: float) -> float:
    """SPEC section 9: from 1.0 down in steps of 0.1, the first beta whose general NLL < (1 + eps) x beta 0's."""
    for i in range(10):
        beta = round(1.0 - 0.1 * i, 1)
        if nll[beta] < (1 + eps) * nll[0.0]:
            return beta
    return 0.0


def assert_metrics_equal(got: dict, expected: dict) -> None:
    assert [p["score"] for p in got["per_example"]] == pytest.approx(expected["scores"], rel=1e-5, abs=1e-5)
    for name in ("success_rate", "general_nll", "targeted_nll", "hard_negative_nll"):
        assert got[name] == pytest.approx(expected[name], rel=1e-5), name


# ---- edits ---------------------------------------------------------------------------------------------------------
def perturbed(module, seed: int, scale: float, only=None):
    """``module`` with its weights (or those whose name contains ``only``) moved by seeded noise."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.requires_grad and (only is None or only in name):
                p.add_(scale * torch.randn(p.shape, generator=generator))
    return module


def make_edit(method: str, seed: int, base: ModelConfig):
    """An in-memory edit of the Backpack ``base`` by ``method``, different for every seed."""
    if method == "lora":
        return perturbed(LoRAEditor(base, lora=LoRAConfig(rank=2, layer_fraction=1.0)), seed, 0.3, "lora_")
    if method == "full":
        module = FullEditor(base, gradient_checkpointing=False)
        module.model.requires_grad_(False)
        for name, p in module.model.named_parameters():  # a few tensors, as a full or MEMIT edit saves them
            p.requires_grad_(".mlp.c_proj." in name or ".wte." in name)
        perturbed(module, seed, 0.05)
        module.model.requires_grad_(True)
        return module
    if method == "senses":
        module = SensesEditor(base, senses=SensesConfig(senses_per_example=5, selection_lambda=100.0))
        dm = TaskDataModule(task="country_capital", **LIMITS)
        dm.attach(module.tokenizer, module.max_length)
        module.select(dm)
        return perturbed(module, seed, 1.0, "sense_deltas")
    raise ValueError(method)


@pytest.fixture(scope="module")
def large():
    return load_model(ModelConfig(name="tiny-gpt2", precision="fp32"))


@pytest.fixture(scope="module")
def backpack(tmp_path_factory) -> ModelConfig:
    """tiny-backpack with its (tied) word embeddings scaled up, saved as a model folder: a random tiny Backpack's
    next-token distributions are nearly uniform, so that edits would barely move them; this one's are not."""
    folder = tmp_path_factory.mktemp("sharp_backpack")
    loaded = load_model(ModelConfig(name="tiny-backpack", precision="fp32"))
    with torch.no_grad():
        loaded.model.get_input_embeddings().weight.mul_(100.0)
    loaded.model.save_pretrained(str(folder))
    loaded.tokenizer.save_pretrained(str(folder))
    return ModelConfig(name=str(folder), precision="fp32")


@pytest.fixture(scope="module")
def base_backpack(backpack):
    """The unedited Backpack, loaded on its own (the reference loop never asks an edit for its p0)."""
    return load_model(backpack).model.eval()


@pytest.fixture(scope="module")
def full_edit(backpack):
    module = FullEditor(backpack, gradient_checkpointing=False)
    perturbed(module, seed=0, scale=0.05)
    return module


def _dm(task: str) -> TaskDataModule:
    return TaskDataModule(task=task, **LIMITS)


# ---- item 7: the base distribution comes from the model reference() yields ---------------------------------------
@pytest.mark.parametrize("loss", list(TASKS))
def test_ensemble_of_an_in_memory_full_finetuning_edit_equals_the_plain_loop(loss, data_root, large, base_backpack,
                                                                              full_edit) -> None:
    module, ensemble = ensemble_module(large, full_edit, VOCAB)
    assert ensemble.vocab == VOCAB
    dm = _dm(TASKS[loss])
    plain = PlainEnsemble(large.model, full_edit.model.eval(), base_backpack)
    with beta_set_to(ensemble, 0.0):
        alone = evaluate(module, dm)
    for beta in (1.0, 0.6, 0.3):
        with beta_set_to(ensemble, beta):
            got = evaluate(module, dm)
        assert_metrics_equal(got, plain.metrics(dm, loss, beta))
        if beta == 1.0:  # the edit changes the ensemble (edited minus base is not zero)
            diff = max(abs(a["score"] - b["score"]) for a, b in zip(got["per_example"], alone["per_example"],
                                                                     strict=True))
            assert diff > 1e-2 and abs(got["general_nll"] - alone["general_nll"]) > 1e-3


# ---- SPEC section 9: the one-pass NLL of every beta ---------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "full", "senses"])
@pytest.mark.parametrize("loaded", [False, True], ids=["in_memory", "loaded"])
def test_general_nll_by_beta_equals_the_plain_loop(method, loaded, tmp_path, data_root, large, backpack,
                                                   base_backpack) -> None:
    source = make_edit(method, seed=1, base=backpack)
    source.model.eval()
    backpack = source
    if loaded:
        source.export_edit(tmp_path / "edit")
        backpack = load_edited(tmp_path / "edit")
        assert backpack.edit_kind == {"lora": "lora", "full": "tensors", "senses": "senses"}[method]
    _, ensemble = ensemble_module(large, backpack, VOCAB)
    dm = _dm("country_capital")
    dm.attach(large.tokenizer, large.max_length)
    got = general_nll_by_beta(ensemble, dm)
    assert list(got) == list(BETAS)
    plain = PlainEnsemble(large.model, source.model, base_backpack)
    general = dm.load("general").examples
    expected = {beta: plain.token_mean_nll(general, beta) for beta in BETAS}
    assert got == pytest.approx(expected, rel=1e-6)
    assert abs(expected[1.0] - expected[0.0]) > 1e-4  # the edit matters, so a zero change would be caught


# ---- item 2: each ball measures its own edit ----------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "full", "senses"])
def test_search_measures_each_balls_own_loaded_edit(method, tmp_path, data_root, large, backpack,
                                                    base_backpack) -> None:
    balls = (0.5, 0.05)  # wide balls, so that a non-zero beta (and the ensemble's own evaluation) is chosen
    sources = {ball_key(eps): make_edit(method, seed=2 + i, base=backpack) for i, eps in enumerate(balls)}
    backpacks = {}
    for key, source in sources.items():
        source.model.eval()
        source.export_edit(tmp_path / key)
        backpacks[key] = load_edited(tmp_path / key)
    dm = _dm("country_capital")
    found = search(large, backpacks, dm, balls, progress=False)
    assert found["vocab"] == VOCAB
    nll_of = {}
    for eps in balls:
        key = ball_key(eps)
        plain = PlainEnsemble(large.model, sources[key].model, base_backpack)
        expected = {beta: plain.token_mean_nll(dm.load("general").examples, beta) for beta in BETAS}
        entry = found["balls"][key]
        nll_of[key] = entry["general_nll_by_beta"]
        assert entry["general_nll_by_beta"] == pytest.approx({f"{b:.1f}": v for b, v in expected.items()}, rel=1e-6)
        beta = plain_choose_beta(expected, eps)
        assert entry["beta"] == beta
        assert_metrics_equal(entry["metrics"], plain.metrics(dm, "good", beta))
    assert nll_of[ball_key(balls[0])]["1.0"] != pytest.approx(nll_of[ball_key(balls[1])]["1.0"], rel=1e-6)


def test_search_measures_an_edit_shared_by_two_balls_once(tmp_path, data_root, large, backpack,
                                                          monkeypatch) -> None:
    """Balls whose runs chose the same epoch carry the same edit: it is measured once (the cache still works)."""
    import editing.protocol.ensemble_search as es

    source = make_edit("lora", seed=4, base=backpack)
    source.export_edit(tmp_path / "edit")
    backpacks = {ball_key(eps): load_edited(tmp_path / "edit") for eps in (0.5, 0.05)}
    calls = []
    real = es.general_nll_by_beta
    monkeypatch.setattr(es, "general_nll_by_beta", lambda *a, **k: calls.append(1) or real(*a, **k))
    found = search(large, backpacks, _dm("country_capital"), (0.5, 0.05), progress=False)
    assert len(calls) == 1
    first, second = (found["balls"][ball_key(eps)]["general_nll_by_beta"] for eps in (0.5, 0.05))
    assert first == second
