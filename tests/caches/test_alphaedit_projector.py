"""AlphaEdit's null-space projector cache (``editing.methods.alphaedit.compute``): an entry keyed by the statistics it
derives from (their cache key and C's bytes), the threshold and the code; a changed threshold or changed statistics
miss, and the cached projector is the computed one bit for bit."""

from __future__ import annotations

import pytest
import torch

from editing.methods.alphaedit.compute import null_space_projector, projector_material, projector_path

STATS = {"kind": "memit statistics", "fingerprint": "sha256:abc", "layer": 2, "samples": 1500}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITING_CACHE", str(tmp_path / "cache"))


def moment(seed: int = 0, width: int = 12) -> torch.Tensor:
    x = torch.randn(200, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x[:, : width // 2] *= 0.05  # half of the directions carry little of the keys: the null space
    return x.T @ x / len(x)


def test_cache_on_equals_cache_off_and_the_second_call_reads_it() -> None:
    c = moment()
    off, computed_off = null_space_projector(c, 0.02, STATS, cache=False)
    assert computed_off and not projector_path(projector_material(c, 0.02, STATS)).exists()  # off writes nothing
    first, computed = null_space_projector(c, 0.02, STATS)
    assert computed and projector_path(projector_material(c, 0.02, STATS)).is_file()
    second, computed_again = null_space_projector(c, 0.02, STATS)
    assert not computed_again
    assert torch.equal(first, off) and torch.equal(second, off)
    # the projector of SPEC section 12, written here: P = U0 U0^T, U0 the eigenvectors below the threshold
    values, vectors = torch.linalg.eigh(c)
    u0 = vectors[:, [j for j in range(len(values)) if values[j] < 0.02]]
    assert 0 < u0.shape[1] < len(c)
    torch.testing.assert_close(off, u0 @ u0.T, rtol=0, atol=1e-12)


def test_a_changed_threshold_or_changed_statistics_misses() -> None:
    c = moment()
    null_space_projector(c, 0.02, STATS)
    assert null_space_projector(c, 0.02, STATS)[1] is False
    assert null_space_projector(c, 0.01, STATS)[1] is True  # another threshold
    assert null_space_projector(moment(seed=1), 0.02, STATS)[1] is True  # another C under the same statistics key
    changed = c.clone()
    changed[0, 0] += 1e-15  # one last bit of C
    assert null_space_projector(changed, 0.02, STATS)[1] is True
    assert null_space_projector(c, 0.02, {**STATS, "samples": 3000})[1] is True  # other statistics' key
    assert null_space_projector(c, 0.02, {**STATS, "fingerprint": "sha256:other"})[1] is True


def test_a_damaged_entry_is_recomputed(caplog) -> None:
    c = moment()
    good, _ = null_space_projector(c, 0.02, STATS)
    path = projector_path(projector_material(c, 0.02, STATS))
    data = bytearray(path.read_bytes())
    data[-8] ^= 0xFF  # flip a bit inside the tensor bytes
    path.write_bytes(bytes(data))
    again, computed = null_space_projector(c, 0.02, STATS)
    assert computed and torch.equal(again, good)
    assert "AlphaEdit projector" in caplog.text
