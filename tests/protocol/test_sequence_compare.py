"""Issue 38 item 4: ``benchmarks/sequence_compare.py`` reads several ``editing sequence`` folders and gives, per
method and step, chunk 1's and the current chunk's success, the degradation against the original model and whether
the step is inside the ball (SPEC 6: strictly below (1 + eps) x the original general NLL)."""

from __future__ import annotations

import json

import pytest
from fakes import benchmark_module


@pytest.fixture(scope="module")
def compare():
    with benchmark_module("sequence_compare") as module:
        yield module


def _state(eps: float, nlls: list[float]) -> dict:
    rows = []
    for step, nll in enumerate(nlls):
        chunks = {str(k): (1.0 if (k + step) % 2 else 0.0) for k in range(1, max(step, 1) + 1)}
        scores = {k: 0.5 + 0.1 * int(k) + 0.01 * step for k in chunks}
        rows.append({"step": step, "epoch": None if step == 0 else step % 2, "chunks": chunks,
                     "chunk_scores": scores, "success_rate": 0.1 * step, "general_nll": nll,
                     "degradation": 123.0})  # a stale stored value: the table recomputes it from the NLLs
    return {"settings": {"ball": eps}, "rows": rows[::-1]}  # out of order on purpose


def test_rows_follow_spec_from_the_nlls(compare, tmp_path) -> None:
    eps = 1e-3
    original = 3.5
    # inside, exactly on the boundary (outside: strict), above it, below the original
    nlls = [original, original * (1 + 0.5e-3), original * (1 + eps), original * (1 + 2e-3), original * 0.999]
    state = _state(eps, nlls)
    (tmp_path / "sequence.json").write_text(json.dumps(state), encoding="utf-8")
    rows = compare.table_rows(compare.load(tmp_path))
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    by_step = {r["step"]: r for r in state["rows"]}
    for r in rows:
        source = by_step[r["step"]]
        nll = source["general_nll"]
        assert r["degradation"] == pytest.approx(nll / original - 1.0, rel=1e-12, abs=1e-15)
        assert r["inside"] is (nll < (1.0 + eps) * original)
        assert r["first"] == source["chunks"]["1"]
        assert r["first_score"] == source["chunk_scores"]["1"]
        current = str(r["step"]) if r["step"] >= 1 else "1"
        assert r["current"] == source["chunks"][current]
        assert r["epoch"] == source["epoch"]
    assert [r["inside"] for r in rows] == [True, True, False, False, True]


def test_table_and_plot_are_written(compare, tmp_path, capsys) -> None:
    folder = tmp_path / "seq"
    folder.mkdir()
    (folder / "sequence.json").write_text(json.dumps(_state(1e-3, [3.0, 3.001, 3.01])), encoding="utf-8")
    plot = tmp_path / "out" / "plot.png"
    assert compare.main([f"m={folder}", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| m |")]
    assert len(table) == 3
    assert table[2].split("|")[8].strip() == "no"  # 3.01 / 3.0 - 1 = 3.3e-3 > 1e-3
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_folder_without_a_sequence_is_refused(compare, tmp_path, capsys) -> None:
    assert compare.main([f"m={tmp_path}"]) == 2
    assert "sequence.json" in capsys.readouterr().err
