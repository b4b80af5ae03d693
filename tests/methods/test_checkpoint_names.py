"""A checkpoint of a method whose deltas take their shape from the data (MEMIT's factors and ROME's and
AlphaEdit's, which share them; GRACE's codebook) is checked by the deltas' names: another layer's is refused with a
``ConfigError`` naming the setting to resume with; the same names pass whatever their shapes."""

from __future__ import annotations

import pytest
import torch

from editing.core.errors import ConfigError
from editing.methods import MEMITConfig, MEMITEditor
from editing.methods.grace import GRACEConfig, GRACEEditor
from editing.models.loading import ModelConfig

BASE = ModelConfig(name="tiny-llama", precision="fp32")


def _made(kind: str, layer: int):
    if kind == "memit":
        return MEMITEditor(BASE, MEMITConfig(layers=[layer])), "memit.layers"
    return GRACEEditor(BASE, grace=GRACEConfig(layer=layer)), "grace.layer"


@pytest.mark.parametrize("kind", ["memit", "grace"])
def test_only_the_names_of_data_shaped_deltas_are_checked(kind) -> None:
    module, setting = _made(kind, 1)
    other, _ = _made(kind, 2)
    names = sorted(module.trainable_parameters())
    grown = {"state_dict": {n: torch.zeros(7, 3) for n in names}}  # shapes of another request count: fine
    module._check_checkpoint_deltas(grown, "last.ckpt")
    foreign = {"state_dict": {n: torch.zeros(1) for n in other.trainable_parameters()}}
    assert set(foreign["state_dict"]) != set(names)
    with pytest.raises(ConfigError, match=rf"last\.ckpt holds .* resume with the {setting} it was made with"):
        module._check_checkpoint_deltas(foreign, "last.ckpt")
