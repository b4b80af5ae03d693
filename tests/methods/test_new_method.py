"""A new editing method is added from outside the package, the documented way, with nothing else edited: a package
with its module, its edit writer and loader and one ``register`` call, and a fit config naming its class. The test
writes such a package (a trainable shift of the final hidden state) into a temporary folder, fits it with
``editing fit`` on a tiny model, and applies the saved edit with ``load_edited``, which dispatches on the edit's
recorded kind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from editing.data.datamodule import TaskDataModule
from editing.evaluation import evaluate

PACKAGE = "toy_hidden_shift"

# --- the files a new method consists of ---------------------------------------------------------------------------
MODULE = '''
"""The LightningModule: one trainable vector added to the final hidden state (the LM head's input); p0 is the shift
off."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn

from editing.methods.base import EditingModule, OptimizerConfig, RegularizationConfig
from editing.models.loading import ModelConfig


@dataclass
class ShiftConfig:
    """The method's own settings."""

    scale: float = 1.0
    """The shift is multiplied by this before it is added."""


class ShiftEditor(EditingModule):
    """Edit by adding a trained vector to the final hidden state at every position."""

    def __init__(self, base: ModelConfig | None = None, shift: ShiftConfig | None = None,
                 optimizer: OptimizerConfig | None = None, regularization: RegularizationConfig | None = None) -> None:
        self.shift_config = shift or ShiftConfig()
        super().__init__(base=base, optimizer=optimizer, regularization=regularization)
        self.hparams["shift"] = asdict(self.shift_config)

    def _prepare_deltas(self) -> None:
        self.model.requires_grad_(False)
        head = self.model.get_output_embeddings()
        self.shift = nn.Parameter(torch.zeros(head.weight.shape[1]))
        self.shift_on = True
        head.register_forward_pre_hook(self._add_shift)

    def _add_shift(self, _module, args):
        if not self.shift_on:
            return None
        return (args[0] + (self.shift_config.scale * self.shift).to(args[0].dtype),) + tuple(args[1:])

    @contextmanager
    def reference(self) -> Iterator[nn.Module]:
        self.shift_on = False
        try:
            yield self.model
        finally:
            self.shift_on = True
'''

EDIT = '''
"""The edit writer and loader: the scaled shift, saved under the file name that changed-tensors edits use too (only
the kind recorded in the edit's manifest tells them apart)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from editing.core.errors import ConfigError
from editing.methods.registry import AppliedEdit

KIND = "hidden-shift"
FILE = "edit.safetensors"


def write_edit(module, folder: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    from safetensors.torch import save_file

    shift = (state if state is not None else module.delta_state())["shift"]
    save_file({"shift": (module.shift_config.scale * shift).float().contiguous()}, str(folder / FILE))


class AppliedShift(AppliedEdit):
    def __init__(self, model: nn.Module, shift: torch.Tensor) -> None:
        super().__init__(model)
        self.shift, self.on = shift, True
        model.get_output_embeddings().register_forward_pre_hook(self._add)

    def _add(self, _module, args):
        if not self.on:
            return None
        return (args[0] + self.shift.to(args[0].device, args[0].dtype),) + tuple(args[1:])

    @contextmanager
    def reference(self) -> Iterator[nn.Module]:
        self.on = False
        try:
            yield self.model
        finally:
            self.on = True


def load_edit(model: nn.Module, folder: Path, tensors: dict, base_name: str) -> AppliedShift:
    shift = tensors.get(FILE, {}).get("shift")
    if shift is None or tuple(shift.shape) != (model.get_output_embeddings().weight.shape[1],):
        raise ConfigError(f"{folder}: no shift of {base_name!r}'s hidden size")
    return AppliedShift(model, shift)
'''

INIT = '''
"""A toy editing method: a trainable shift of the final hidden state."""

from editing.methods.registry import MethodSpec, register
from toy_hidden_shift.edit import KIND, load_edit, write_edit
from toy_hidden_shift.module import ShiftConfig, ShiftEditor

register(MethodSpec("hidden-shift", ShiftEditor, ShiftConfig, edit_kind=KIND, write_edit=write_edit,
                    load_edit=load_edit))
'''

CONFIG = f'''
model:
  class_path: {PACKAGE}.ShiftEditor
  init_args:
    base:
      name: tiny-gpt2
      precision: fp32
    shift:
      scale: 2.0
    optimizer:
      lr: 0.05
data:
  task: stereoset
  eval_limit: 6
  general_limit: 6
trainer:
  max_epochs: 2
  limit_train_batches: 3
  accelerator: cpu
  enable_progress_bar: false
  enable_model_summary: false
budget:
  balls: [0.9]
  output_dir: run
'''


def write_method(root: Path) -> Path:
    """The method's package (three files) and its fit config, written into ``root``."""
    package = root / PACKAGE
    package.mkdir()
    for name, text in (("__init__.py", INIT), ("module.py", MODULE), ("edit.py", EDIT)):
        (package / name).write_text(textwrap.dedent(text).lstrip())
    (root / "hidden_shift.yaml").write_text(textwrap.dedent(CONFIG).lstrip())
    return root / "hidden_shift.yaml"


@pytest.fixture
def toy_method(tmp_path, monkeypatch):
    """Write the package, put its folder on ``sys.path``, and unregister it afterwards."""
    config = write_method(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield config
    from editing.methods.registry import METHODS, unregister

    if "hidden-shift" in {m.value for m in METHODS}:
        unregister("hidden-shift")
    for name in [m for m in sys.modules if m == PACKAGE or m.startswith(f"{PACKAGE}.")]:
        del sys.modules[name]


def test_a_method_from_a_package_of_ones_own_fits_and_its_edit_loads_by_kind(toy_method, data_root) -> None:
    root = toy_method.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "editing.cli", "fit", "--config", str(toy_method)], cwd=root,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((root / "run" / "results.json").read_text())
    assert results["method"] == "hidden-shift" and results["status"] == "finished"
    assert results["hyperparameters"]["shift"] == {"scale": 2.0}
    assert [e["epoch"] for e in results["epochs"]] == [0, 1, 2]
    assert results["epochs"][2]["general_nll"] != results["epochs"][0]["general_nll"]  # it trained
    ball = results["balls"]["9e-01"]
    assert ball["epoch"] == 2  # every epoch stays inside the wide ball: the last is chosen, and its edit saved
    folder = root / results["edits"]["9e-01"]  # relative to the folder the fit ran in
    manifest = json.loads((folder / "edit_manifest.json").read_text())
    assert (manifest["kind"], manifest["method"]) == ("hidden-shift", "hidden-shift")
    assert (folder / "edit.safetensors").is_file()  # what sniffing by file names would take for changed tensors

    # in this process: importing the package registers the method; the edit loads with the package's loader
    import toy_hidden_shift  # noqa: F401

    from editing.core.types import MethodName
    from editing.edits.load import load_edited
    from editing.methods.registry import method_spec

    assert method_spec("hidden-shift").module.__module__ == f"{PACKAGE}.module"
    assert MethodName("hidden-shift").value == "hidden-shift"
    edited = load_edited(folder)
    assert edited.edit_kind == "hidden-shift"
    dm = TaskDataModule(task="stereoset", eval_limit=6, general_limit=6)
    got = evaluate(edited, dm)
    for name in ("success_rate", "general_nll", "targeted_nll", "hard_negative_nll"):
        assert got[name] == pytest.approx(ball["metrics"][name], rel=1e-6, abs=1e-9), name
    with edited.reference():  # p0: the shift off, as at epoch 0 of the fit
        base = evaluate(edited, dm)
    for name in ("success_rate", "general_nll"):
        assert base[name] == pytest.approx(results["epochs"][0][name], rel=1e-6, abs=1e-9), name
    with torch.no_grad():
        assert edited.applied.shift.abs().max() > 0
