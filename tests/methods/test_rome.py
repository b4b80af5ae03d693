"""ROME (SPEC section 11) on tiny models against a reference written here from SPEC: per request, in order,
Delta W = (v* - W k0) u^T / (u^T k0) with u = C^-1 k*, W the projection as already edited by the earlier requests,
so that (W + Delta W) k0 = v*; for every loss type; a fit saves an edit that ``load_edited`` reproduces."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from torch import nn

from callbacks.degradation_budget import DegradationBudget
from editing.core.errors import ConfigError
from editing.data.datamodule import TaskDataModule
from editing.edits.load import load_edited
from editing.methods.memit.requests import RowBuilder
from editing.methods.rome import ROMEConfig, ROMEEditor
from editing.models.architecture import down_projection
from editing.models.loading import ModelConfig

FAMILIES = ("tiny-gpt2", "tiny-llama")
TASK_OF_LOSS = {"good": "country_capital", "bad": "stereoset", "balance": "pronoun_gender_bias",
                "good-v-bad": "verb_conjugation"}
FAST = {"covariance_samples": 1500, "context_templates": 1, "context_template_length": 4, "steps": 3}
LAYER = 2


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Each test gets its own statistics cache."""
    monkeypatch.setenv("EDITING_CACHE", str(tmp_path / "cache"))


def make(model: str, **kw) -> ROMEEditor:
    return ROMEEditor(ModelConfig(name=model, precision="fp32"), ROMEConfig(**{"layer": LAYER, **FAST, **kw}))


def datamodule(module: ROMEEditor, task: str) -> TaskDataModule:
    dm = TaskDataModule(task=task, eval_limit=6, general_limit=8)
    dm.attach(module.tokenizer, module.max_length)
    return dm


def base_weight(module: ROMEEditor) -> tuple[torch.Tensor, torch.Tensor]:
    """The unedited projection's W (out, in) and bias, float64 (GPT-2's Conv1D stores W transposed)."""
    projection = down_projection(module.model, LAYER)
    weight = projection.weight.detach().double()
    weight = weight if isinstance(projection, nn.Linear) else weight.T
    bias = projection.bias.detach().double() if projection.bias is not None else torch.zeros(weight.shape[0])
    return weight, bias


