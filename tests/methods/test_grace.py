"""GRACE (SPEC section 13) against plain-loop references written here from SPEC: the codebook rules, the edit on
tiny-gpt2 and tiny-llama for every loss type (entries, radii, labels, trained values), the model's outputs (exactly
the base model's where no position is within a radius), the sweep's radius and layers, a codebook grown over a
sequence of edits, generation, and the saved edit's refusals (merged export, combination)."""

from __future__ import annotations

import math

import pytest
import torch

from editing.core.errors import ConfigError
from editing.data.datamodule import TaskDataModule
from editing.data.tokenize import Sequence, TokenizedExample
from editing.methods.grace import GRACEConfig, GRACEEditor
from editing.methods.grace.codebook import Codebook
from editing.models.loading import ModelConfig

LOSS_OF = {"country_capital": "good", "stereoset": "bad", "pronoun_gender_bias": "balance",
           "verb_conjugation": "good-v-bad"}
LAYER = 2


# --- references written from SPEC 13 (python lists and loops; nothing of the package) ---------------------------
def _pydist(a: list[float], b: list[float]) -> float:
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b, strict=True)))


def _dist(a, b) -> float:
    """Euclidean distance in float64, one pair at a time. The reference's rules and its replacement use this one
    routine, so that a radius grown to a query's distance covers that query (another summation order may not)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float(((a - b) ** 2).sum().sqrt())


def _plain_builder(queries, labels, init_eps):
    """SPEC 13 rules, one example at a time, with Python lists."""
    keys, eps, labs = [], [], []
    for q, lab in zip(queries, labels, strict=True):
        q = [float(x) for x in q]
        if keys:
            ds = [_pydist(k, q) for k in keys]
            i = min(range(len(ds)), key=lambda j: ds[j])
            if ds[i] <= eps[i] + init_eps:
                if labs[i] == lab:
                    eps[i] = max(eps[i], ds[i])
                    continue
                eps[i] = ds[i] / 2
                keys.append(q)
                eps.append(ds[i] / 2)
                labs.append(lab)
                continue
        keys.append(q)
        eps.append(init_eps)
        labs.append(lab)
    return keys, eps, labs


class RefBook:
    """A codebook as lists: keys (lists of floats), values (tensors), radii, labels; ``rule`` applies SPEC 13."""

    def __init__(self) -> None:
        self.keys, self.values, self.eps, self.labels = [], [], [], []

    def rule(self, q: list[float], label: tuple, init_eps: float, value: torch.Tensor) -> tuple[str, int]:
        if self.keys:
            ds = [_dist(k, q) for k in self.keys]
            i = min(range(len(ds)), key=lambda j: ds[j])
            if ds[i] <= self.eps[i] + init_eps:
                if self.labels[i] == label:
                    self.eps[i] = max(self.eps[i], ds[i])
                    return "grow", i
                self.eps[i] = ds[i] / 2
                self._add(q, label, ds[i] / 2, value)
                return "split", len(self.keys) - 1
        self._add(q, label, init_eps, value)
        return "new", len(self.keys) - 1

    def _add(self, q, label, radius, value) -> None:
        self.keys.append(torch.as_tensor(q, dtype=torch.float64))
        self.labels.append(label)
        self.eps.append(radius)
        self.values.append(value.detach().clone())

    def nearest_hit(self, x: torch.Tensor) -> int | None:
        ds = [_dist(k, x) for k in self.keys]
        if not ds:
            return None
        i = min(range(len(ds)), key=lambda j: ds[j])
        return i if ds[i] <= self.eps[i] else None


def _path(model_name: str, layer: int) -> str:
    return f"transformer.h.{layer}.mlp.c_proj" if model_name == "tiny-gpt2" else f"model.layers.{layer}.mlp.down_proj"


def _replacing_hook(book: RefBook, span: str, live: tuple[int, torch.Tensor] | None = None, seen: list | None = None):
    """SPEC 13's replacement, position by position: the nearest entry's value where the input is within its eps;
    ``following`` also at every later position (the value of the last match)."""

    def hook(_module, args, output):
        x = args[0].detach().double()
        rows = []
        for b in range(len(x)):
            current = None
            for t in range(len(x[b])):
                i = book.nearest_hit(x[b][t])
                if i is not None:
                    current = i
                    if seen is not None:
                        seen.append((b, t))
                use = i if span == "position" else current
                if use is None:
                    rows.append(output[b, t])
                else:
                    rows.append(live[1] if live is not None and live[0] == use else book.values[use])
        return torch.stack(rows).reshape(output.shape).to(output.dtype)

    return hook


def _capture(model, path: str, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    store = {}
    handle = model.get_submodule(path).register_forward_hook(
        lambda _m, args, out: store.update(x=args[0][0].detach().float(), y=out[0].detach().float()))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    return store["x"], store["y"]


def _spec_loss(model, example: TokenizedExample, loss: str) -> torch.Tensor:
    """SPEC 4: m(s) = mean over the suffix tokens of their cross-entropy, combined by the loss type."""
    means = []
    for seq in example.sequences:
        logits = model(input_ids=torch.tensor([seq.ids])).logits[0].float()
        terms = [-torch.log_softmax(logits[t - 1], -1)[seq.ids[t]] for t in range(seq.score_from, len(seq.ids))]
        means.append(sum(terms) / len(terms))
    if loss == "good":
        return means[0]
    if loss == "bad":
        return -means[0]
    if loss == "balance":
        return (means[0] - means[1]).abs()
    return means[0] - means[1]


def _label(example: TokenizedExample) -> tuple:
    out = []
    for i, seq in enumerate(example.sequences):
        out += (["|"] if i else []) + seq.ids[seq.score_from:]
    return tuple(out)


def _reference_edit(model, path, examples, loss, init_eps, steps, lr, span, value_init, seed=0):
    """SPEC 13's edit in file order: the query at the last prefix token, the rule, then the entry's value alone by
    plain gradient descent on the example's task loss."""
    book, branches = RefBook(), []
    generator = torch.Generator().manual_seed(seed)
    module = model.get_submodule(path)
    for ex in examples:
        pos = ex.sequences[0].score_from - 1
        x, y = _capture(model, path, ex.sequences[0].ids)
        draw = torch.randn(y.shape[1], generator=generator)
        value = y[pos] if value_init == "warm" else draw
        branch, i = book.rule(x[pos].tolist(), _label(ex), init_eps, value)
        branches.append(branch)
        v = book.values[i].clone().requires_grad_(True)
        handle = module.register_forward_hook(_replacing_hook(book, span, live=(i, v)))
        try:
            for _ in range(steps):
                (grad,) = torch.autograd.grad(_spec_loss(model, ex, loss), v)
                with torch.no_grad():
                    v -= lr * grad
        finally:
            handle.remove()
        book.values[i] = v.detach()
    return book, branches


