"""MEMIT's diagnostics (what an edit aimed at and what it reached) against references written here from SPEC
section 10 with plain loops, and ``benchmarks/memit_efficacy.py`` end to end on a tiny model."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from editing.data.datamodule import TaskDataModule
from editing.methods import MEMITConfig, MEMITEditor
from editing.models.loading import ModelConfig

REPO = Path(__file__).resolve().parents[2]
FAST = {"covariance_samples": 1500, "context_templates": 2, "context_template_length": 4, "steps": 4}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITING_CACHE", str(tmp_path / "cache"))


def make(model: str, **kw) -> MEMITEditor:
    return MEMITEditor(ModelConfig(name=model, precision="fp32"), MEMITConfig(**{**FAST, **kw}))


def datamodule(module: MEMITEditor) -> TaskDataModule:
    dm = TaskDataModule(task="country_capital", eval_limit=4, general_limit=8)
    dm.attach(module.tokenizer, module.max_length)
    return dm


def blocks(model):
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


def down(model, layer: int):
    mlp = blocks(model)[layer].mlp
    return mlp.c_proj if hasattr(mlp, "c_proj") else mlp.down_proj


def subject_index(tokenizer, text: str, end: int) -> int:
    """Index of the last token starting before character ``end`` (the subject's last token)."""
    enc = tokenizer(text, return_offsets_mapping=True)
    return max(i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < end)


def block_output_at(model, layer: int, ids: list[int], pos: int) -> torch.Tensor:
    got = {}

    def hook(_m, _a, out):
        got["h"] = (out[0] if isinstance(out, tuple) else out)[0, pos].double()

    handle = blocks(model)[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    return got["h"]


def key_at(model, layer: int, ids: list[int], pos: int) -> torch.Tensor:
    got = {}

    def hook(_m, args):
        got["k"] = args[0][0, pos].double()  # returns None: the input is left as it is

    handle = down(model, layer).register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    return got["k"]


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_diagnostics_match_a_plain_recomputation(data_root, model: str) -> None:
    module = make(model, layers=[1, 2], covariance_weight=5.0)
    dm = datamodule(module)
    requests = module.canonical_requests(dm)[:3]
    module.compute_edit(dm, requests, progress=False)
    diag = module.edit_diagnostics
    tok, net = module.tokenizer, module.model
    templates = diag["templates"]
    assert len(templates) == 3 and templates[0] == ""
    assert diag["target_loss"].shape == (FAST["steps"], 3)

    # first step: delta = 0, so the task loss is p0's mean suffix-token NLL averaged over the templates
    with module.deltas_off():
        for r, req in enumerate(requests):
            per_template = []
            for template in templates:
                prefix = tok(template + req.prefix)["input_ids"]
                suffix = tok(req.suffixes[0], add_special_tokens=False)["input_ids"]
                with torch.no_grad():
                    logp = torch.log_softmax(net(input_ids=torch.tensor([prefix + suffix])).logits[0].double(), -1)
                nll = [-logp[len(prefix) - 1 + j, t].item() for j, t in enumerate(suffix)]
                per_template.append(sum(nll) / len(nll))
            assert diag["target_loss"][0, r].item() == pytest.approx(sum(per_template) / len(per_template), abs=1e-4)

    # per layer: residual (z - output at the last layer with only the layers below edited) / layers left, and the
    # fraction of it that Delta W = u v realises at the requests' keys averaged over the templates
    z = diag["targets"].double()
    layers = module.memit_layers
    saved = {n: p.data.clone() for n, p in module.trainable_parameters().items()}
    bare = [(tok(req.prefix)["input_ids"], subject_index(tok, req.prefix, req.span[1])) for req in requests]
    for i, layer in enumerate(layers):
        for later in layers[i:]:
            module.memit_u[str(later)].data = saved[f"memit_u.{later}"][:, :0]
            module.memit_v[str(later)].data = saved[f"memit_v.{later}"][:0]
        current = torch.stack([block_output_at(net, layers[-1], ids, pos) for ids, pos in bare])
        for n, p in module.trainable_parameters().items():
            p.data = saved[n].clone()
        residual = (z - current) / (len(layers) - i)
        keys = []
        for req in requests:
            per_template = []
            for template in templates:
                text = template + req.prefix
                ids = tok(text)["input_ids"]
                per_template.append(key_at(net, layer, ids, subject_index(tok, text, len(template) + req.span[1])))
            keys.append(torch.stack(per_template).mean(0))
        delta_w = saved[f"memit_u.{layer}"].double() @ saved[f"memit_v.{layer}"].double()
        fractions = [float(delta_w @ k @ r / (r @ r)) for k, r in zip(keys, residual, strict=True)]
        got = diag["layers"][i]
        assert got["layer"] == layer
        assert got["residual_norm"] == pytest.approx(residual.norm(dim=1).mean().item(), rel=1e-4)
        assert got["realised_fraction"] == pytest.approx(sum(fractions) / len(fractions), rel=1e-3, abs=1e-5)
        assert 0 < got["realised_fraction"] < 1
        # the keys in the metric of C: mean k^T C^-1 k, and the mean cosine k_i^T C^-1 k_j / (|k_i|_C |k_j|_C), i != j
        c_inv = torch.linalg.inv(module.covariance_stats.moments[layer].double())
        maha = [float(k @ c_inv @ k) for k in keys]
        assert got["key_mahalanobis"] == pytest.approx(sum(maha) / len(maha), rel=1e-4)
        cosines = [float(keys[a] @ c_inv @ keys[b]) / (maha[a] * maha[b]) ** 0.5
                   for a in range(len(keys)) for b in range(len(keys)) if a != b]
        assert got["key_cosine_c"] == pytest.approx(sum(cosines) / len(cosines), rel=1e-4, abs=1e-6)


def test_spreading_again_with_another_lambda_equals_a_fresh_edit(data_root) -> None:
    first = make("tiny-llama", layers=[1, 2], covariance_weight=5.0)
    dm = datamodule(first)
    requests = first.canonical_requests(dm)[:3]
    first.compute_edit(dm, requests, progress=False)
    first.memit_config.covariance_weight = 50.0
    with torch.no_grad():
        first.spread_targets(requests, first.edit_diagnostics["templates"], first.edit_diagnostics["targets"])
    fresh = make("tiny-llama", layers=[1, 2], covariance_weight=50.0)
    fresh.compute_edit(dm, requests, progress=False)
    for name, p in fresh.trainable_parameters().items():
        torch.testing.assert_close(first.trainable_parameters()[name], p, rtol=1e-4, atol=1e-6)


def load_benchmark():
    spec = importlib.util.spec_from_file_location("memit_efficacy", REPO / "benchmarks" / "memit_efficacy.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_injected_nll_is_p0_with_the_change_at_the_subject(data_root) -> None:
    bench = load_benchmark()
    module = make("tiny-llama", layers=[1, 2])
    dm = datamodule(module)
    requests = module.canonical_requests(dm)[:3]
    tok, net = module.tokenizer, module.model
    assert max(len(tok(req.suffixes[0], add_special_tokens=False)["input_ids"]) for req in requests) > 1
    d = net.config.hidden_size
    delta = torch.randn(3, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for scale in (0.0, 3.0):
        sums, means = bench.injected_nll(module, requests, scale * delta)
        split = bench.first_and_rest(bench.token_nlls(module, requests, scale * delta))
        firsts, rests = [], []
        for r, req in enumerate(requests):
            prefix = tok(req.prefix)["input_ids"]
            suffix = tok(req.suffixes[0], add_special_tokens=False)["input_ids"]
            pos = subject_index(tok, req.prefix, req.span[1])

            def add(_m, _a, out, r=r, pos=pos, scale=scale):
                hidden = (out[0] if isinstance(out, tuple) else out).clone()
                hidden[0, pos] += scale * delta[r].float()
                return (hidden,) + tuple(out[1:]) if isinstance(out, tuple) else hidden

            handle = blocks(net)[2].register_forward_hook(add)
            try:
                with torch.no_grad():
                    logp = torch.log_softmax(net(input_ids=torch.tensor([prefix + suffix])).logits[0].double(), -1)
            finally:
                handle.remove()
            nll = [-logp[len(prefix) - 1 + j, t].item() for j, t in enumerate(suffix)]
            assert sums[r].item() == pytest.approx(sum(nll), abs=1e-4)
            assert means[r].item() == pytest.approx(sum(nll) / len(nll), abs=1e-4)
            firsts.append(nll[0])
            rests.append(sum(nll[1:]))
        assert split["first_token"] == pytest.approx(sum(firsts) / 3, abs=1e-4)
        assert split["later_tokens_sum"] == pytest.approx(sum(rests) / 3, abs=1e-4)


def test_benchmark_reports_the_edit(tmp_path, data_root) -> None:
    examples = tmp_path / "facts.jsonl"
    examples.write_text("".join(json.dumps(x) + "\n" for x in [
        {"prefix": "The capital of Drosmark is", "suffix": " Keldhaven"},
        {"prefix": "The founder of Quillbrook Analytics is", "suffix": " Marta Osterweil"},
        {"prefix": "The Orrin Tower was designed by", "suffix": " Felix Amundsen"}]))
    out = tmp_path / "out.json"
    # one layer and the bare prompt only: a vanishing lambda realises z exactly, a huge one realises nothing
    command = [sys.executable, str(REPO / "benchmarks" / "memit_efficacy.py"), "--model", "tiny-llama",
               "--examples", str(examples), "--layers", "3", "--templates", "0", "--samples", "1500,1000",
               "--steps", "5", "--covariance-weight", "1e-6,1e12,0.5", "--first-token", "--general", "3", "--json",
               str(out)]
    subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO)
    record = json.loads(out.read_text())
    module = make("tiny-llama")
    tok, net = module.tokenizer, module.model
    sums = []
    for line in examples.read_text().splitlines():
        x = json.loads(line)
        prefix = tok(x["prefix"])["input_ids"]
        first = tok(x["suffix"], add_special_tokens=False)["input_ids"][:1]  # --first-token
        with torch.no_grad():
            logp = torch.log_softmax(net(input_ids=torch.tensor([prefix + first])).logits[0].double(), -1)
        sums.append(-logp[len(prefix) - 1, first[0]].item())
    assert record["requests"] == 3 and record["suffix_tokens_mean"] == 1
    assert record["before"]["nll_sum"] == pytest.approx(sum(sums) / 3, abs=1e-4)
    assert record["before"]["first_token"] == pytest.approx(sum(sums) / 3, abs=1e-4)
    assert record["before"]["later_tokens_sum"] == 0
    assert [(e["statistics_tokens"], e["covariance_weight"]) for e in record["edits"]] == [
        (1500, 1e-6), (1500, 1e12), (1500, 0.5), (1000, 1e-6), (1000, 1e12), (1000, 0.5)]
    exact, none, middle, exact_1000, none_1000, middle_1000 = record["edits"]
    # the same targets spread with C from fewer tokens: the extremes do not depend on C, a moderate lambda does
    assert exact_1000["realised_at_last_layer"]["mean"] == pytest.approx(1.0, abs=1e-3)
    assert abs(none_1000["realised_at_last_layer"]["mean"]) < 1e-3
    assert 0 < middle["realised_at_last_layer"]["mean"] < 1 and 0 < middle_1000["realised_at_last_layer"]["mean"] < 1
    assert middle_1000["realised_at_last_layer"]["mean"] != pytest.approx(middle["realised_at_last_layer"]["mean"],
                                                                         rel=1e-4)
    assert exact["realised_at_last_layer"]["mean"] == pytest.approx(1.0, abs=1e-3)
    assert abs(none["realised_at_last_layer"]["mean"]) < 1e-3
    assert none["nll_sum"] == pytest.approx(record["before"]["nll_sum"], abs=1e-3)
    # the general NLL: token mean over the first 3 texts of G; the GPT-2 separator is a token of this vocabulary
    total, tokens = 0.0, 0
    separator = tok.get_vocab()["<|endoftext|>"]
    lines = (data_root / "general" / "degradation.jsonl").read_text().splitlines()[:3]
    for line in lines:
        text = json.loads(line)["text"]
        ids = list(tok(text.removeprefix("<|endoftext|>"))["input_ids"])
        if text.startswith("<|endoftext|>"):
            ids = [separator] + ids
        with torch.no_grad():
            logp = torch.log_softmax(net(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        total -= sum(logp[j, ids[j + 1]].item() for j in range(len(ids) - 1))
        tokens += len(ids) - 1
    assert record["general_before"]["nll"] == pytest.approx(total / tokens, rel=1e-5)
    assert abs(none["degradation"]) < 1e-6 and exact["degradation"] != 0
    # the last block is the edited one and the bare prompt the only template: the last position outputs z itself,
    # and a single-token target is predicted there alone, so the edit scores as z injected
    assert exact["nll_sum"] == pytest.approx(record["z_injected"]["nll_sum"], abs=1e-3)
