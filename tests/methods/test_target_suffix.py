"""The target optimization's suffix pass (``editing.methods.memit.suffix``) against a plain reference written here:
one unpadded forward pass of the whole model per row, delta added by a hook at the subject's last token, the final
hidden states read at the scored positions; and the whole optimization (MEMIT's z, ROME's v*) against the full
passes, for every loss type and family.

Why the optimization's tolerance is wider than one pass's: Adam's first step moves every coordinate by lr times the
sign of its gradient, so a coordinate whose gradient is at the rounding level can go either way, and 20 steps carry
that on. ``benchmarks/target_speed.py --unbatched`` measures it: the full passes' own result moves more than the
suffix pass's difference when only their batching changes (one row per pass instead of padded groups)."""

from __future__ import annotations

import pytest
import torch

from editing.data.datamodule import TaskDataModule
from editing.methods.memit import MEMITConfig, MEMITEditor, suffix
from editing.methods.memit import compute as memit_compute
from editing.methods.memit.layers import add_to_block_output, add_to_down_output, hooks
from editing.methods.memit.requests import RowBuilder, context_templates
from editing.models.loading import ModelConfig

FAMILIES = ("tiny-gpt2", "tiny-llama", "tiny-neox")
TASK_OF_LOSS = {"good": "country_capital", "bad": "stereoset", "balance": "pronoun_gender_bias",
                "good-v-bad": "verb_conjugation"}
LAYER = 2


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITING_CACHE", str(tmp_path / "cache"))


def setup(model: str, task: str, supervision: str = "standard", **kw):
    module = MEMITEditor(ModelConfig(name=model, precision="fp32"),
                         MEMITConfig(context_templates=2, context_template_length=4, supervision=supervision, **kw))
    module.model.eval()
    dm = TaskDataModule(task=task, eval_limit=6, general_limit=8)
    dm.attach(module.tokenizer, module.max_length)
    module.bind_task(dm.task)
    requests = module.canonical_requests(dm)[:4]
    templates = context_templates(module.model, module.tokenizer, 2, 4)
    builder = RowBuilder(module.tokenizer, module.max_length)
    return module, dm, builder.rows(requests, templates, with_suffixes=True), builder.kl_rows(requests), templates


def reference_hidden(module, row, vector: torch.Tensor, site: str, wanted: list[int]) -> torch.Tensor:
    """The LM head's input at positions ``wanted`` of one row alone (no padding, the whole model), with ``vector``
    added at the subject's last token at ``site``; differentiable in ``vector``."""
    seen = {}

    def add(hidden):
        bump = torch.zeros_like(hidden)
        bump[0, row.subject_pos] = vector
        return hidden + bump

    head = module.model.get_output_embeddings()
    grab = head.register_forward_pre_hook(lambda _m, args: seen.__setitem__("h", args[0]))
    where = add_to_down_output if site == "value" else add_to_block_output
    with hooks([where(module.model, LAYER, add), grab]):
        module.model(input_ids=torch.tensor([row.ids]), use_cache=False)
    return seen["h"][0, wanted]


