"""The one place editing methods are registered: per method its name, LightningModule class, settings class, and how
its edit is written and loaded.

Each method sub-package registers itself, with one call in its ``__init__.py``::

    register(MethodSpec(MethodName.LORA, LoRAEditor, LoRAConfig, edit_kind="lora", write_edit=write_lora_edit,
                        load_edit=load_lora_edit, merge_edit=merge_lora_edit))

A method whose edit is a weight change passes ``merge_edit`` (``editing export --merged`` then writes the edit merged
into the base model as a plain transformers folder); a method of changed tensors passes
``editing.methods.tensor_edit.merge_tensor_edit``.

``editing.methods`` imports every sub-package of ``editing/methods/`` (``import_method_packages``), so a method added
there is registered with no other edit; a method in a package of one's own is registered when that package is
imported (a config's ``class_path`` does it). Registering sets the class's ``method`` (the name it reports in results
and checkpoints) and declares a new name in ``editing.core.types.MethodName``.

Every saved edit records its ``kind`` in ``edit_manifest.json`` (``EditingModule.export_edit`` writes it), and
``editing.edits.load.load_edited`` applies it with the loader registered for that kind. Several methods may write one
kind (full finetuning and MEMIT both save changed tensors, ``editing.methods.tensor_edit``) if they register the same
loader for it.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

import torch
from torch import nn

from editing.core.errors import ConfigError
from editing.core.types import MethodName

if TYPE_CHECKING:
    from editing.methods.base import EditingModule


class AppliedEdit:
    """A saved edit applied onto a model: the edited model, and how to compute p0 (the unedited model) from it.

    Loaders return it (a subclass whose ``reference`` takes the edit off again when the edit is not a separate
    model, e.g. a LoRA adapter disabled or changed tensors swapped back).

    Args:
        model: the edited model (the base model itself, or a wrapper around it such as a peft model).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @contextmanager
    def reference(self) -> Iterator[nn.Module]:
        """A context in which the yielded model computes p0."""
        yield self.model


EditWriter = Callable[["EditingModule", Path, dict[str, torch.Tensor] | None], None]
"""``write_edit(module, folder, state)``: write the tensor files of the edit whose deltas are ``state`` (None: the
module's current deltas) into the existing ``folder``; ``export_edit`` adds the base identity and the manifest."""

EditLoader = Callable[[nn.Module, Path, dict[str, dict[str, torch.Tensor]], str], AppliedEdit]
"""``load_edit(model, folder, tensors, base_name)``: apply the edit in ``folder`` (its tensor files already read and
verified: file name -> tensors) onto ``model``, a fresh copy of the base model named ``base_name``; raise
``ConfigError`` for an edit that does not fit the model."""


def edit_file(folder: Path, tensors: dict[str, dict[str, torch.Tensor]], name: str) -> dict[str, torch.Tensor]:
    """The tensors of the edit's file ``name`` among those ``load_edited`` read and verified (for loaders).

    Raises:
        ConfigError: the folder lacks the file.
    """
    if name not in tensors:
        raise ConfigError(f"{folder}: the edit's tensor file ({name}) is missing; re-export the edit")
    return tensors[name]


EditMerger = Callable[[AppliedEdit], nn.Module]
"""``merge_edit(applied)``: the base model's own architecture with the edit written into its weights, from the edit as
its loader applied it (``editing export --merged`` saves it as a plain transformers folder)."""


@dataclass(frozen=True)
class MethodSpec:
    """What a method provides to the package.

    The sweep's search space (``lightning_configs/sweeps/<name>.yaml``) and a fit config naming ``module`` as
    ``model.class_path`` are files beside it, not registry entries.
    """

    name: MethodName | str
    """The name the method reports in results and checkpoints (a new name is declared in ``MethodName``)."""
    module: type[EditingModule]
    """The ``EditingModule`` subclass that trains the method's deltas."""
    config: type | None
    """The dataclass of the method's own settings (a constructor argument of ``module``), or None."""
    edit_kind: str
    """The format of its saved edits, recorded in ``edit_manifest.json``; methods sharing a kind share its loader."""
    write_edit: EditWriter
    """Writes an edit's tensor files."""
    load_edit: EditLoader
    """Applies a saved edit of ``edit_kind`` onto a base model."""
    merge_edit: EditMerger | None = None
    """Merges an applied edit into the base model's weights, for methods whose edit is a weight change (full, LoRA,
    MEMIT); None: the edit is something else (sense deltas, a codebook consulted at run time), which a plain
    transformers model cannot carry, and ``editing export --merged`` refuses it."""


