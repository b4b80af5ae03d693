"""``benchmarks/fit_time.py --paths`` (issue 37): the evaluation path before issue 37 against today's in one
process, on a tiny model: the "before" path really runs the old evaluation (default products, the LoRA branch, the
whole-block log-sum-exp, the mask) and both give the same epochs and ball decisions, for a LoRA edit and for a sense
edit of a Backpack; the projection is its formula."""

from __future__ import annotations

import pytest
from fakes import benchmark_module


@pytest.fixture(scope="module")
def fit_time():
    with benchmark_module("fit_time") as module:
        yield module


def test_the_projection_is_p0_plus_epochs_of_evaluation_and_the_rest(fit_time) -> None:
    # 2 epochs fitted in 30 s: p0 4 s, epochs 5 and 7 s, the rest 14 s (7 per epoch): 5 epochs = 4 + 5 * (6 + 7)
    assert fit_time.projected(30.0, [4.0, 5.0, 7.0], 2, 5) == pytest.approx(69.0)


def test_before_puts_the_old_evaluation_back_and_restores_today(fit_time, monkeypatch) -> None:
    import torch

    import editing.evaluation.scorer as scorer
    from editing.methods.lora import LoRAEditor

    monkeypatch.delenv("EDITING_PRODUCTS", raising=False)
    today = (scorer.LSE_BYTES_PER_THREAD, scorer.needed_mask, LoRAEditor.evaluation_weights)
    mask = torch.tensor([[1, 0]])
    with fit_time.before_issue_37():
        import os

        assert os.environ["EDITING_PRODUCTS"] == "default"
        assert scorer.needed_mask(mask) is mask and scorer.LSE_BYTES_PER_THREAD >= 1 << 40
        sentinel = object()
        with LoRAEditor.evaluation_weights(type("M", (), {"model": sentinel})()) as model:
            assert model is sentinel  # no merge: the branch runs
    assert (scorer.LSE_BYTES_PER_THREAD, scorer.needed_mask, LoRAEditor.evaluation_weights) == today
    assert "EDITING_PRODUCTS" not in __import__("os").environ


@pytest.mark.parametrize(("method", "model"), [("lora", "tiny-llama"), ("senses", "tiny-backpack")])
def test_paths_on_a_tiny_model_agree(fit_time, capsys, monkeypatch, tmp_path, method, model) -> None:
    import callbacks.degradation_budget as budget

    monkeypatch.setattr(fit_time.tempfile, "tempdir", str(tmp_path))  # its work folder under the test's
    # what main sets for the process is put back after the test: the cache folder, the switch, the timed evaluation
    monkeypatch.setenv("EDITING_EVAL_CACHE_DIR", str(tmp_path / "unused"))
    monkeypatch.setenv("EDITING_EVAL_CACHES", "on")
    monkeypatch.setattr(budget, "evaluate_epoch", budget.evaluate_epoch)
    code = fit_time.main(["--paths", "--methods", method, "--model", model, "--general_limit", "6",
                          "--eval_limit", "3", "--epochs", "1", "--train_batches", "2", "--project", "3"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"| {method} | before |" in out and f"| {method} | today |" in out and "MISMATCH" not in out
    assert "same ball decisions: yes" in out and "projected to 3 epochs" in out