@pytest.mark.parametrize("site", ["output", "value"])
@pytest.mark.parametrize("loss", list(TASK_OF_LOSS))
@pytest.mark.parametrize("model", FAMILIES)
def test_one_step_equals_a_plain_pass_per_row(data_root, model: str, loss: str, site: str) -> None:
    module, dm, rewrite, kl, _ = setup(model, TASK_OF_LOSS[loss])
    assert str(dm.task.loss) == loss
    torch.manual_seed(0)
    d = module.model.config.hidden_size
    groups = memit_compute._length_groups(rewrite, kl, module._pad_id, "cpu")
    for g in groups:
        prepared = suffix.prepare(module.model, g, LAYER, memit_compute._last_read(g))
        assert prepared is not None
        assert prepared["ids"].shape[1] < g["ids"].shape[1]  # fewer positions than the full rows
        delta = (torch.randn(4, d) * 0.5).requires_grad_(True)

        def inject(hidden, g=g, prepared=prepared, delta=delta):
            return hidden.index_put((prepared["row"], prepared["pos"]), delta[g["req"]], accumulate=True)

        where = add_to_down_output if site == "value" else add_to_block_output
        with hooks([where(module.model, LAYER, inject)]):
            hidden = suffix.step_hidden(module.model, prepared, LAYER)
        got = hidden[prepared["scored"]]
        k = g["kl_rows"]
        got_kl = hidden[k, 0]
        # the plain reference, row by row in the group's order (rewrite rows first, then KL rows)
        rows = [rewrite[i] for i in g["rewrite_at"].tolist()] + [kl[i] for i in g["kl_at"].tolist()]
        want, want_kl = [], []
        for j, row in enumerate(rows):
            vector = delta[row.request]
            if j < len(g["rewrite_at"]):
                want.append(reference_hidden(module, row, vector, site, list(range(row.score_from - 1,
                                                                                   len(row.ids) - 1))))
            else:
                want_kl.append(reference_hidden(module, row, vector, site, [row.subject_pos]))
        want, want_kl = torch.cat(want), torch.cat(want_kl)
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5 * want.abs().max().item())
        torch.testing.assert_close(got_kl, want_kl, rtol=0, atol=2e-5 * want_kl.abs().max().item())
        # the gradient of a random function of them w.r.t. delta (what Adam sees)
        weights, weights_kl = torch.randn_like(want), torch.randn_like(want_kl)
        (grad_got,) = torch.autograd.grad((got * weights).sum() + (got_kl * weights_kl).sum(), delta)
        (grad_want,) = torch.autograd.grad((want * weights).sum() + (want_kl * weights_kl).sum(), delta)
        assert grad_want.norm() > 0
        assert (grad_got - grad_want).norm() <= 1e-5 * grad_want.norm(), (grad_got - grad_want).norm()


@pytest.mark.parametrize("site", ["output", "value"])
@pytest.mark.parametrize("loss", list(TASK_OF_LOSS))
@pytest.mark.parametrize("model", FAMILIES)
def test_targets_equal_the_full_passes(data_root, model: str, loss: str, site: str) -> None:
    module, dm, rewrite, kl, templates = setup(model, TASK_OF_LOSS[loss], steps=4)
    out = {}
    for suffix_only in (False, True):
        trace: list[torch.Tensor] = []
        with torch.enable_grad():
            z = memit_compute.optimize_targets(module.model, rewrite, kl, 4, len(templates), LAYER, dm.task.loss,
                                               module.memit_config, module._pad_id, trace=trace, site=site,
                                               decay_power=2 if site == "value" else 1, suffix_only=suffix_only)
        out[suffix_only] = (z, torch.stack(trace))
    bare = [r for r in rewrite if r.template == 0 and r.slot == 0]
    h = memit_compute.subject_activations(module.model, bare, LAYER, site, module._pad_id)
    (z_full, trace_full), (z_fast, trace_fast) = out[False], out[True]
    change = z_full - h
    assert change.norm() > 1e-3 * h.norm()  # the targets really move
    assert (z_fast - z_full).norm() <= 1e-4 * change.norm(), ((z_fast - z_full).norm() / change.norm()).item()
    torch.testing.assert_close(trace_fast, trace_full, rtol=1e-5, atol=1e-5)


def test_oracle_subjects_inside_the_prompt(data_root) -> None:
    # the oracle subject ends before the prompt does: the suffix pass starts earlier in the row
    module, dm, rewrite, kl, templates = setup("tiny-llama", "country_capital", supervision="oracle", steps=4)
    assert any(r.subject_pos < r.score_from - 1 for r in rewrite)
    zs = [memit_compute.optimize_targets(module.model, rewrite, kl, 4, len(templates), LAYER, dm.task.loss,
                                         module.memit_config, module._pad_id, suffix_only=flag)
          for flag in (False, True)]
    bare = [r for r in rewrite if r.template == 0 and r.slot == 0]
    h = memit_compute.subject_activations(module.model, bare, LAYER, "output", module._pad_id)
    assert (zs[1] - zs[0]).norm() <= 1e-4 * (zs[0] - h).norm()
