"""Sequential editing (issue 38 item 4): ``editing fit --base_edit`` and ``editing sequence``.

Two 3-step sequences on tiny models (LoRA on tiny-gpt2, AlphaEdit on tiny-llama) are run once per module; every
number of their tables is recomputed here in plain loops (SPEC 3 and 5) from each step's saved ``edit.safetensors``
written by hand into a freshly loaded base model.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from editing.commands.lightning import run_lightning_cli
from editing.core.errors import ConfigError
from editing.protocol.sequence import SequenceSettings, run_sequence

REPO = Path(__file__).resolve().parents[2]
DATA = Path("/work/shared/data")
GOOD_THRESHOLD = -math.log(0.2)  # country_capital (SPEC 2)
LIMITS = {"eval_limit": 3, "general_limit": 4}


def _run(out: Path, config: str, fit_args: list[str]) -> list[dict]:
    settings = SequenceSettings(fit_config=[str(REPO / config)], task="country_capital", chunk_size=2, steps=3,
                                ball=0.5, fit_args=fit_args, **LIMITS)
    return run_sequence(settings, out, lambda args: run_lightning_cli("fit", args), say=lambda _: None)


@pytest.fixture(scope="module")
def lora_sequence(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora_sequence")
    _run(out, "lightning_configs/tiny/lora.yaml", ["--trainer.max_epochs", "1", "--model.init_args.optimizer.lr",
                                                   "0.05"])
    return out


@pytest.fixture(scope="module")
def alphaedit_sequence(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("alphaedit_sequence")
    _run(out, "lightning_configs/tiny/alphaedit.yaml", [])
    return out


@pytest.fixture(scope="module")
def rome_sequence(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rome_sequence")
    _run(out, "lightning_configs/tiny/rome.yaml", [])
    return out


# --- plain-loop references -------------------------------------------------------------------------------------
def _model_with(name: str, edit: Path | None):
    """A fresh base model with the edit's tensors copied in by name (no package loader; a LoRA adapter by peft)."""
    from editing.models.loading import ModelConfig, load_model

    loaded = load_model(ModelConfig(name=name, precision="fp32"))
    if edit is not None and (edit / "adapter_config.json").is_file():  # a first step's LoRA adapter
        from peft import PeftModel

        loaded.model = PeftModel.from_pretrained(loaded.model, str(edit)).merge_and_unload()
    elif edit is not None:
        params = dict(loaded.model.named_parameters())
        with torch.no_grad():
            for key, value in load_file(str(edit / "edit.safetensors")).items():
                params[key].copy_(value)
    loaded.model.eval()
    return loaded


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@torch.no_grad()
def _chunk_numbers(loaded, path: Path) -> tuple[float, float]:
    """Success rate and mean score of a chunk (good loss): score = sum of the suffix tokens' NLL."""
    scores = []
    for line in _lines(path):
        prefix = loaded.tokenizer(line["prefix"])["input_ids"]
        suffix = loaded.tokenizer(line["suffix"], add_special_tokens=False)["input_ids"]
        logits = loaded.model(torch.tensor([prefix + suffix])).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        score = 0.0
        for i, token in enumerate(suffix):
            score -= float(logp[len(prefix) - 1 + i, token])
        scores.append(score)
    success = sum(1 for s in scores if s <= GOOD_THRESHOLD) / len(scores)
    return success, sum(scores) / len(scores)


@torch.no_grad()
def _general_nll(loaded, limit: int) -> float:
    """Token-mean NLL over the first ``limit`` texts of G (GPT-2's tokenizer reads <|endoftext|> itself)."""
    total, count = 0.0, 0
    for line in _lines(DATA / "general" / "degradation.jsonl")[:limit]:
        ids = loaded.tokenizer(line["text"])["input_ids"]
        logp = torch.log_softmax(loaded.model(torch.tensor([ids])).logits[0].double(), dim=-1)
        for t in range(len(ids) - 1):
            total -= float(logp[t, ids[t + 1]])
            count += 1
    return total / count


def _state(out: Path) -> dict:
    return json.loads((out / "sequence.json").read_text())


def _results(out: Path, step: int) -> dict:
    return json.loads((out / f"step_{step:02d}" / "results.json").read_text())


