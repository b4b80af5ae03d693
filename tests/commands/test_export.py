"""A merged model to ship (issue 36, item 3): ``editing export --edit DIR --merged OUT`` and ``EditResult.export``
write a transformers folder that plain ``AutoModelForCausalLM.from_pretrained`` loads, in a process where importing
``editing`` is impossible, with the logits of ``load_edited(DIR)``; edits that are not weight changes are refused."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from edit_kinds import make_edit, make_module

from editing.api import EditResult
from editing.cli import main
from editing.core.errors import ConfigError
from editing.core.files import ResultsExistError
from editing.edits.export import export_merged
from editing.edits.load import load_edited

TEXTS = ["The capital of France is Paris, and", "Water boils at 100 degrees"]

# per weight-change method and tiny base: what make_module changes (full: one MLP matrix; MEMIT: one layer)
CASES = {
    ("lora", "tiny-llama"): {},
    ("lora", "tiny-gpt2"): {},
    ("full", "tiny-llama"): {"tensors": ("model.layers.1.mlp.up_proj.weight",), "scale": 0.05},
    ("full", "tiny-gpt2"): {"tensors": ("transformer.h.1.mlp.c_fc.weight",), "scale": 0.05},
    ("memit", "tiny-llama"): {"layers": (1,), "scale": 0.05},
    ("memit", "tiny-gpt2"): {"layers": (1,), "scale": 0.05},
}

# run with `python -I` (no PYTHONPATH, no current folder on sys.path), and any import of `editing` fails: the folder
# must load with transformers alone
PLAIN = textwrap.dedent('''
    import importlib.abc, json, sys
    class NoEditing(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "editing" or name.startswith("editing."):
                raise ImportError("the exported folder needs canonical-editing: " + name)
    sys.meta_path.insert(0, NoEditing())
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    jobs = json.loads(sys.argv[1])
    for folder, out in jobs:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        texts = json.loads(sys.argv[2])
        ids = [tokenizer(t)["input_ids"] for t in texts]
        with torch.no_grad():
            logits = {f"logits{i}": model(torch.tensor([x])).logits[0].contiguous() for i, x in enumerate(ids)}
        save_file({**logits, **{f"ids{i}": torch.tensor(x) for i, x in enumerate(ids)}}, out,
                  metadata={"dtype": str(next(model.parameters()).dtype), "class": type(model).__module__})
    assert not any(m == "editing" or m.startswith("editing.") for m in sys.modules)
''')


def _plain_logits(jobs: list[tuple[Path, Path]]) -> None:
    proc = subprocess.run([sys.executable, "-I", "-c", PLAIN, json.dumps([[str(a), str(b)] for a, b in jobs]),
                           json.dumps(TEXTS)], capture_output=True, text=True, timeout=600,
                          env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                               "HOME": str(jobs[0][1].parent)},
                          cwd=jobs[0][1].parent)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """Every case made, exported, and read back by plain transformers in one subprocess."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for (kind, model), kwargs in CASES.items():
        name = f"{kind}-{model}"
        edit = make_edit(kind, root / f"edit-{name}", model=model, **kwargs)
        folder = export_merged(edit, root / f"merged-{name}")
        out[(kind, model)] = (edit, folder, root / f"plain-{name}.safetensors")
    _plain_logits([(folder, logits) for _, folder, logits in out.values()])
    return out


@pytest.mark.parametrize("case", list(CASES), ids=lambda c: f"{c[0]}-{c[1]}")
def test_merged_folder_loads_with_plain_transformers_and_computes_the_edit(exported, case):
    from safetensors import safe_open
    from safetensors.torch import load_file

    edit, folder, plain = exported[case]
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json"} <= names
    assert not {n for n in names if n.endswith((".bin", ".pt", ".ckpt"))}
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    got = load_file(str(plain))
    module = load_edited(edit)
    tok = module.loaded.tokenizer
    for i, text in enumerate(TEXTS):
        ids = tok(text)["input_ids"]
        assert got[f"ids{i}"].tolist() == ids  # the shipped tokenizer tokenizes as the package's
        with torch.no_grad():
            want = module.model(torch.tensor([ids])).logits[0].float()
            with module.reference() as base:
                unedited = base(torch.tensor([ids])).logits[0].float()
        assert (unedited - want).abs().max() > 1e-3, "the edit changes nothing: the test could not fail"
        assert (got[f"logits{i}"] - want).abs().max().item() <= 1e-5