_METHODS: dict[MethodName, MethodSpec] = {}
METHODS: MappingProxyType[MethodName, MethodSpec] = MappingProxyType(_METHODS)
"""The registered methods by name (read-only; ``register`` adds to it)."""


def register(spec: MethodSpec) -> MethodSpec:
    """Register a method (call it once, in the method's sub-package ``__init__.py``).

    Args:
        spec: the method's parts.

    Returns:
        The registered spec (its name a ``MethodName``).

    Raises:
        ConfigError: another class is registered under the name, the class is no ``EditingModule``, or another
            loader is registered for the edit kind.
    """
    known = _declared(spec.name)
    name = MethodName.declare(spec.name)
    try:
        _check(spec, name)
    except ConfigError:
        if not known:  # a refused registration declares no name
            MethodName.forget(name.value)
        raise
    spec = replace(spec, name=name)
    spec.module.method = name
    spec.module.registered = spec  # so the base class finds its writer without importing this module (no cycle)
    _METHODS[name] = spec
    return spec


def _check(spec: MethodSpec, name: MethodName) -> None:
    from editing.methods.base import EditingModule

    if not (isinstance(spec.module, type) and issubclass(spec.module, EditingModule)):
        raise ConfigError(f"method {name.value!r}: {spec.module!r} is not an EditingModule subclass")
    if not isinstance(spec.edit_kind, str) or not spec.edit_kind:
        raise ConfigError(f"method {name.value!r}: edit_kind must be a non-empty string")
    old = _METHODS.get(name)
    if old is not None and _qualname(old.module) != _qualname(spec.module):
        raise ConfigError(f"method {name.value!r} is registered already, by {_qualname(old.module)}; choose another "
                          f"name for {_qualname(spec.module)}")
    for other in _METHODS.values():
        if other.name != name and other.edit_kind == spec.edit_kind and other.load_edit is not spec.load_edit:
            raise ConfigError(f"method {name.value!r} registers another loader for edit kind {spec.edit_kind!r}, "
                              f"which method {other.name.value!r} loads already; choose another edit_kind")


def _declared(value: object) -> bool:
    try:
        MethodName(value)
    except ConfigError:
        return False
    return True


def unregister(name: MethodName | str) -> None:
    """Remove a registered method and a name it declared (for tests that register a temporary method)."""
    spec = _METHODS.pop(MethodName(name), None)
    if spec is not None and spec.module.method == spec.name:
        from editing.methods.base import EditingModule

        spec.module.method = EditingModule.method
        spec.module.registered = EditingModule.registered
    MethodName.forget(str(name))


def method_spec(name: MethodName | str) -> MethodSpec:
    """The registered parts of method ``name``.

    Raises:
        ConfigError: an unknown name, or a name without a registered method.
    """
    method = MethodName(name)
    if method not in _METHODS:
        raise ConfigError(f"method {method.value!r} has no registered class; registered: "
                          f"{', '.join(m.value for m in _METHODS)}")
    return _METHODS[method]


def get_method(name: MethodName | str) -> type[EditingModule]:
    """The LightningModule class of method ``name`` (an unknown name raises ``ConfigError``)."""
    return method_spec(name).module


def edit_kinds() -> dict[str, EditLoader]:
    """Edit kind -> its loader, over the registered methods."""
    return {spec.edit_kind: spec.load_edit for spec in _METHODS.values()}


def edit_loader(kind: str, method: str | None = None, where: str = "the edit") -> EditLoader:
    """The loader of edit kind ``kind``.

    Args:
        kind: the kind recorded in the edit's manifest.
        method: the method recorded beside it (for the message).
        where: the edit, for the message.

    Raises:
        ConfigError: no registered method writes that kind.
    """
    loaders = edit_kinds()
    if kind not in loaders:
        made_by = f" (made by method {method!r})" if method else ""
        raise ConfigError(f"{where} is of kind {kind!r}{made_by}, which no registered method loads (known kinds: "
                          f"{', '.join(sorted(loaders))}); import the package that registers that method first")
    return loaders[kind]


def import_method_packages() -> None:
    """Import every sub-package of ``editing.methods``: each registers its method on import."""
    import editing.methods as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if info.ispkg:
            importlib.import_module(f"{package.__name__}.{info.name}")


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