def _rule_examples(model, path, canonical: list[TokenizedExample],
                   texts: list[list[int]]) -> tuple[list[TokenizedExample], float]:
    """Four examples made from the task's canonical ones so that SPEC 13's rules fire in the order new, grow, new,
    split: a; b's prefix with a's targets; c, a prefix far from a (a canonical one or the start of a general text)
    with a's targets; b's prefix with other targets (a's, in the other order, or c's). Returns them and init_eps."""
    pool = canonical[:24]
    prefixes = [ex.sequences[0].ids[: ex.sequences[0].score_from] for ex in pool]
    far = prefixes + [ids[:k] for ids in texts for k in (4, 9, 16) if len(ids) > k]

    def query(prefix: list[int]) -> torch.Tensor:
        return _capture(model, path, prefix)[0][-1].double()

    qs, fq = [query(p) for p in prefixes], [query(p) for p in far]
    pairs = sorted((_dist(qs[i], qs[j]), i, j) for i in range(len(pool)) for j in range(i + 1, len(pool)))
    # growth needs init_eps >= d_ab / 2, a new entry for c needs d_ac > d_ab + init_eps: the closest distinct pair
    # (a, b) with a prefix c far enough from a, and init_eps in the middle of what the two allow
    d_ab, a, b, c, d_ac = next((d, i, j, k, _dist(qs[i], fq[k])) for d, i, j in pairs if d > 0
                               for k in [max(range(len(far)), key=lambda k, i=i: _dist(qs[i], fq[k]))]
                               if _dist(qs[i], fq[k]) > 1.5 * d)
    init_eps = (d_ab / 2 + (d_ac - d_ab)) / 2

    def made(prefix: list[int], targets_of: TokenizedExample, reverse: bool = False) -> TokenizedExample:
        suffixes = [s.ids[s.score_from:] for s in targets_of.sequences]
        suffixes = suffixes[::-1] if reverse else suffixes
        return TokenizedExample(0, [Sequence(prefix + s, len(prefix)) for s in suffixes])

    other = next((e for e in pool if _label(e) != _label(pool[a])), None)
    last = made(prefixes[b], pool[a], reverse=True) if len(pool[a].sequences) > 1 else made(prefixes[b], other)
    return [pool[a], made(prefixes[b], pool[a]), made(far[c], pool[a]), last], init_eps


