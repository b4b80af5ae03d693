"""Every editing method is registered in one place with its parts, under the name it reports in results; a saved edit
is loaded by the kind recorded in its manifest, never by the files its folder happens to hold."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

import editing.methods as methods
from editing.core.errors import ConfigError
from editing.core.types import MethodName
from editing.methods import (
    FullEditor,
    FullFinetune,
    LoRAConfig,
    LoRAEditor,
    MEMITConfig,
    MEMITEditor,
    SenseFinetune,
    SensesConfig,
    SensesEditor,
)
from editing.methods.base import EditingModule
from editing.methods.registry import METHODS, MethodSpec, get_method, method_spec, register
from editing.models.loading import ModelConfig


def test_the_four_methods_are_registered_with_their_parts() -> None:
    expected = {
        MethodName.FULL: (FullEditor, None, "tensors"),
        MethodName.LORA: (LoRAEditor, LoRAConfig, "lora"),
        MethodName.SENSES: (SensesEditor, SensesConfig, "senses"),
        MethodName.MEMIT: (MEMITEditor, MEMITConfig, "tensors"),
    }
    builtin = {name: spec for name, spec in METHODS.items() if name in expected}
    assert set(builtin) == set(expected)
    for name, (module, config, kind) in expected.items():
        spec = method_spec(name)
        assert (spec.name, spec.module, spec.config, spec.edit_kind) == (name, module, config, kind)
        assert isinstance(spec.name, MethodName) and module.method is name and get_method(name.value) is module
        assert callable(spec.write_edit) and callable(spec.load_edit)
        # each method's writer and loader live in its own sub-package (or the shared changed-tensors format)
        assert spec.write_edit.__module__ == f"editing.methods.{name.value}.edit"
        assert spec.load_edit.__module__ in (f"editing.methods.{name.value}.edit", "editing.methods.tensor_edit")
    # full finetuning and MEMIT write one format and load it with one loader
    assert method_spec("full").load_edit is method_spec("memit").load_edit
    assert EditingModule.method is MethodName.NONE and MethodName.NONE not in METHODS


def test_every_exported_method_class_is_registered_and_the_old_names_still_work() -> None:
    exported = {getattr(methods, n) for n in methods.__all__}
    classes = {c for c in exported if isinstance(c, type) and issubclass(c, EditingModule) and c is not EditingModule}
    registered = {spec.module for spec in METHODS.values()}
    assert classes - registered == {FullFinetune, SenseFinetune}
    assert issubclass(FullFinetune, FullEditor) and FullFinetune.method is MethodName.FULL
    assert issubclass(SenseFinetune, SensesEditor) and SenseFinetune.method is MethodName.SENSES


def test_unknown_method_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="unknown method 'nosuch'"):
        get_method("nosuch")
    with pytest.raises(ConfigError, match="has no registered class"):
        get_method("none")


def test_a_second_class_under_a_name_or_a_second_loader_for_a_kind_is_refused() -> None:
    lora = method_spec("lora")

    class Impostor(LoRAEditor):
        pass

    with pytest.raises(ConfigError, match="'lora' is registered already"):
        register(MethodSpec("lora", Impostor, LoRAConfig, "lora", lora.write_edit, lora.load_edit))
    with pytest.raises(ConfigError, match="another loader for edit kind 'tensors'"):
        register(MethodSpec("impostor", Impostor, None, "tensors", lora.write_edit, lora.load_edit))
    with pytest.raises(ConfigError, match="not an EditingModule subclass"):
        register(MethodSpec("impostor", dict, None, "impostor", lora.write_edit, lora.load_edit))
    assert method_spec("lora").module is LoRAEditor and "impostor" not in {m.value for m in METHODS}


# --- edits are loaded by their recorded kind ----------------------------------------------------------------------
def _manifest(folder) -> dict:
    return json.loads((folder / "edit_manifest.json").read_text())


@pytest.fixture(scope="module")
def edits(tmp_path_factory):
    """A LoRA edit and a full-finetuning edit of tiny-gpt2 whose deltas are not zero."""
    root = tmp_path_factory.mktemp("edits")
    torch.manual_seed(0)
    lora = LoRAEditor(ModelConfig(name="tiny-gpt2", precision="fp32"), lora=LoRAConfig(rank=2))
    with torch.no_grad():
        for p in lora.trainable_parameters().values():
            p.normal_(std=0.5)
    full = FullEditor(ModelConfig(name="tiny-gpt2", precision="fp32"), gradient_checkpointing=False)
    with torch.no_grad():
        full.model.transformer.h[1].mlp.c_fc.weight.mul_(1.5)
    return {"lora": lora.export_edit(root / "lora"), "full": full.export_edit(root / "full"), "root": root,
            "full_module": full}


def test_every_export_records_its_kind_and_method(edits, tmp_path) -> None:
    assert (_manifest(edits["lora"])["kind"], _manifest(edits["lora"])["method"]) == ("lora", "lora")
    assert (_manifest(edits["full"])["kind"], _manifest(edits["full"])["method"]) == ("tensors", "full")
    memit = MEMITEditor(ModelConfig(name="tiny-gpt2", precision="fp32"), memit=MEMITConfig(layers=[1]))
    folder = memit.export_edit(tmp_path / "memit")
    assert (_manifest(folder)["kind"], _manifest(folder)["method"]) == ("tensors", "memit")


def test_an_edit_whose_files_would_be_read_as_another_kind_loads_by_its_recorded_kind(edits, tmp_path) -> None:
    from editing.edits.load import load_edited

    # a full-finetuning edit exported into a folder that held a LoRA edit before: the stale adapter files are still
    # there (and listed in the manifest, so verification passes), and a loader that sniffs for adapter_config.json
    # first would apply the old adapter instead of the new tensors
    folder = shutil.copytree(edits["lora"], tmp_path / "reused")
    edits["full_module"].export_edit(folder)
    assert (folder / "adapter_config.json").is_file() and (folder / "edit.safetensors").is_file()
    loaded = load_edited(folder)
    assert loaded.edit_kind == "tensors"
    want = edits["full_module"].model.transformer.h[1].mlp.c_fc.weight
    assert torch.equal(loaded.model.transformer.h[1].mlp.c_fc.weight, want)
    assert not any("lora" in name for name, _ in loaded.model.named_parameters())
    p0 = edits["full_module"]._p0[0].transformer.h[1].mlp.c_fc.weight
    with loaded.reference() as base:  # p0: the changed tensor swapped back to the base value
        assert torch.equal(base.transformer.h[1].mlp.c_fc.weight, p0) and not torch.equal(p0, want)
    assert torch.equal(loaded.model.transformer.h[1].mlp.c_fc.weight, want)


def test_a_manifest_without_kind_is_refused_unless_unverified_is_allowed(edits, tmp_path, caplog) -> None:
    from editing.edits.load import load_edited

    folder = shutil.copytree(edits["full"], tmp_path / "old")
    manifest = _manifest(folder)
    del manifest["kind"], manifest["method"]
    (folder / "edit_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"does not record the edit's kind.*--allow_unverified true"):
        load_edited(folder)
    with caplog.at_level(logging.WARNING, logger="editing.edits.load"):
        module = load_edited(folder, allow_unverified=True)
    assert module.edit_kind == "tensors" and "guessed from its file names" in caplog.text


def test_an_edit_of_an_unregistered_kind_names_the_kind_and_the_fix(edits, tmp_path) -> None:
    from editing.edits.load import load_edited
    from editing.runs.manifest import write_edit_manifest

    folder = shutil.copytree(edits["full"], tmp_path / "other")
    write_edit_manifest(folder, kind="rome-deltas", method="rome")
    with pytest.raises(ConfigError, match=r"kind 'rome-deltas' \(made by method 'rome'\).*import the package"):
        load_edited(folder)


def test_rewriting_a_manifest_keeps_the_recorded_kind(edits, tmp_path) -> None:
    from editing.runs.manifest import write_edit_manifest

    folder = shutil.copytree(edits["lora"], tmp_path / "rehashed")
    write_edit_manifest(folder)
    assert (_manifest(folder)["kind"], _manifest(folder)["method"]) == ("lora", "lora")
