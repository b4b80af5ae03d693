"""Bad input ends in a clear error, end to end: every case of ``bad_input_cases.CASES`` runs the ``editing`` command
and must exit non-zero, print no traceback, and name the file/line/setting and the fix. Plus the two safety
properties behind some of the cases: no checkpoint is ever unpickled with code, and an edit's tensors are checked
against the hashes recorded when it was saved."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from bad_input_cases import CASES, Case, build_artifacts, crafted_checkpoint, run_case, run_cases

from editing.core.errors import ConfigError
from editing.core.paths import PACKAGE_DIR

BY_NAME = {c.name: c for c in CASES}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, data_root):
    return build_artifacts(tmp_path_factory.mktemp("bad-input-artifacts"))


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, artifacts) -> dict:
    """Every case, run once (forked from a preloaded server, two at a time)."""
    root = tmp_path_factory.mktemp("bad-inputs")
    return {o.case.name: o for o in run_cases(root, CASES, workers=2, mode="fork", artifacts=artifacts)}


def _param(case: Case):
    marks = []
    if case.depends:
        # the validation is another branch's; strict, so that the mark goes once that branch is merged
        marks.append(pytest.mark.xfail(reason=f"depends on {case.depends}'s fix", strict=True))
    return pytest.param(case.name, id=case.name, marks=marks)


def test_the_table_covers_the_issue() -> None:
    names = set(BY_NAME)
    assert len(names) == len(CASES)  # unique names
    for required in ("jsonl_not_utf8", "task_yaml_not_utf8", "gguf_not_gguf", "gguf_truncated",
                     "negative_learning_rate", "lora_rank_zero", "edit_truncated", "edit_wrong_shape",
                     "edit_base_model_json_malformed", "edit_adapter_of_a_backpack", "edit_scaled_1000x",
                     "edit_with_nan", "storage_not_a_url", "storage_unreachable", "space_single_path_bad_yaml",
                     "space_bad_distribution", "select_unknown_study", "sweep_status_unknown_study",
                     "fit_resume_last_with_code", "fit_resume_from_corrupt_last"):
        assert required in names
    for kind in ("empty", "truncated", "random", "bit_flipped", "code_in"):
        assert f"fit_{kind}_checkpoint" in names and f"export_{kind}_checkpoint" in names


@pytest.mark.parametrize("name", [_param(c) for c in CASES])
def test_bad_input_ends_in_a_clear_error(outcomes, name: str) -> None:
    outcome = outcomes[name]
    if outcome.case.succeeds:  # damage the command survives: exit 0, correct results, the damage said
        assert outcome.kind == "correct", outcome.summary()
    else:
        assert outcome.kind == "clear", outcome.summary()
        assert outcome.returncode not in (0, None)
    assert "Traceback" not in outcome.stderr


@pytest.mark.parametrize("name", ["fit_code_in_checkpoint", "edit_scaled_1000x", "bad_precision"])
def test_cases_end_the_same_in_a_fresh_interpreter(tmp_path, artifacts, name: str) -> None:
    """The fork server saves imports only: ``python -m editing.cli`` gives the same clear error."""
    outcome = run_case(BY_NAME[name], tmp_path, artifacts, mode="subprocess")
    assert outcome.kind == "clear", outcome.summary()


# --- item 13: nothing is unpickled with code --------------------------------------------------------------------------
def test_no_code_path_unpickles_a_file() -> None:
    sources = {p: p.read_text() for p in PACKAGE_DIR.rglob("*.py")}
    for path, text in sources.items():
        for line in text.splitlines():  # saving the whole training state is not unpickling anything
            assert not re.search(r"weights_only\s*=\s*False", line) or "save_checkpoint(" in line, (path, line)
        assert not re.search(r"\bpickle\.loads?\(|\bdill\b|\bcloudpickle\b", text), path
        for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in call.group(1), (path, call.group(0))


def test_a_crafted_checkpoint_runs_no_code(tmp_path) -> None:
    from editing.models.backpack.distill import export_checkpoint
    from editing.runs.checkpoints import load_checkpoint_file

    marker = tmp_path / "MARKER"
    crafted_checkpoint(tmp_path / "crafted.ckpt", marker)
    with pytest.raises(ConfigError, match=r"crafted\.ckpt: it needs code to unpickle"):
        load_checkpoint_file(tmp_path / "crafted.ckpt")
    with pytest.raises(ConfigError, match="never runs code"):
        export_checkpoint(tmp_path / "crafted.ckpt", tmp_path / "model")
    assert not marker.exists() and not (tmp_path / "model").exists()


def test_our_checkpoints_load_without_code(artifacts) -> None:
    """What our fits write (hyperparameters included) loads with weights_only=True."""
    from editing.runs.checkpoints import load_checkpoint_file

    checkpoint = load_checkpoint_file(artifacts.checkpoint)
    assert checkpoint["hyper_parameters"]["lora"]["rank"] == 2
    assert checkpoint["state_dict"] and all("lora_" in k for k in checkpoint["state_dict"])
    assert torch.equal(next(iter(checkpoint["state_dict"].values())),
                       next(iter(torch.load(artifacts.checkpoint, weights_only=True)["state_dict"].values())))


# --- item 14: edits carry hashes of their tensors ---------------------------------------------------------------------
def _manifest(folder: Path) -> dict:
    return json.loads((folder / "edit_manifest.json").read_text())


def test_every_export_records_its_tensors(artifacts) -> None:
    from safetensors.torch import load_file

    for folder, files in ((artifacts.full_edit, {"edit.safetensors"}), (artifacts.lora_edit,
                                                                       {"adapter_model.safetensors"})):
        manifest = _manifest(folder)
        assert set(manifest["files"]) == files
        for name in files:
            tensors = load_file(str(folder / name))
            # the digest, computed here independently: names, dtypes, shapes and bytes in name order
            digest = hashlib.sha256()
            for key in sorted(tensors):
                t = tensors[key].contiguous()
                digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
                digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            assert manifest["files"][name] == {"sha256": digest.hexdigest(), "tensors": len(tensors)}
    assert set(_manifest(artifacts.lora_edit)["config_files"]) == {"adapter_config.json"}


def test_a_changed_edit_is_refused_and_the_intact_one_applies(tmp_path, artifacts) -> None:
    from safetensors.torch import load_file, save_file

    from editing.edits.load import load_edited

    edit = shutil.copytree(artifacts.full_edit, tmp_path / "edit")
    intact = load_edited(edit)
    tensors = load_file(str(edit / "edit.safetensors"))
    params = dict(intact.model.named_parameters())
    for name, value in tensors.items():
        assert torch.equal(params[name].detach(), value)
    save_file({k: v * 1000 for k, v in tensors.items()}, str(edit / "edit.safetensors"))
    with pytest.raises(ConfigError, match=r"edit\.safetensors: its tensors do not match the hash"):
        load_edited(edit)
    with pytest.raises(ConfigError, match="do not match the hash"):  # the flag is for edits without a manifest
        load_edited(edit, allow_unverified=True)


def test_an_edit_without_manifest_needs_the_flag_and_still_refuses_nan(tmp_path, artifacts, caplog) -> None:
    from safetensors.torch import load_file, save_file

    from editing.edits.load import load_edited

    edit = shutil.copytree(artifacts.full_edit, tmp_path / "edit")
    (edit / "edit_manifest.json").unlink()
    with pytest.raises(ConfigError, match="--allow_unverified true"):
        load_edited(edit)
    with caplog.at_level(logging.WARNING, logger="editing.runs.manifest"):
        module = load_edited(edit, allow_unverified=True)
    assert "NOT verified" in caplog.text and module.edit_kind == "tensors"
    tensors = load_file(str(edit / "edit.safetensors"))
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("inf")
    save_file(tensors, str(edit / "edit.safetensors"))
    with pytest.raises(ConfigError, match=rf"tensor '{re.escape(key)}' holds NaN or infinite"):
        load_edited(edit, allow_unverified=True)


def test_edit_digests_tell_edits_apart(artifacts) -> None:
    from editing.edits.load import load_edited

    full, lora = load_edited(artifacts.full_edit), load_edited(artifacts.lora_edit)
    assert len(full.identity["edit_sha256"]) == 64 and full.identity["edit_sha256"] != lora.identity["edit_sha256"]
    assert load_edited(artifacts.full_edit).identity["edit_sha256"] == full.identity["edit_sha256"]


# --- sweeps ---------------------------------------------------------------------------------------------------------
def test_space_takes_one_path_or_a_list(tmp_path) -> None:
    from editing.core.paths import SPACE_DIR
    from editing.protocol.sweep import make_definition

    path = str(SPACE_DIR / "lora.yaml")
    one = make_definition("country_capital", "lora", "tiny-gpt2", space=path)
    assert one.space == make_definition("country_capital", "lora", "tiny-gpt2", space=[path]).space
    assert "model.init_args.lora.rank" in one.space