CASES = [("tiny-gpt2", "country_capital", "position", "warm"), ("tiny-gpt2", "stereoset", "position", "cold"),
         ("tiny-gpt2", "pronoun_gender_bias", "following", "warm"),
         ("tiny-gpt2", "verb_conjugation", "position", "warm"),
         ("tiny-llama", "country_capital", "following", "cold"), ("tiny-llama", "stereoset", "position", "warm"),
         ("tiny-llama", "pronoun_gender_bias", "position", "warm"),
         ("tiny-llama", "verb_conjugation", "position", "cold")]


@pytest.mark.parametrize("model_name,task,span,value_init", CASES, ids=["-".join(c) for c in CASES])
def test_edit_and_outputs_match_a_plain_loop_reference(model_name, task, span, value_init, data_root) -> None:
    steps, lr = 3, 0.5
    module = GRACEEditor(ModelConfig(name=model_name, precision="fp32"),
                         grace=GRACEConfig(layer=LAYER, span=span, value_init=value_init, steps=steps, lr=lr))
    dm = TaskDataModule(task=task, eval_limit=2, general_limit=4)
    dm.attach(module.tokenizer, module.max_length)
    path = _path(model_name, LAYER)
    with module.reference() as base:
        texts = [s.ids for e in dm.load("general").examples for s in e.sequences]
        examples, init_eps = _rule_examples(base, path, dm.load("canonical").examples, texts)
        book, branches = _reference_edit(base, path, examples, LOSS_OF[task], init_eps, steps, lr, span, value_init)
    assert branches == ["new", "grow", "new", "split"], branches
    module.grace_config.init_eps = init_eps
    module.compute_edit(dm, examples=examples, progress=False)

    got = module.codebook
    assert len(got) == len(book.keys) == 3
    torch.testing.assert_close(got.keys, torch.stack(book.keys).float(), rtol=1e-5, atol=1e-6)
    assert got.eps.tolist() == pytest.approx(book.eps, rel=2e-5)  # a grown radius is 1e-5 above the distance
    assert [got.label(i) for i in range(len(got))] == [module_label(ex) for ex in (examples[0], examples[2],
                                                                                    examples[3])]
    assert got.label(2) != got.label(0)
    torch.testing.assert_close(got.values, torch.stack(book.values), rtol=1e-4, atol=1e-5)

    # outputs: exactly the base model where no position is within a radius, SPEC's replacement elsewhere
    texts = [s.ids for e in dm.load("general").examples for s in e.sequences] + \
        [s.ids for e in examples for s in e.sequences]
    far = near = 0
    for ids in texts:
        with torch.no_grad():
            edited = module.model(input_ids=torch.tensor([ids])).logits[0]
            with module.reference() as base:
                plain = base(input_ids=torch.tensor([ids])).logits[0]
                seen: list = []
                handle = base.get_submodule(path).register_forward_hook(_replacing_hook(book, span, seen=seen))
                try:
                    want = base(input_ids=torch.tensor([ids])).logits[0]
                finally:
                    handle.remove()
        if not seen:
            far += 1
            assert torch.equal(edited, plain), "a text far from every key is not computed exactly as by the base model"
        else:
            near += 1
            torch.testing.assert_close(edited, want, rtol=1e-4, atol=1e-4)
            assert not torch.equal(edited, plain)
    assert far and near, (far, near)


def module_label(example: TokenizedExample) -> tuple:
    """The label the package stores: the targets with -2 between suffixes (its separator; ``_label`` uses '|')."""
    return tuple(-2 if t == "|" else t for t in _label(example))


# --- the codebook's rules on their own ---------------------------------------------------------------------------
def test_radius_rules_match_plain_loop():
    torch.manual_seed(0)
    queries = [torch.randn(4) * s for s in (1, 1, 3, 1, 0.2, 5)]
    queries.append(queries[0] + 0.3)  # same label near entry 0: growth
    queries.append(queries[1] + 0.3)  # other label near entry 1: halving
    labels = [(1,), (2,), (1,), (3,), (1,), (2,), (1,), (9,)]
    book = Codebook(4, 3)
    for q, lab in zip(queries, labels, strict=True):
        book.add_query(q, lab, 1.5, torch.zeros(3))
    keys, eps, labs = _plain_builder(queries, labels, 1.5)
    assert len(book) == len(keys)
    assert [book.label(i) for i in range(len(book))] == labs
    assert book.eps.tolist() == pytest.approx(eps, rel=2e-5)
    for k, ref in zip(book.keys, keys, strict=True):
        assert k.tolist() == pytest.approx(ref)