def key_at(module: ROMEEditor, ids: list[int], position: int) -> torch.Tensor:
    """The projection's input at ``position`` of one unpadded prompt (a plain forward pass and a hook)."""
    seen = {}

    def grab(_module, args) -> None:  # returns None: the input stays as it was
        seen["k"] = args[0][0, position].detach().double()

    handle = down_projection(module.model, LAYER).register_forward_pre_hook(grab)
    try:
        with torch.no_grad():
            module.model(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
        handle.remove()
    return seen["k"]


def value_at(module: ROMEEditor, ids: list[int], position: int) -> torch.Tensor:
    """The projection's output (with the edit's hook) at ``position`` of one unpadded prompt."""
    seen = {}

    def grab(_module, _args, out) -> None:  # returns None: the output stays as it was
        seen["v"] = out[0, position].detach().double()

    handle = down_projection(module.model, LAYER).register_forward_hook(grab)
    try:
        with torch.no_grad():
            module.model(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
        handle.remove()
    return seen["v"]


def edit_with_spy(module: ROMEEditor, dm: TaskDataModule, count: int, monkeypatch) -> tuple[list, list[torch.Tensor]]:
    """Compute the edit for the first ``count`` requests; returns them and the v* the method optimized for each."""
    import editing.methods.rome.module as rome_module

    original, targets = rome_module.optimize_targets, []

    def spy(*args, **kwargs):
        targets.append(original(*args, **kwargs)[0].detach().double())
        return targets[-1][None]

    monkeypatch.setattr(rome_module, "optimize_targets", spy)
    requests = module.canonical_requests(dm)[:count]
    module.compute_edit(dm, requests, progress=False)
    monkeypatch.setattr(rome_module, "optimize_targets", original)
    return requests, targets


def check_against_spec(module: ROMEEditor, requests: list, targets: list[torch.Tensor], moment: torch.Tensor) -> None:
    """SPEC section 11, request by request, with the module's factors as the edit so far."""
    weight, bias = base_weight(module)
    columns = module.memit_u[str(LAYER)].detach().double().clone()
    rows = module.memit_v[str(LAYER)].detach().double().clone()
    assert columns.shape[1] == rows.shape[0] == len(requests)  # one rank-one update per request
    builder = RowBuilder(module.tokenizer, module.max_length)
    templates = module.edit_diagnostics["templates"]
    assert len(templates) == 2 and templates[0] == ""
    for i, request in enumerate(requests):
        prompts = builder.rows([request], templates, with_suffixes=False)
        keys = [key_at(module, row.ids, row.subject_pos) for row in prompts]
        k_star = sum(keys) / len(keys)  # averaged over the templates
        k0 = keys[0]  # the bare prompt's
        assert (k_star - k0).norm() > 1e-6 * k0.norm()  # the two keys differ, so using one for the other shows
        w_now = weight + columns[:, :i] @ rows[:i]  # W as edited by the earlier requests
        v_star = targets[i]
        v_now = w_now @ k0 + bias
        assert (v_star - v_now).norm() > 1e-4 * v_now.norm()  # the value really moves
        u = torch.linalg.solve(moment, k_star)
        expected = torch.outer(v_star - v_now, u) / (u @ k0)
        got = torch.outer(columns[:, i], rows[i])
        assert (got - expected).norm() <= 1e-5 * expected.norm(), (i, (got - expected).norm() / expected.norm())
        reached = (w_now + got) @ k0 + bias
        assert (reached - v_star).norm() <= 1e-6 * v_star.norm(), (i, (reached - v_star).norm() / v_star.norm())
        # the model itself, with the first i + 1 updates on its hook, outputs v* at the bare prompt's subject
        module.memit_u[str(LAYER)].data = columns[:, : i + 1].float()
        module.memit_v[str(LAYER)].data = rows[: i + 1].float()
        bare = prompts[0]
        seen = value_at(module, bare.ids, bare.subject_pos)
        torch.testing.assert_close(seen, v_star, atol=1e-5 * v_star.norm().item(), rtol=0)
    module.memit_u[str(LAYER)].data, module.memit_v[str(LAYER)].data = columns.float(), rows.float()


@pytest.mark.parametrize("loss", list(TASK_OF_LOSS))
@pytest.mark.parametrize("model", FAMILIES)
def test_each_update_is_specs_rank_one_formula_on_the_model_as_edited(data_root, model: str, loss: str,
                                                                      monkeypatch) -> None:
    module = make(model)
    dm = datamodule(module, TASK_OF_LOSS[loss])
    assert str(dm.task.loss) == loss
    requests, targets = edit_with_spy(module, dm, 3, monkeypatch)
    assert len(targets) == 3
    moment = module.covariance_stats.moments[LAYER].double()
    assert not torch.equal(moment, torch.eye(len(moment), dtype=moment.dtype))  # C from R's statistics
    check_against_spec(module, requests, targets, moment)


@pytest.mark.parametrize("model", FAMILIES)
def test_without_statistics_u_is_the_key_itself(data_root, model: str, monkeypatch) -> None:
    module = make(model, use_statistics=False)
    dm = datamodule(module, "country_capital")
    requests, targets = edit_with_spy(module, dm, 2, monkeypatch)
    check_against_spec(module, requests, targets, torch.eye(module.memit_v[str(LAYER)].shape[1], dtype=torch.float64))


def test_layer_settings_and_bad_values(data_root) -> None:
    assert make("tiny-gpt2", layer=None, layer_fraction=0.5).memit_layers == [2]  # floor(0.5 * 4)
    assert make("tiny-gpt2", layer=None, layer_fraction=0.3).memit_layers == [1]
    with pytest.raises(ConfigError, match=r"rome\.layer=9.*4 layers"):
        make("tiny-gpt2", layer=9)
    with pytest.raises(ConfigError, match="set only one of rome.layer"):
        ROMEConfig(layer=1, layer_fraction=0.5).validate()
    with pytest.raises(ConfigError, match="rome.v_weight_decay"):
        ROMEConfig(v_weight_decay=-1).validate()
    with pytest.raises(ConfigError, match="rome.layer_fraction"):
        ROMEConfig(layer_fraction=1.5).validate()


def test_middle_third_fractions_give_the_middle_third_layers() -> None:
    # the sweep's U(0.33334, 0.66666) on layer_fraction: every layer of the middle third and no other, for depths
    # that are multiples of 3 (SmolLM2, GPT-2 small and XL)
    from editing.methods.rome.config import resolve_layer
    from editing.protocol.space import load_space

    (low, high), = [p.args for k, p in load_space("rome").items() if k.endswith("layer_fraction")]
    for total in (12, 30, 48):
        grid = [low + (high - low) * j / 10000 for j in range(10001)]
        layers = {resolve_layer(ROMEConfig(layer_fraction=f), "llama", total) for f in grid}
        assert layers == set(range(total // 3, 2 * total // 3)), total


def test_fit_saves_an_edit_that_load_edited_reproduces(tmp_path, data_root) -> None:
    L.seed_everything(0)
    module = make("tiny-llama")
    dm = TaskDataModule(task="country_capital", eval_limit=4, general_limit=4)
    budget = DegradationBudget(balls=[0.5], output_dir=str(tmp_path / "run"))
    L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
              use_distributed_sampler=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path),
              callbacks=[budget], enable_checkpointing=False).fit(module, dm)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["method"] == "rome" and results["balls"]["5e-01"]["epoch"] == 1
    edited = load_edited(results["edits"]["5e-01"])
    edited.model.eval()
    ids = torch.tensor([module.tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        mine = module.model(input_ids=ids).logits
        theirs = edited.model(input_ids=ids).logits
        with module.reference():
            base = module.model(input_ids=ids).logits
    assert (mine - base).abs().max() > 1e-4  # the edit changes the logits
    torch.testing.assert_close(theirs, mine, atol=1e-5, rtol=1e-5)