# --- --base_edit: p0 stays the original ----------------------------------------------------------------------------
def test_base_edit_fit_measures_against_the_original_model(lora_sequence):
    """Step 2 fits on top of step 1's edit: its p0 (the balls' reference) is the original model's evaluation, the
    same numbers as step 1's epoch 0 (a fit without a base edit); its epoch 0 is step 1's edited model; its
    degradation equals a plain-loop general NLL of the cumulative model over the original's."""
    first, second = _results(lora_sequence, 1), _results(lora_sequence, 2)
    original = second["model"]["base_edit"]["original"]
    p0 = first["epochs"][0]
    for key in ("general_nll", "success_rate", "targeted_nll", "hard_negative_nll"):
        assert original[key] == pytest.approx(p0[key], rel=1e-9, abs=1e-12), key
    rows = {r["step"]: r for r in _state(lora_sequence)["rows"]}
    assert second["epochs"][0]["general_nll"] == pytest.approx(rows[1]["general_nll"], rel=1e-6)
    assert second["epochs"][0]["general_nll"] != pytest.approx(p0["general_nll"], rel=1e-9)  # it starts edited
    reference = _general_nll(_model_with("tiny-gpt2", None), LIMITS["general_limit"])
    assert original["general_nll"] == pytest.approx(reference, rel=1e-6)
    edit = lora_sequence / "step_02" / "edits" / "ball_5e-01"
    cumulative = _general_nll(_model_with("tiny-gpt2", edit), LIMITS["general_limit"])
    chosen = second["balls"]["5e-01"]
    assert chosen["metrics"]["degradation"] == pytest.approx(cumulative / reference - 1, rel=1e-3, abs=2e-7)
    steps = [str(lora_sequence / f"step_0{k}" / "edits" / "ball_5e-01") for k in (1, 2, 3)]
    for k in (2, 3):
        manifest = json.loads((Path(steps[k - 1]) / "edit_manifest.json").read_text())
        assert manifest["kind"] == "tensors" and manifest["method"] == "lora"
        assert [s["edit"] for s in manifest["sequence"]] == steps[: k - 1]


@pytest.mark.parametrize("which", ["lora", "rome", "alphaedit"])
def test_sequence_table_equals_each_saved_edit_reevaluated(which, request):
    """Every row of the table (success and mean score on chunks 1..k, general NLL, degradation vs the original)
    equals plain loops over the step's saved edit applied by hand to a fresh base model."""
    out = request.getfixturevalue(f"{which}_sequence")
    name = "tiny-llama" if which == "alphaedit" else "tiny-gpt2"
    rows = _state(out)["rows"]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for row in rows:
        edit = Path(row["edit"]) if row["edit"] else None
        loaded = _model_with(name, edit)
        chunks = range(1, 4) if row["step"] == 0 else range(1, row["step"] + 1)
        assert sorted(map(int, row["chunks"])) == list(chunks)
        for k in chunks:
            success, score = _chunk_numbers(loaded, out / "chunks" / f"chunk_{k:02d}.jsonl")
            assert row["chunks"][str(k)] == pytest.approx(success), (row["step"], k)
            assert row["chunk_scores"][str(k)] == pytest.approx(score, rel=1e-5), (row["step"], k)
        if name == "tiny-gpt2":
            assert row["general_nll"] == pytest.approx(_general_nll(loaded, LIMITS["general_limit"]), rel=1e-6)
        assert row["degradation"] == pytest.approx(row["general_nll"] / rows[0]["general_nll"] - 1, abs=1e-12)
        if row["step"]:
            assert row["degradation"] == pytest.approx(row["fit_degradation"], rel=1e-3, abs=2e-7)
    csv_lines = (out / "sequence.csv").read_text().splitlines()
    assert len(csv_lines) == 5 and csv_lines[0].startswith("step,epoch,success_rate,general_nll,degradation,chunk_1")
    assert (out / "sequence.png").stat().st_size > 1000


def test_alphaedit_keeps_its_preserved_keys_across_steps(alphaedit_sequence):
    """Step k's saved keys are the keys of steps 1..k (Kp grows by the chunk's requests), the earlier ones bit for
    bit, and step k's weights carry step k-1's (the cumulative edit)."""
    before = None
    for step in (1, 2, 3):
        edit = alphaedit_sequence / f"step_{step:02d}" / "edits" / "ball_5e-01"
        keys = load_file(str(edit / "alphaedit_keys.safetensors"))
        assert sorted(keys) == ["layer.1", "layer.2"]
        for name, k in keys.items():
            assert k.shape[0] == 2 * step, (step, name)
            if before is not None:
                assert torch.equal(k[: 2 * (step - 1)], before[name])
        before = keys


