"""AlphaEdit (SPEC section 12) on tiny models against a reference written here from SPEC: P = U0 U0^T from the
eigenvectors of C below the threshold, Delta^T = (P (K K^T + Kp Kp^T) + L2 I)^-1 P K R^T, so that the update leaves
the general corpus's keys outside P's range alone; for every loss type; a sequence step passes Kp on; a fit saves an
edit that ``load_edited`` reproduces, with the keys a later step needs."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from callbacks.degradation_budget import DegradationBudget
from editing.core.errors import ConfigError
from editing.data.batching import collate
from editing.data.datamodule import TaskDataModule
from editing.edits.load import load_edited
from editing.methods.alphaedit import AlphaEditConfig, AlphaEditEditor
from editing.methods.alphaedit.edit import read_sequence_keys
from editing.methods.memit.requests import RowBuilder
from editing.models.architecture import blocks, down_projection
from editing.models.loading import ModelConfig

FAMILIES = ("tiny-gpt2", "tiny-llama")
TASK_OF_LOSS = {"good": "country_capital", "bad": "stereoset", "balance": "pronoun_gender_bias",
                "good-v-bad": "verb_conjugation"}
FAST = {"covariance_samples": 1500, "context_templates": 1, "context_template_length": 4, "steps": 3, "l2": 0.5}
LAYER = 2


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Each test gets its own statistics and projector cache."""
    monkeypatch.setenv("EDITING_CACHE", str(tmp_path / "cache"))


def make(model: str, **kw) -> AlphaEditEditor:
    return AlphaEditEditor(ModelConfig(name=model, precision="fp32"),
                           AlphaEditConfig(**{"layers": [LAYER], **FAST, **kw}))


def datamodule(module: AlphaEditEditor, task: str) -> TaskDataModule:
    dm = TaskDataModule(task=task, eval_limit=6, general_limit=8)
    dm.attach(module.tokenizer, module.max_length)
    return dm