def test_far_positions_untouched_and_matches_replaced():
    torch.manual_seed(0)
    book = Codebook(4, 3)
    key = torch.full((4,), 10.0)
    book.add_query(key, (1,), 0.5, torch.full((3,), 7.0))
    inputs = torch.randn(2, 5, 4)
    inputs[0, 2] = key + 0.1
    outputs = torch.randn(2, 5, 3)
    got = book.replace(inputs, outputs)
    for b in range(2):
        for t in range(5):
            want = torch.full((3,), 7.0) if (b, t) == (0, 2) else outputs[b, t]
            assert torch.equal(got[b, t], want)
    book.span = "following"
    got = book.replace(inputs, outputs)
    for b in range(2):
        for t in range(5):
            want = torch.full((3,), 7.0) if (b == 0 and t >= 2) else outputs[b, t]
            assert torch.equal(got[b, t], want)
    with book.disabled():
        assert torch.equal(book.replace(inputs, outputs), outputs)


def test_each_rule_exercised_on_a_line():
    # Keys on a line so that each SPEC 13 branch is hit in turn: new, growth (same label), halving (other label).
    qs = [torch.tensor([0.0, 0.0]), torch.tensor([1.5, 0.0]), torch.tensor([10.0, 0.0]), torch.tensor([11.0, 0.0])]
    labels = [(1,), (1,), (2,), (3,)]
    book = Codebook(2, 1)
    idx = [book.add_query(q, lab, 1.0, torch.zeros(1)) for q, lab in zip(qs, labels, strict=True)]
    keys, eps, labs = _plain_builder(qs, labels, 1.0)
    assert idx == [0, 0, 1, 2]
    assert eps == pytest.approx([1.5, 0.5, 0.5])
    assert book.eps.tolist() == pytest.approx(eps, rel=2e-5) and [book.label(i) for i in range(3)] == labs


@pytest.mark.parametrize(
    "field,value",
    [("init_eps", 0.0), ("lr", -1.0), ("steps", 0), ("span", "all"), ("value_init", "hot"), ("layer", -1),
     ("layer_fraction", 1.0), ("init_eps_factor", 0.0)],
)
def test_validate_names_field(field, value):
    with pytest.raises(ConfigError, match=f"grace.{field}"):
        GRACEConfig(**{field: value}).validate()


def test_layer_and_fraction_together_are_refused():
    with pytest.raises(ConfigError, match="only one of grace.layer"):
        GRACEConfig(layer=1, layer_fraction=0.5).validate()


# --- the sweep's settings -------------------------------------------------------------------------------------
def test_init_eps_factor_scales_the_median_nearest_neighbour_distance() -> None:
    module = GRACEEditor(ModelConfig(name="tiny-gpt2", precision="fp32"), grace=GRACEConfig(init_eps_factor=2.5))
    torch.manual_seed(1)
    queries = [torch.randn(6) for _ in range(5)]
    queries.append(queries[0].clone())  # a repeated prefix counts once
    distinct = [q.tolist() for q in queries[:5]]
    nearest = sorted(min(_pydist(a, b) for j, b in enumerate(distinct) if j != i) for i, a in enumerate(distinct))
    assert module._init_eps(queries) == pytest.approx(2.5 * nearest[2], rel=1e-6)
    with pytest.raises(ConfigError, match="set grace.init_eps instead"):
        module._init_eps([queries[0], queries[0]])


