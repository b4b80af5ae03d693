"""The checked cache entry (``editing.caches.entries``) and the content hashes (``editing.core.digests``) every cache
uses: an entry is served only when it is exactly what was written for exactly this material; anything else is a miss."""

from __future__ import annotations

import hashlib
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from editing.caches.entries import expect_shapes, read_entry, write_entry
from editing.core.digests import code_digest, import_closure, tensor_sha256


def _reference_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """The content hash as the docstring states it, written out: name, dtype, shape, raw bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(bytes(t.reshape(-1).view(torch.uint8).tolist()))
        digest.update(b";")
    return digest.hexdigest()


def test_the_content_hash_is_of_exact_bytes_and_sees_a_permutation() -> None:
    tensors = {"b": torch.arange(6, dtype=torch.float32).view(2, 3), "a": torch.tensor([1, -2], dtype=torch.int64),
               "h": torch.tensor([0.5, 1.5], dtype=torch.bfloat16)}
    assert tensor_sha256(tensors) == _reference_sha256(tensors)
    permuted = {**tensors, "b": tensors["b"].flip(1)}  # same sum, same norm
    assert tensor_sha256(permuted) != tensor_sha256(tensors)
    reshaped = {**tensors, "b": tensors["b"].reshape(3, 2)}  # same bytes, other shape
    assert tensor_sha256(reshaped) != tensor_sha256(tensors)
    # a tensor sharing another's storage (tied weights) is hashed by reference, and still by name
    tied = {"x": tensors["b"], "y": tensors["b"]}
    assert tensor_sha256(tied) != tensor_sha256({"x": tensors["b"], "y": tensors["b"].clone() + 1})


def _rewrite(path, change) -> None:
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    save_file(change(tensors), str(path), metadata=meta)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_an_entry_is_served_only_as_written(tmp_path, caplog, dtype) -> None:
    path = tmp_path / "kind" / "entry.safetensors"
    tensors = {"m": torch.randn(3, 3).to(dtype)}
    assert write_entry(path, tensors, {"layer": 1})
    got = read_entry(path, {"layer": 1}, finite=True, check=expect_shapes({"m": (3, 3)}))
    assert got is not None and torch.equal(got["m"], tensors["m"])
    with caplog.at_level(logging.WARNING):
        assert read_entry(path, {"layer": 2}) is None  # other material
        assert read_entry(path, {"layer": 1}, check=expect_shapes({"m": (3, 4)})) is None
        _rewrite(path, lambda t: {"m": t["m"].flip(0)})  # readable, same metadata, other data
        assert read_entry(path, {"layer": 1}) is None
    assert "content hash" in caplog.text and str(path) in caplog.text
    # NaN or Inf: a miss where the caller asks for finite values, of every float dtype
    for bad in (float("nan"), float("inf")):
        damaged = tensors["m"].clone()
        damaged[1, 2] = bad
        write_entry(path, {"m": damaged}, {"layer": 1})
        assert read_entry(path, {"layer": 1}) is not None
        assert read_entry(path, {"layer": 1}, finite=True) is None
    # truncated: a miss naming the file, never the library's raw error
    write_entry(path, tensors, {"layer": 1})
    path.write_bytes(path.read_bytes()[:40])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert read_entry(path, {"layer": 1}) is None
    assert "unreadable" in caplog.text and str(path) in caplog.text


def test_an_entry_without_a_content_hash_is_a_miss(tmp_path) -> None:
    path = tmp_path / "old.safetensors"
    save_file({"m": torch.ones(2)}, str(path), metadata={"material": "{}"})  # what the old writers left
    assert read_entry(path, {}) is None


def test_a_failed_write_costs_the_entry_only(tmp_path, monkeypatch, caplog) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING):
        assert write_entry(blocker / "sub" / "e.safetensors", {"m": torch.ones(2)}, {}) is False
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    assert write_entry(tmp_path / "e.safetensors", {"m": torch.ones(2)}, {}) is False
    assert not (tmp_path / "e.safetensors").exists() and list(tmp_path.iterdir()) == [blocker]
    assert caplog.text.count("could not write") == 2


def test_the_code_digest_sees_a_patched_function_and_is_stable_otherwise(monkeypatch) -> None:
    import editing.rules.losses as losses

    root = "editing.evaluation.evaluator"
    assert "editing.rules.losses" in import_closure([root]) and "editing.methods.base" not in import_closure([root])
    before = code_digest(root)
    assert code_digest(root) == before
    original = losses.example_score
    with monkeypatch.context() as patch:  # not monkeypatch.undo(): that would undo the autouse fixtures' settings too
        patch.setattr(losses, "example_score", lambda nll_sum, loss: original(nll_sum, loss) * 1.0)
        assert code_digest(root) != before
    assert code_digest(root) == before
