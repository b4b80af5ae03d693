"""Content hashes: what every cache key and integrity check of the package is made of (issue 34).

Three kinds, all SHA-256 of exact bytes, never of sums or norms (a sum cannot see a permutation, a sign flip that
cancels, or two changes that offset):

- ``tensor_sha256``: named tensors, each hashed as its name, dtype, shape and raw bytes. Tensors that share storage
  (tied weights) are hashed once and referred to by name after that, so a tied model costs one pass over its bytes.
- ``file_sha256`` / ``bytes_sha256``: files and byte strings.
- ``code_digest``: the code that computes a cached value. From the modules named, the static import closure inside
  the package (``editing``, ``callbacks``) is read from the source (the AST, nothing imported); each module's source
  file is hashed, and so is the *live* code of every function and class in its namespace that is not an installed
  library's (code objects: bytecode, constants, names; not file names or line numbers, so two checkouts of the same
  code agree). A change to a source file, or a function patched in at run time, gives another digest, so a cache
  written by other code is never read; nothing has to be bumped by hand. Installed libraries enter a key through
  ``library_versions``.

A leaf module: it imports only the standard library and torch.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import os
import sys
import sysconfig
import types
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import torch

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # this file is editing/core/digests.py
"""The folder holding the ``editing`` and ``callbacks`` packages."""
PACKAGES = ("editing", "callbacks")

_CHUNK = 1 << 26  # bytes hashed per update: large tensors are not copied whole into a bytes object


def _update_with_tensor(digest, tensor: torch.Tensor) -> None:
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel() == 0:
        return
    flat = t.reshape(-1).view(torch.uint8)
    for start in range(0, flat.numel(), _CHUNK):
        digest.update(memoryview(flat[start: start + _CHUNK].numpy()))


def _storage_id(tensor: torch.Tensor) -> tuple:
    return (tensor.device.type, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
            tuple(tensor.stride()), tensor.dtype)


def tensor_sha256(tensors: Iterable[tuple[str, torch.Tensor]] | dict[str, torch.Tensor], *, sort: bool = True) -> str:
    """SHA-256 (hex) of named tensors: each name, dtype, shape and raw bytes.

    Args:
        tensors: ``(name, tensor)`` pairs or a dict.
        sort: hash in name order (independent of the order given); False keeps the order given.

    Returns:
        The full hex digest.
    """
    items = list(tensors.items() if isinstance(tensors, dict) else tensors)
    if sort:
        items.sort(key=lambda item: item[0])
    digest = hashlib.sha256()
    seen: dict[tuple, str] = {}
    for name, tensor in items:
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        where = _storage_id(tensor) if tensor.numel() else None
        if where is not None and where in seen:
            digest.update(f"=same as {seen[where]};".encode())
            continue
        if where is not None:
            seen[where] = name
        _update_with_tensor(digest, tensor)
        digest.update(b";")
    return digest.hexdigest()


def bytes_sha256(data: bytes) -> str:
    """SHA-256 (hex) of a byte string."""
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes (read in chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


@lru_cache(maxsize=1024)
def _cached_file_sha256(path: str, mtime_ns: int, size: int) -> str:
    return file_sha256(path)


def library_versions() -> dict[str, str]:
    """Versions of the installed libraries whose kernels and model code can change a cached number."""
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": ".".join(map(str, sys.version_info[:3]))}


# --- the code that computes a cached value ------------------------------------------------------------------------
def _module_file(name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    base = PACKAGE_ROOT.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@lru_cache(maxsize=512)
def _imports_of(path: str, mtime_ns: int, size: int) -> tuple[str, ...]:
    """Package modules a source file imports (any import statement, also inside functions and TYPE_CHECKING)."""
    source = Path(path)
    tree = ast.parse(source.read_text(encoding="utf-8"))
    module = _name_of(source)
    package = module if source.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append(name)
            found.extend(f"{name}.{alias.name}" for alias in node.names)
    return tuple(n for n in found if n.split(".")[0] in PACKAGES)


def _name_of(path: Path) -> str:
    parts = list(path.resolve().relative_to(PACKAGE_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_closure(roots: Iterable[str]) -> list[str]:
    """The package modules ``roots`` reach through their imports (themselves and every parent package included),
    sorted."""
    todo = list(roots)
    seen: dict[str, Path] = {}
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
            todo_name = ".".join(parts[:i])
            if todo_name in seen:
                continue
            path = _module_file(todo_name)
            if path is None:
                continue
            seen[todo_name] = path
            stat = path.stat()
            todo.extend(_imports_of(str(path), stat.st_mtime_ns, stat.st_size))
    return sorted(seen)


@lru_cache(maxsize=1)
def _library_prefixes() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {paths.get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")} | {sys.prefix, sys.base_prefix}
    here = str(PACKAGE_ROOT) + os.sep
    # an editable install keeps the package under the checkout, which is never a library folder
    return tuple(sorted(str(Path(r).resolve()) + os.sep for r in roots if r and not here.startswith(
        str(Path(r).resolve()) + os.sep)))


def _is_library_code(code: types.CodeType) -> bool:
    filename = code.co_filename
    if filename.startswith(str(PACKAGE_ROOT) + os.sep):
        return False
    return filename.startswith(_library_prefixes()) or filename.startswith("<frozen")


def _stable_repr(value) -> str:
    """``repr`` without what differs between processes: set order (string hashing is randomized per process) and
    object addresses."""
    if isinstance(value, (frozenset, set)):
        return "{" + ",".join(sorted(_stable_repr(v) for v in value)) + "}"
    if isinstance(value, tuple):
        return "(" + ",".join(_stable_repr(v) for v in value) + ")"
    if isinstance(value, (str, bytes, int, float, complex, bool, type(None), type(Ellipsis))):
        return repr(value)
    return f"<{type(value).__module__}.{type(value).__qualname__}>"


def _hash_code(digest, code: types.CodeType) -> None:
    digest.update(code.co_code)
    digest.update(repr((code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars, code.co_argcount,
                        code.co_kwonlyargcount, code.co_flags)).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _hash_code(digest, const)
        else:
            digest.update(_stable_repr(const).encode())


def _function_code(obj) -> types.CodeType | None:
    obj = inspect.unwrap(obj) if callable(obj) else obj
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    if isinstance(obj, property):
        obj = obj.fget
    return getattr(obj, "__code__", None) if isinstance(obj, types.FunctionType) else None


def _hash_callable(digest, label: str, obj, depth: int = 0) -> None:
    code = _function_code(obj)
    if code is not None:
        if not _is_library_code(code):
            digest.update(f"def {label}:".encode())
            _hash_code(digest, code)
            digest.update(_stable_repr(getattr(obj, "__defaults__", None)).encode())
            digest.update(_stable_repr(tuple(sorted((getattr(obj, "__kwdefaults__", None) or {}).items()))).encode())
        return
    if isinstance(obj, type) and depth < 3:
        members = [(k, v) for k, v in sorted(vars(obj).items()) if k not in ("__dict__", "__weakref__", "__doc__")]
        own = [(k, v) for k, v in members if _function_code(v) is not None or isinstance(v, type)]
        if own:
            digest.update(f"class {label}:".encode())
            for key, value in own:
                _hash_callable(digest, f"{label}.{key}", value, depth + 1)


def code_digest(*roots: str) -> str:
    """A digest of the code that computes a cached value: the source files of the package modules ``roots`` import
    (directly or not), and the live code of the functions and classes in their namespaces (a function patched in at
    run time counts). Installed libraries are not hashed; see ``library_versions``.

    Args:
        *roots: dotted names of the modules that compute the value (e.g. ``"editing.evaluation.evaluator"``).

    Returns:
        A 24-character hex digest.
    """
    digest = hashlib.sha256()
    for name in import_closure(roots):
        path = _module_file(name)
        stat = path.stat()
        digest.update(f"module {name}:{_cached_file_sha256(str(path), stat.st_mtime_ns, stat.st_size)};".encode())
        module = sys.modules.get(name)
        if module is None:
            # imported now, so that the digest does not depend on what this process happened to import before
            try:
                module = importlib.import_module(name)
            except Exception:  # noqa: BLE001 - a module that cannot be imported here computes nothing here
                continue
        for key, value in sorted(vars(module).items()):
            if not key.startswith("__"):
                _hash_callable(digest, f"{name}.{key}", value)
    return digest.hexdigest()[:24]


__all__ = ["bytes_sha256", "code_digest", "file_sha256", "import_closure", "library_versions", "tensor_sha256"]