def test_last_third_fractions_give_the_last_third_layers() -> None:
    from editing.methods.grace.config import resolve_layer
    from editing.protocol.space import load_space

    (low, high), = [p.args for k, p in load_space("grace").items() if k.endswith("layer_fraction")]
    # depths that are multiples of 3 (GPT-2 small, SmolLM2, GPT-2 XL): every layer of the last third and no other
    for total in (12, 30, 48):
        grid = [low + (high - low) * j / 10000 for j in range(10001)]
        layers = {resolve_layer(GRACEConfig(layer_fraction=f), total) for f in grid}
        assert layers == set(range(2 * total // 3, total)), total
    assert resolve_layer(GRACEConfig(), 28) == 25  # the reference's GPT-J layer by default


# --- a sequence of edits grows one codebook ---------------------------------------------------------------------
def test_a_codebook_grown_over_a_sequence_equals_one_edit_of_all(tmp_path, data_root) -> None:
    settings = dict(layer=LAYER, value_init="warm", steps=2, lr=0.5, init_eps=3.0)
    base = ModelConfig(name="tiny-gpt2", precision="fp32")
    dm = TaskDataModule(task="country_capital", eval_limit=2, general_limit=2)
    first = GRACEEditor(base, grace=GRACEConfig(**settings))
    dm.attach(first.tokenizer, first.max_length)
    examples = dm.load("canonical").examples[:4]
    first.compute_edit(dm, examples=examples[:2], progress=False)
    folder = first.export_edit(tmp_path / "step1")
    second = GRACEEditor(base, grace=GRACEConfig(**settings))
    second.start_from_edit(folder)
    assert len(second.codebook) == len(first.codebook) and not second.p0_is_base
    second.compute_edit(dm, examples=examples[2:], progress=False)
    whole = GRACEEditor(base, grace=GRACEConfig(**settings))
    whole.compute_edit(dm, examples=examples, progress=False)
    for name in ("keys", "values", "eps", "labels"):
        assert torch.equal(getattr(second.codebook, name), getattr(whole.codebook, name)), name
    other = GRACEEditor(base, grace=GRACEConfig(**{**settings, "layer": LAYER + 1}))
    with pytest.raises(ConfigError, match=f"set grace.layer={LAYER}"):
        other.start_from_edit(folder)


# --- the saved edit: generation, merged export and combination ---------------------------------------------------
@pytest.mark.parametrize("span", ["position", "following"])
def test_generation_consults_the_codebook_at_each_new_position(span, tmp_path, data_root) -> None:
    from editing.edits.load import load_edited
    from editing.models.generation import continue_module

    module = GRACEEditor(ModelConfig(name="tiny-llama", precision="fp32"), grace=GRACEConfig(layer=LAYER, span=span))
    prompt, path = "The capital of France is", _path("tiny-llama", LAYER)
    ids = module.tokenizer(prompt)["input_ids"]
    base_text = continue_module(module, prompt, max_new_tokens=6)
    base_ids = module.tokenizer(prompt + base_text)["input_ids"]
    # a key at the second generated token's position: the codebook matters from the third new token on
    x, _ = _capture(module.model, path, base_ids[: len(ids) + 2])
    value = 30 * torch.randn(module.codebook.values.shape[1], generator=torch.Generator().manual_seed(0))
    module.codebook.set_entries(x[-1:], value[None], torch.tensor([1e-3]), torch.tensor([[5]]))
    applied = load_edited(module.export_edit(tmp_path / "edit"))
    got = continue_module(applied, prompt, max_new_tokens=6)

    book = RefBook()
    book.keys, book.values, book.eps, book.labels = [x[-1].double()], [value], [1e-3], [(5,)]
    new: list[int] = []
    with applied.reference() as base:
        handle = base.get_submodule(path).register_forward_hook(_replacing_hook(book, span))
        try:
            for _ in range(6):
                with torch.no_grad():
                    logits = base(input_ids=torch.tensor([ids + new])).logits[0, -1]
                token = int(torch.argmax(logits))
                if token == module.tokenizer.eos_token_id:
                    break
                new.append(token)
        finally:
            handle.remove()
    assert got == module.tokenizer.decode(new)
    assert got != base_text


def test_export_merged_and_combination_refuse_a_codebook(tmp_path, data_root) -> None:
    from editing.edits.combine import read_parts
    from editing.edits.export import export_merged

    module = GRACEEditor(ModelConfig(name="tiny-gpt2", precision="fp32"), grace=GRACEConfig(layer=LAYER))
    module.codebook.add_query(torch.ones(module.codebook.keys.shape[1]), (3,), 1.0,
                              torch.ones(module.codebook.values.shape[1]))
    one = module.export_edit(tmp_path / "one")
    module.codebook.add_query(-torch.ones(module.codebook.keys.shape[1]), (4,), 1.0,
                              torch.ones(module.codebook.values.shape[1]))
    two = module.export_edit(tmp_path / "two")
    with pytest.raises(ConfigError, match="not a change of the base model's weights"):
        export_merged(one, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    with pytest.raises(ConfigError, match="grace_codebook.*keys are the base model's activations"):
        read_parts([one, two])
    assert len(read_parts([one])) == 1  # alone it applies


def test_several_processes_and_a_backpack_are_refused(data_root) -> None:
    from types import SimpleNamespace

    module = GRACEEditor(ModelConfig(name="tiny-gpt2", precision="fp32"), grace=GRACEConfig(layer=LAYER))
    module.trainer = SimpleNamespace(world_size=2, datamodule=None)
    with pytest.raises(ConfigError, match="GRACE runs in one process.*--trainer.devices 1"):
        module.setup("fit")
    with pytest.raises(ConfigError, match="blocks of model type 'backpack-gpt2' are not located"):
        GRACEEditor(ModelConfig(name="tiny-backpack", precision="fp32"))