def test_sequence_resumes_without_redoing_a_step_and_refuses_other_settings(lora_sequence, tmp_path):
    """A finished sequence run again redoes nothing (no fit, same rows); other settings in its folder are refused;
    a step whose base edit changed since is refused."""
    rows = _state(lora_sequence)["rows"]

    def no_fit(args):
        raise AssertionError(f"a finished step was fitted again: {args}")

    settings = SequenceSettings(fit_config=[str(REPO / "lightning_configs/tiny/lora.yaml")], task="country_capital",
                                chunk_size=2, steps=3, ball=0.5,
                                fit_args=["--trainer.max_epochs", "1", "--model.init_args.optimizer.lr", "0.05"],
                                **LIMITS)
    assert run_sequence(settings, lora_sequence, no_fit, say=lambda _: None) == rows
    other = SequenceSettings(**{**settings.__dict__, "chunk_size": 3})
    with pytest.raises(ConfigError, match="chunk_size.*--overwrite true"):
        run_sequence(other, lora_sequence, no_fit, say=lambda _: None)
    copy = tmp_path / "copy"
    shutil.copytree(lora_sequence, copy)
    manifest = copy / "step_01" / "edits" / "ball_5e-01" / "edit_manifest.json"
    manifest.write_text(json.dumps(json.loads(manifest.read_text())))  # the same hashes, another file (re-exported)
    with pytest.raises(ConfigError, match="step 2 was fitted on top of .*has changed since"):
        run_sequence(settings, copy, no_fit, say=lambda _: None)


# --- bad --base_edit ---------------------------------------------------------------------------------------------
def _fit(tmp_path: Path, config: str, base_edit: Path) -> None:
    run_lightning_cli("fit", ["--config", str(REPO / config), "--budget.output_dir", str(tmp_path / "run"),
                              "--base_edit", str(base_edit)])