def at_position(module: AlphaEditEditor, ids: list[int], position: int, where: str) -> torch.Tensor:
    """One unpadded prompt's projection input (``key``) or block output (``output``) at ``position``."""
    seen = {}

    def key(_module, args) -> None:  # hooks return None: the forward pass stays as it was
        seen["x"] = args[0][0, position].detach().double()

    def output(_module, _args, out) -> None:
        seen["x"] = (out[0] if isinstance(out, tuple) else out)[0, position].detach().double()

    handle = (down_projection(module.model, LAYER).register_forward_pre_hook(key) if where == "key"
              else blocks(module.model)[LAYER].register_forward_hook(output))
    try:
        with torch.no_grad():
            module.model(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
        handle.remove()
    return seen["x"]


def corpus_keys(module: AlphaEditEditor, dm: TaskDataModule, texts: int = 6) -> torch.Tensor:
    """The projection's inputs at every real token of the first texts of the general set R (m, d_in)."""
    examples = dm.load("regularization").examples[:texts]
    batch = collate(examples, role="covariance", pad_id=dm.pad_id)
    seen = []

    def grab(_module, args) -> None:
        seen.append(args[0][batch["attention_mask"].bool()].detach().double())

    handle = down_projection(module.model, LAYER).register_forward_pre_hook(grab)
    try:
        with torch.no_grad():
            module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        handle.remove()
    return seen[0]


def spec_projector(moment: torch.Tensor, threshold: float) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(moment.double())
    kept = [j for j in range(len(values)) if values[j] < threshold]  # the null space's eigenvectors
    u0 = vectors[:, kept]
    return u0 @ u0.T


def median_threshold(module: AlphaEditEditor, dm: TaskDataModule) -> float:
    """A threshold keeping half of C's directions as the null space (the tiny models' eigenvalues are all below the
    reference's 2e-2, whose P would be the identity)."""
    moment = module.statistics(dm, progress=False).moments[LAYER]
    return float(torch.linalg.eigvalsh(moment).median())


def edit_with_spies(module: AlphaEditEditor, dm: TaskDataModule, requests: list, monkeypatch) -> dict:
    """Compute the edit; returns the targets z the method optimized and its float64 solve (u, v)."""
    import editing.methods.alphaedit.module as alpha_module
    import editing.methods.memit.module as memit_module

    found: dict = {}
    targets, solve = memit_module.optimize_targets, alpha_module.null_space_update

    def spy_targets(*args, **kwargs):
        found["z"] = targets(*args, **kwargs)
        return found["z"]

    def spy_solve(*args, **kwargs):
        found["solve"] = solve(*args, **kwargs)
        return found["solve"]

    monkeypatch.setattr(memit_module, "optimize_targets", spy_targets)
    monkeypatch.setattr(alpha_module, "null_space_update", spy_solve)
    module.compute_edit(dm, requests, progress=False)
    monkeypatch.setattr(memit_module, "optimize_targets", targets)
    monkeypatch.setattr(alpha_module, "null_space_update", solve)
    return found


def spec_update(module: AlphaEditEditor, requests: list, z: torch.Tensor, projector: torch.Tensor,
                previous: torch.Tensor | None, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC section 12 for one edited layer (the last, so R = z - current): the keys K (d_in, n) and Delta W."""
    builder = RowBuilder(module.tokenizer, module.max_length)
    templates = module.edit_diagnostics["templates"]
    columns, residuals = [], []
    with module.reference():
        for i, request in enumerate(requests):
            prompts = builder.rows([request], templates, with_suffixes=False)
            keys = [at_position(module, row.ids, row.subject_pos, "key") for row in prompts]
            columns.append(sum(keys) / len(keys))
            residuals.append(z[i].double() - at_position(module, prompts[0].ids, prompts[0].subject_pos, "output"))
    k, r = torch.stack(columns, 1), torch.stack(residuals, 1)  # (d_in, n), (d_out, n)
    gram = k @ k.T if previous is None else k @ k.T + previous.T @ previous
    system = projector @ gram + l2 * torch.eye(len(projector), dtype=torch.float64)
    delta_t = torch.linalg.solve(system, projector @ k @ r.T)  # (d_in, d_out)
    return k, delta_t.T


@pytest.mark.parametrize("loss", list(TASK_OF_LOSS))
@pytest.mark.parametrize("model", FAMILIES)
def test_update_is_specs_null_space_solve_and_spares_the_corpus_keys(data_root, model: str, loss: str,
                                                                     monkeypatch) -> None:
    module = make(model)
    dm = datamodule(module, TASK_OF_LOSS[loss])
    assert str(dm.task.loss) == loss
    module.memit_config.threshold = median_threshold(module, dm)
    requests = module.canonical_requests(dm)[:3]
    found = edit_with_spies(module, dm, requests, monkeypatch)
    moment = module.covariance_stats.moments[LAYER].double()
    projector = spec_projector(moment, module.memit_config.threshold)
    rank = round(float(projector.trace()))
    assert 0 < rank < len(projector)
    _, expected = spec_update(module, requests, found["z"], projector, None, module.memit_config.l2)
    assert expected.norm() > 0
    u, v = found["solve"]
    solved = u @ v
    # K and R here come from unpadded one-prompt passes, the method's from padded batches: float32 apart
    assert (solved - expected).norm() <= 1e-5 * expected.norm(), (solved - expected).norm() / expected.norm()
    stored = module.memit_u[str(LAYER)].double() @ module.memit_v[str(LAYER)].double()  # the hook's float32 factors
    assert (stored - expected).norm() <= 1e-5 * expected.norm()
    # the general corpus's keys: their component outside P's range (the directions R's keys occupy) is not moved,
    # to the solve's precision; their whole change stays within what their small P-component allows
    keys = corpus_keys(module, dm)
    outside = keys @ (torch.eye(len(projector), dtype=torch.float64) - projector)
    moved = outside @ solved.T
    assert moved.norm() <= 1e-9 * solved.norm() * outside.norm(), moved.norm() / (solved.norm() * outside.norm())
    assert (keys @ projector).pow(2).sum(1).mean() <= module.memit_config.threshold * rank
    # the same solve without P (P = I) moves them: the check above can tell
    _, free = spec_update(module, requests, found["z"], torch.eye(len(projector), dtype=torch.float64), None,
                          module.memit_config.l2)
    assert (outside @ free.T).norm() > 1e-3 * free.norm() * outside.norm()


def test_a_sequence_step_passes_kp_on(data_root, monkeypatch) -> None:
    module = make("tiny-llama")
    dm = datamodule(module, "country_capital")
    module.memit_config.threshold = median_threshold(module, dm)
    requests = module.canonical_requests(dm)
    edit_with_spies(module, dm, requests[:2], monkeypatch)
    first = module.sequence_keys()
    assert first[LAYER].shape == (2, module.memit_v[str(LAYER)].shape[1])
    module.set_previous_keys(first)
    found = edit_with_spies(module, dm, requests[2:4], monkeypatch)
    projector = spec_projector(module.covariance_stats.moments[LAYER], module.memit_config.threshold)
    k, expected = spec_update(module, requests[2:4], found["z"], projector, first[LAYER], module.memit_config.l2)
    u, v = found["solve"]
    assert ((u @ v) - expected).norm() <= 1e-5 * expected.norm()
    _, without = spec_update(module, requests[2:4], found["z"], projector, None, module.memit_config.l2)
    assert (without - expected).norm() > 1e-3 * expected.norm()  # Kp changes the solve
    # this step's keys follow the earlier ones (k here: from unpadded passes, float32 apart from the method's)
    chained = module.sequence_keys()[LAYER]
    assert torch.equal(chained[:2], first[LAYER])
    torch.testing.assert_close(chained[2:], k.T, rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match="alphaedit.layers"):
        module.set_previous_keys({0: first[LAYER]})


def test_bad_settings_name_the_field() -> None:
    with pytest.raises(ConfigError, match="alphaedit.threshold"):
        AlphaEditConfig(threshold=0).validate()
    with pytest.raises(ConfigError, match="alphaedit.l2"):
        AlphaEditConfig(l2=-1.0).validate()
    with pytest.raises(ConfigError, match="alphaedit.layers"):
        AlphaEditConfig(layers=[2, 1]).validate()


def test_fit_saves_an_edit_that_load_edited_reproduces_with_its_keys(tmp_path, data_root) -> None:
    L.seed_everything(0)
    module = make("tiny-gpt2", layers=[1, 2], threshold=1e-4)
    dm = TaskDataModule(task="country_capital", eval_limit=4, general_limit=4)
    budget = DegradationBudget(balls=[0.5], output_dir=str(tmp_path / "run"))
    L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
              use_distributed_sampler=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path),
              callbacks=[budget], enable_checkpointing=False).fit(module, dm)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["method"] == "alphaedit" and results["balls"]["5e-01"]["epoch"] == 1
    folder = results["edits"]["5e-01"]
    edited = load_edited(folder)
    edited.model.eval()
    ids = torch.tensor([module.tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        mine = module.model(input_ids=ids).logits
        theirs = edited.model(input_ids=ids).logits
        with module.reference():
            base = module.model(input_ids=ids).logits
    assert (mine - base).abs().max() > 1e-6  # the edit changes the logits
    torch.testing.assert_close(theirs, mine, atol=1e-5, rtol=1e-5)
    saved = read_sequence_keys(folder)
    assert sorted(saved) == [1, 2]
    for layer in (1, 2):
        assert torch.equal(saved[layer], module.edit_keys[layer])  # Kp of the next step: this edit's keys