def test_senses_edit_is_refused_with_the_reason(tmp_path, data_root):
    edit = make_edit("senses", tmp_path / "senses", data_root=data_root)
    with pytest.raises(ConfigError, match=r"method 'senses' .*not a change of the base model's weights.*load_edited"):
        export_merged(edit, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_backpack_base_is_refused_even_for_a_weight_change(tmp_path):
    edit = make_edit("full", tmp_path / "full", model="tiny-backpack", scale=0.05, tensors=_first_backpack_tensor())
    with pytest.raises(ConfigError, match=r"architecture .* is this package's own"):
        export_merged(edit, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _first_backpack_tensor() -> tuple[str, ...]:
    from editing.methods.full import FullEditor
    from editing.models.loading import ModelConfig

    module = FullEditor(ModelConfig(name="tiny-backpack"), gradient_checkpointing=False)
    return (next(n for n, p in module.model.named_parameters() if p.dim() == 2),)


def test_an_existing_folder_is_never_overwritten_silently(tmp_path):
    edit = make_edit("full", tmp_path / "edit", model="tiny-gpt2", **CASES[("full", "tiny-gpt2")])
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ResultsExistError, match="already exists"):
        export_merged(edit, out)
    assert (out / "keep.txt").read_text() == "mine"
    export_merged(edit, out, overwrite=True)
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]  # no staging folder left behind


def test_command_and_result_export(tmp_path, capsys):
    edit = make_edit("lora", tmp_path / "edit", model="tiny-gpt2")
    main(["export", "--edit", str(edit), "--merged", str(tmp_path / "cli")])
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    with pytest.raises(SystemExit) as stop:
        main(["export", "--edit", str(edit), "--merged", str(tmp_path / "cli")])
    assert stop.value.code == 2 and "--overwrite true" in capsys.readouterr().err
    main(["export", "--edit", str(edit), "--merged", str(tmp_path / "cli"), "--overwrite", "true"])
    run = SimpleNamespace(edits={"1e-04": str(edit)})
    result = EditResult(run, tmp_path, "1e-04", None)  # type: ignore[arg-type]
    api = result.export(tmp_path / "api")
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "cli" / "model.safetensors")), load_file(str(api / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads((api / "canonical_editing_export.json").read_text())
    assert record["kind"] == "lora" and record["method"] == "lora" and record["base"] == "tiny-gpt2"


def test_a_run_folder_names_its_edits(tmp_path):
    (tmp_path / "run" / "edits" / "ball_1e-04").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"is a run folder, not an edit; pass one of its edits: .*ball_1e-04"):
        export_merged(tmp_path / "run", tmp_path / "out")


def test_merging_is_a_capability_a_method_registers(tmp_path, monkeypatch):
    """Not a list of names: a method registered with the changed-tensors kind but no ``merge_edit`` is refused, and
    with one it is exported."""
    from dataclasses import replace

    import editing.methods.registry as registry

    module = make_module("full", model="tiny-gpt2", **CASES[("full", "tiny-gpt2")])
    edit = module.export_edit(tmp_path / "edit")
    spec = registry.METHODS[module.method]
    monkeypatch.setitem(registry._METHODS, module.method, replace(spec, merge_edit=None))
    with pytest.raises(ConfigError, match="not a change of the base model's weights"):
        export_merged(edit, tmp_path / "out")
    calls = []
    monkeypatch.setitem(registry._METHODS, module.method,
                        replace(spec, merge_edit=lambda applied: calls.append(1) or applied.model))
    export_merged(edit, tmp_path / "out")
    assert calls == [1] and (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.slow
def test_the_embedded_gguf_base_exports_fp32_weights(tmp_path):
    """The embedded SmolLM2 is a Q4_1 GGUF: the folder holds its dequantized weights in fp32 (no quantization config),
    computing what the loaded edit computes."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    edit = make_edit("lora", tmp_path / "edit", model="smollm2-135m", scale=0.1)
    out = export_merged(edit, tmp_path / "merged")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config.get("dtype", config.get("torch_dtype")) == "float32"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    module = load_edited(edit)
    ids = torch.tensor([module.loaded.tokenizer(TEXTS[0])["input_ids"]])
    plain = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        want, got = module.model(ids).logits[0], plain(ids).logits[0]
        with module.reference() as base:
            assert (base(ids).logits[0] - want).abs().max() > 1e-3
    # x (W + s B A) and x W + s (x A) B round differently in fp32: over 30 layers, logits of size ~15 differ by about
    # 2e-5 (measured), so the bound here is 1e-5 relative to the logits' size (the tiny models meet 1e-5 absolute)
    assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())


def test_every_method_of_a_weight_change_kind_registers_its_merge():
    """A method added later (ROME, AlphaEdit, ...) that saves changed tensors or a LoRA adapter is a weight change:
    it must opt in by registering ``merge_edit``, or `editing export` would refuse its edits."""
    import editing.methods  # noqa: F401 - registers every method of the package
    from editing.methods.lora.edit import load_lora_edit
    from editing.methods.registry import METHODS
    from editing.methods.tensor_edit import load_tensor_edit

    weight_changes = [spec for spec in METHODS.values() if spec.load_edit in (load_tensor_edit, load_lora_edit)]
    assert {s.name.value for s in weight_changes} >= {"full", "lora", "memit"}
    missing = [s.name.value for s in weight_changes if s.merge_edit is None]
    assert missing == [], (f"methods {missing} save a weight change but register no merge_edit: pass "
                           "merge_edit=merge_tensor_edit (editing.methods.tensor_edit) to register(MethodSpec(...))")