def test_bad_base_edit_is_refused_naming_the_field_and_the_fix(lora_sequence, tmp_path):
    edit = lora_sequence / "step_01" / "edits" / "ball_5e-01"
    with pytest.raises(ConfigError, match=r"--base_edit .*nowhere: no such folder; give the edit folder"):
        _fit(tmp_path, "lightning_configs/tiny/lora.yaml", tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"--base_edit .* was made on base model 'tiny-gpt2'.*tiny-llama.*"
                                          r"--model.init_args.base.name tiny-gpt2"):
        _fit(tmp_path, "lightning_configs/tiny/alphaedit.yaml", edit)
    tampered = tmp_path / "tampered"
    shutil.copytree(edit, tampered)
    manifest = json.loads((tampered / "edit_manifest.json").read_text())
    name = next(iter(manifest["files"]))
    manifest["files"][name]["sha256"] = "0" * 64
    (tampered / "edit_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"--base_edit .*do not match the hash recorded.*re-export"):
        _fit(tmp_path, "lightning_configs/tiny/lora.yaml", tampered)
    assert not (tmp_path / "run" / "results.json").exists()


def test_a_method_that_cannot_continue_and_a_changed_base_edit_on_resume_are_refused(lora_sequence):
    from editing.edits.base_edit import read_base_edit
    from editing.methods.base import EditingModule
    from editing.methods.lora import LoRAEditor
    from editing.models.loading import ModelConfig

    edit = lora_sequence / "step_01" / "edits" / "ball_5e-01"
    plain = EditingModule(ModelConfig(name="tiny-gpt2", precision="fp32"))
    with pytest.raises(ConfigError, match=r"--base_edit .*cannot continue a sequence.*without --base_edit"):
        plain.set_base_edit(read_base_edit(edit, plain))
    module = LoRAEditor(ModelConfig(name="tiny-gpt2", precision="fp32"))
    module.set_base_edit(read_base_edit(edit, module))
    checkpoint = {"base_identity": dict(module.identity), "hyper_parameters": {
        "method": "lora", "base_edit": {"edit": str(edit), "manifest_sha256": "f" * 64}}, "state_dict": {}}
    with pytest.raises(ConfigError, match=r"base edit differs or its folder changed.*--base_edit the checkpoint"):
        module.check_checkpoint(checkpoint)


def test_api_edit_takes_a_base_edit(lora_sequence, tmp_path):
    """``editing.api.edit(..., base_edit=DIR)`` fits on top of the edit, its balls around the original model."""
    from editing.api import edit

    base = lora_sequence / "step_01" / "edits" / "ball_5e-01"
    result = edit("tiny-gpt2", [{"prefix": "The capital of France is", "suffix": " Paris"}], method="lora", ball=0.5,
                  epochs=1, output_dir=tmp_path / "run", base_edit=base,
                  settings={"data.general_limit": LIMITS["general_limit"], "data.data_root": str(DATA)})
    record = result.run.model["base_edit"]
    assert record["edit"] == str(base)
    original = _results(lora_sequence, 1)["epochs"][0]["general_nll"]
    assert record["original"]["general_nll"] == pytest.approx(original, rel=1e-9)
    assert json.loads((result.edit_folder() / "edit_manifest.json").read_text())["sequence"][0]["edit"] == str(base)


@pytest.mark.parametrize("method", ["full", "lora", "rome"])
def test_a_module_on_a_base_edit_starts_edited_keeps_p0_and_saves_the_cumulative_edit(method, lora_sequence,
                                                                                      tmp_path):
    """Before any step: the module computes the base edit's model, its ``reference()`` the original model bit for
    bit, and its exported edit (nothing trained: the base edit itself) loads with ``load_edited`` alone to the same
    logits, whose ``reference()`` is the original again."""
    from editing.edits.base_edit import read_base_edit
    from editing.edits.load import load_edited
    from editing.methods.full import FullEditor
    from editing.methods.lora import LoRAEditor
    from editing.methods.rome import ROMEConfig, ROMEEditor
    from editing.models.loading import ModelConfig

    base = ModelConfig(name="tiny-gpt2", precision="fp32")
    module = {"full": lambda: FullEditor(base, layers=[1]), "lora": lambda: LoRAEditor(base),
              "rome": lambda: ROMEEditor(base, ROMEConfig(layer=2))}[method]()
    edit = lora_sequence / "step_02" / "edits" / "ball_5e-01"
    module.set_base_edit(read_base_edit(edit, module))
    ids = torch.tensor([[464, 3139, 286, 4881, 318, 6342, 13, 383]])

    def logits(model):
        with torch.no_grad():
            return model(input_ids=ids).logits.double()

    original = logits(_model_with("tiny-gpt2", None).model)
    edited = logits(_model_with("tiny-gpt2", edit).model)
    assert not torch.allclose(original, edited, atol=1e-9)
    assert torch.allclose(logits(module.model), edited, atol=1e-5)
    with module.reference() as p0:
        assert torch.equal(logits(p0), original)
    assert torch.allclose(logits(module.model), edited, atol=1e-5)  # the base edit is back after reference()
    saved = module.export_edit(tmp_path / "edit")
    again = load_edited(saved)
    assert torch.allclose(logits(again.model), edited, atol=1e-5)
    with again.reference() as p0:
        assert torch.equal(logits(p0), original)


@pytest.fixture(scope="module")
def grace_sequence(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("grace_sequence")
    _run(out, "lightning_configs/tiny/grace.yaml", [])
    return out


def test_grace_grows_one_codebook_across_the_sequence(grace_sequence, lora_sequence, tmp_path):
    """Step k's saved codebook holds step k-1's entries (their keys bit for bit) and this chunk's; its p0 is the
    original model (the same numbers as step 1's epoch 0); GRACE and the weight-change methods refuse each other's
    base edits, naming --base_edit and the fix."""
    previous = None
    for step in (1, 2, 3):
        book = load_file(str(grace_sequence / f"step_{step:02d}" / "edits" / "ball_5e-01" /
                             "grace_codebook.safetensors"))
        assert book["keys"].shape[0] == 2 * step
        if previous is not None:
            assert torch.equal(book["keys"][: previous["keys"].shape[0]], previous["keys"])
        previous = book
    for step in (2, 3):
        assert _results(grace_sequence, step)["model"]["base_edit"]["original"]["general_nll"] == pytest.approx(
            _results(grace_sequence, 1)["epochs"][0]["general_nll"], rel=1e-9)
    rows = _state(grace_sequence)["rows"]
    assert rows[0]["general_nll"] == pytest.approx(_general_nll(_model_with("tiny-gpt2", None), 4), rel=1e-6)
    codebook = grace_sequence / "step_01" / "edits" / "ball_5e-01"
    with pytest.raises(ConfigError, match=r"--base_edit .*'grace_codebook' edit of method 'grace'.*continue it with "
                                          r"a 'grace' fit"):
        _fit(tmp_path, "lightning_configs/tiny/lora.yaml", codebook)
    with pytest.raises(ConfigError, match=r"--base_edit .*a 'grace' fit continues only an edit of its own.*without "
                                          r"--base_edit"):
        _fit(tmp_path, "lightning_configs/tiny/grace.yaml", lora_sequence / "step_01" / "edits" / "ball_5e-01")
