"""The degradation-budget rule of SPEC section 6 on constructed metric histories."""

from __future__ import annotations

import pytest
from fakes import scripted_fit

from callbacks.degradation_budget import ball_key, choose_epochs


def history(nlls: list[float], success: list[float] | None = None) -> list[dict]:
    success = success or [0.0] * len(nlls)
    pairs = enumerate(zip(nlls, success, strict=True))
    return [{"epoch": i, "general_nll": n, "success_rate": s} for i, (n, s) in pairs]


def test_last_epoch_inside_each_ball_is_chosen() -> None:
    base = 4.0
    # relative changes per epoch: 0, 5e-6, 5e-5, 2e-6, 5e-4, 2e-3, 8e-6
    rel = [0, 5e-6, 5e-5, 2e-6, 5e-4, 2e-3, 8e-6]
    chosen = choose_epochs(history([base * (1 + r) for r in rel]))
    # 1e-5 ball: the last epoch with change < 1e-5 is epoch 6 (8e-6): the rule is "last", not "first run"
    assert chosen == {"1e-03": 6, "1e-04": 6, "1e-05": 6}
    chosen = choose_epochs(history([base * (1 + r) for r in rel[:6]]))
    assert chosen == {"1e-03": 4, "1e-04": 3, "1e-05": 3}


def test_epoch_zero_when_nothing_stays_inside() -> None:
    chosen = choose_epochs(history([3.0, 3.1, 3.2]))
    assert chosen == {"1e-03": 0, "1e-04": 0, "1e-05": 0}


def test_boundary_is_strict_and_nan_never_qualifies() -> None:
    base = 2.0
    chosen = choose_epochs(history([base, base * (1 + 1e-3), float("nan")]), balls=(1e-3,))
    assert chosen == {ball_key(1e-3): 0}


def test_test_rule_caps_at_validation_epoch() -> None:
    base = 5.0
    h = history([base, base * (1 + 1e-6), base * (1 + 2e-6), base * (1 + 3e-6)])
    assert choose_epochs(h, balls=(1e-5,)) == {"1e-05": 3}
    assert choose_epochs(h, balls=(1e-5,), max_epoch={"1e-05": 1}) == {"1e-05": 1}


@pytest.mark.parametrize("eps,key", [(1e-3, "1e-03"), (1e-4, "1e-04"), (1e-5, "1e-05")])
def test_ball_keys(eps: float, key: str) -> None:
    assert ball_key(eps) == key


# --- balls: validation and collision-free keys (issue 11 item 4) --------------------------------------------------

def test_ball_keys_are_collision_free_and_round_trip() -> None:
    from editing.rules.budget import ball_key, key_eps

    assert ball_key(0.0012) == "0.0012" and ball_key(0.0014) == "0.0014"  # both were "1e-03"
    values = [1e-3, 1e-4, 1e-5, 0.0012, 0.0014, 3e-5, 1.5e-5, 0.5, 1e-3 + 1e-18, 0.1 + 0.2]
    keys = [ball_key(v) for v in values]
    assert len(set(keys)) == len(set(values))
    assert all(key_eps(k) == v for k, v in zip(keys, values, strict=True))


@pytest.mark.parametrize("bad", [0.0, -1e-3, float("nan"), float("inf"), float("-inf"), 1.0, 2.0, True, "x", None])
def test_invalid_eps_is_a_clear_error_naming_the_setting(bad) -> None:
    from editing.core.errors import ConfigError
    from editing.rules.budget import Ball, parse_balls

    with pytest.raises(ConfigError, match=r"--budget\.balls"):
        parse_balls([1e-3, bad])
    with pytest.raises(ConfigError):
        Ball(bad)


@pytest.mark.parametrize("balls", [[1e-3, 1e-3], [1e-4, "0.0001"], []])
def test_duplicate_or_missing_balls_are_refused(balls) -> None:
    from editing.core.errors import ConfigError
    from editing.rules.budget import parse_balls

    with pytest.raises(ConfigError, match=r"--budget\.balls: .*(listed twice|no ball)"):
        parse_balls(balls)


def test_colliding_eps_values_keep_both_results() -> None:
    base = 2.0
    h = history([base, base * (1 + 1.3e-3), base * (1 + 1.1e-3), base * (1 + 5e-3)])
    # 1.3e-3 is inside the 0.0014 ball only; 1.1e-3 is inside both
    assert choose_epochs(h, balls=(0.0012, 0.0014)) == {"0.0012": 2, "0.0014": 2}
    h = history([base, base * (1 + 1.1e-3), base * (1 + 1.3e-3)])
    assert choose_epochs(h, balls=(0.0012, 0.0014)) == {"0.0012": 1, "0.0014": 2}


def test_nonfinite_general_nll_is_never_inside() -> None:
    from editing.rules.budget import choose_beta, inside

    for bad in (float("nan"), float("inf"), float("-inf"), None):
        assert not inside(bad, 4.0, 1e-3)
        assert not inside(4.0, bad, 1e-3)
    assert inside(4.0, 4.0, 1e-3) and not inside(4.0 * (1 + 1e-3), 4.0, 1e-3)
    # the ensemble's beta: a broken measurement at beta 1.0 is not "inside"
    assert choose_beta({1.0: float("-inf"), 0.9: 3.0001, 0.0: 3.0}, 1e-3) == 0.9
    assert choose_beta({1.0: float("nan"), 0.5: 3.0, 0.0: 3.0}, 1e-3) == 0.5
    assert choose_beta({1.0: 3.0, 0.0: float("nan")}, 1e-3) == 0.0
    h = history([2.0, float("-inf"), 2.0 * (1 + 2e-3)])
    assert choose_epochs(h, balls=(1e-3,)) == {"1e-03": 0}


def test_test_rule_cap_accepts_any_spelling_of_a_ball_and_refuses_unknown_ones() -> None:
    from editing.core.errors import ConfigError

    base = 5.0
    h = history([base, base * (1 + 1e-6), base * (1 + 2e-6), base * (1 + 3e-6)])
    # a cap named "0.001" caps the 1e-03 ball (it used to be ignored: the ball went uncapped)
    assert choose_epochs(h, balls=(1e-3,), max_epoch={"0.001": 1}) == {"1e-03": 1}
    with pytest.raises(ConfigError, match=r"--budget\.max_epoch: '2e-03' is not one of this run's balls"):
        choose_epochs(h, balls=(1e-3,), max_epoch={"2e-03": 1})
    with pytest.raises(ConfigError, match="epoch number >= 0"):
        choose_epochs(h, balls=(1e-3,), max_epoch={"1e-03": -1})


# --- through the callback and the command line --------------------------------------------------------------------

@pytest.mark.parametrize("balls", [[0.0], [-1e-3, 1e-4], [float("nan")], [1e-3, 1e-3]])
def test_callback_refuses_bad_balls(balls) -> None:
    from callbacks.degradation_budget import DegradationBudget
    from editing.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--budget\.balls"):
        DegradationBudget(balls=balls)


FIT = ["fit", "--model", "LoRAEditor", "--model.base.name", "tiny-gpt2", "--model.lora.rank", "2", "--data.task",
       "stereoset", "--data.eval_limit", "2", "--data.general_limit", "2", "--trainer.max_epochs", "1",
       "--trainer.limit_train_batches", "1", "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu"]


@pytest.mark.parametrize("value", ["[0.0]", "[-0.001]", "[.nan]", "[0.001, 0.001]", "[1.5]"])
def test_cli_refuses_bad_balls_before_training(tmp_path, monkeypatch, capsys, data_root, value) -> None:
    from editing.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main([*FIT, "--budget.output_dir", str(tmp_path / "run"), "--budget.balls", value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error: --budget.balls" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "results.json").exists()


def test_cli_fit_keeps_both_colliding_balls(tmp_path, monkeypatch, data_root) -> None:
    import json

    from editing.cli import main

    monkeypatch.chdir(tmp_path)
    main([*FIT, "--budget.output_dir", str(tmp_path / "run"), "--budget.balls", "[0.0012, 0.0014]"])
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert list(results["balls"]) == ["0.0012", "0.0014"] and results["stopped_early"] is None


@pytest.mark.parametrize("value", ["[0.0]", "[0.001, 0.001]"])
def test_ensemble_refuses_bad_balls_before_loading_anything(tmp_path, capsys, value) -> None:
    from editing.cli import main

    with pytest.raises(SystemExit) as info:
        main(["ensemble", "--large", "tiny-gpt2", "--backpack_edits", str(tmp_path / "missing"), "--balls", value,
              "--output_dir", str(tmp_path / "out")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error: --balls" in err and "Traceback" not in err




def test_colliding_balls_both_get_results_and_edits_through_the_callback(tmp_path, monkeypatch, data_root) -> None:
    results = scripted_fit(tmp_path, monkeypatch, [1.0, 1 + 1.3e-3, 1 + 5e-3], epochs=2, balls=[0.0012, 0.0014])
    assert {k: b["epoch"] for k, b in results["balls"].items()} == {"0.0012": 0, "0.0014": 1}
    assert set(results["edits"]) == {"0.0012", "0.0014"}
    assert all((tmp_path / "run" / "edits" / f"ball_{key}").is_dir() for key in ("0.0012", "0.0014"))


def _edit_tensors(folder):
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no tensors in {folder}"
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(str(f)).items()}


def test_a_capped_ball_exports_the_edit_of_the_epoch_it_reports(tmp_path, monkeypatch, data_root) -> None:
    """Test runs cap each ball at validation's epoch (--budget.max_epoch). Every epoch here is inside every ball, so
    1e-03 reports epoch 3 and the capped 1e-05 epoch 1; its edit must be epoch 1's, not missing (the ensemble then
    refused the run) and not epoch 3's. The reference is the edit of the same fit stopped after epoch 1."""
    import torch

    inside_all = [1.0, 1 + 5e-6, 1 + 6e-6, 1 + 7e-6]
    capped = scripted_fit(tmp_path / "capped", monkeypatch, inside_all, epochs=3, max_epoch={"1e-05": 1})
    assert {k: b["epoch"] for k, b in capped["balls"].items()} == {"1e-03": 3, "1e-04": 3, "1e-05": 1}
    assert set(capped["edits"]) == {"1e-03", "1e-04", "1e-05"}
    short = scripted_fit(tmp_path / "short", monkeypatch, inside_all[:2], epochs=1)
    assert short["balls"]["1e-05"]["epoch"] == 1 and "1e-05" in short["edits"]
    edits = tmp_path / "capped" / "run" / "edits"
    got, late = _edit_tensors(edits / "ball_1e-05"), _edit_tensors(edits / "ball_1e-03")
    want = _edit_tensors(tmp_path / "short" / "run" / "edits" / "ball_1e-05")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert any(not torch.equal(got[k], late[k]) for k in got)  # epochs 1 and 3 differ, so the check can fail


# --- the paper's epoch rule by default (issue 11 item 5) --------------------------------------------------------------

# epoch 2 leaves the largest ball, epoch 3 comes back inside every ball, epoch 4 leaves again
LEAVES_THEN_RETURNS = [1.0, 1 + 5e-6, 1 + 5e-3, 1 + 5e-6, 1 + 2e-3]


def test_default_trains_every_epoch_and_reports_the_later_epoch(tmp_path, monkeypatch, capsys, data_root) -> None:
    results = scripted_fit(tmp_path, monkeypatch, LEAVES_THEN_RETURNS, epochs=4)
    assert [e["epoch"] for e in results["epochs"]] == [0, 1, 2, 3, 4]
    assert {k: b["epoch"] for k, b in results["balls"].items()} == {"1e-03": 3, "1e-04": 3, "1e-05": 3}
    assert results["stopped_early"] is None
    assert "stopped early" not in capsys.readouterr().out


def test_patience_stops_early_and_records_when_and_why(tmp_path, monkeypatch, capsys, data_root) -> None:
    results = scripted_fit(tmp_path, monkeypatch, LEAVES_THEN_RETURNS, epochs=4, patience=1)
    assert [e["epoch"] for e in results["epochs"]] == [0, 1, 2]
    # the early stop never saw epoch 3: every ball reports epoch 1, earlier than the paper's rule gives
    assert {k: b["epoch"] for k, b in results["balls"].items()} == {"1e-03": 1, "1e-04": 1, "1e-05": 1}
    stop = results["stopped_early"]
    assert stop["epoch"] == 2 and "outside the largest ball (1e-03)" in stop["reason"]
    assert "patience 1" in stop["reason"] and "epochs 3..4 were not trained" in stop["reason"]
    assert "stopped early after epoch 2" in capsys.readouterr().out


def test_patience_counts_epochs_in_a_row_and_never_reports_a_stop_at_the_last_epoch(tmp_path, monkeypatch,
                                                                                     data_root) -> None:
    results = scripted_fit(tmp_path / "two", monkeypatch, LEAVES_THEN_RETURNS, epochs=4, patience=2)
    assert [e["epoch"] for e in results["epochs"]] == [0, 1, 2, 3, 4] and results["stopped_early"] is None
    # leaving the ball at the last epoch stops nothing: the run trained every epoch
    results = scripted_fit(tmp_path / "last", monkeypatch, [1.0, 1 + 5e-6, 1 + 5e-3], epochs=2, patience=1)
    assert [e["epoch"] for e in results["epochs"]] == [0, 1, 2] and results["stopped_early"] is None


@pytest.mark.parametrize("patience", [0, -1])
def test_patience_must_be_positive(patience) -> None:
    from callbacks.degradation_budget import DegradationBudget
    from editing.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--budget\.patience"):
        DegradationBudget(patience=patience)


def test_no_shipped_config_stops_early() -> None:
    import yaml
    from conftest import REPO_DIR

    configs = sorted((REPO_DIR / "lightning_configs").rglob("*.yaml"))
    assert len(configs) > 20
    for path in configs:
        budget = (yaml.safe_load(path.read_text()) or {}).get("budget") or {}
        assert budget.get("patience") is None, f"{path} sets budget.patience: the paper trains every epoch"


# --- issue 34 item 15: the test pair's epoch, as SPEC section 6 now words it ------------------------------------------
def _reference_epoch(nlls: list[float], eps: float, v: int | None = None) -> int:
    """SPEC section 6, written out: walk the epochs in order and keep the last one inside the ball (general NLL
    strictly below (1 + eps) times epoch 0's; NaN never inside); on the test pair stop after epoch v. Epoch 0 always
    qualifies. An epoch outside the ball is never the answer."""
    chosen = 0
    for epoch in range(len(nlls)):
        if v is not None and epoch > v:
            break
        nll = nlls[epoch]
        if nll == nll and nll < (1.0 + eps) * nlls[0]:
            chosen = epoch
    return chosen


def _nlls(base: float, pattern: str, eps: float) -> list[float]:
    """General NLLs from a pattern of 'i' (inside the ball) and 'o' (outside), epoch 0 first (always 'i')."""
    inside, outside = base * (1 + 0.5 * eps), base * (1 + 3 * eps)
    return [base] + [inside if c == "i" else outside for c in pattern[1:]]


# validation pattern, test pattern: leave and re-enter the ball before v, at v, and after v
CASES_ITEM_15 = [
    ("iioii", "ioioiii"),   # v = 4; test: out at 1 and 3, in at 2 and 4 -> 4; the later returns (5, 6) are past v
    ("iiiio", "iiooiii"),   # v = 3; test leaves at 2 and is outside at v: 1, not 3 (outside) nor 6 (past v)
    ("ioooi", "ioooooi"),   # v = 4; test outside from 1 to 5: epoch 0; the return at 6 is past v
    ("iooooo", "iiiiii"),   # v = 0: epoch 0 on the test pair whatever it does later
    ("ioiio", "iiooi"),     # v = 3; test: 1 inside, 2 and 3 out: 1; 4 comes back but is past v
    ("iiiiiii", "ioi"),     # v = 6, beyond the test's last epoch: the test's last inside (2)
    ("iiiiiii", "iiioooo"),  # v = 6: the test's last inside among 0..6 (2), never the outside 3..6
]


@pytest.mark.parametrize("val,test", CASES_ITEM_15)
def test_the_test_pairs_epoch_is_the_last_inside_among_epochs_0_to_v(val: str, test: str) -> None:
    from editing.runs.records import EpochRecord, ball_records

    for eps in (1e-3, 1e-4, 1e-5):
        key = ball_key(eps)
        val_nlls, test_nlls = _nlls(4.0, val, eps), _nlls(3.0, test, eps)
        v = _reference_epoch(val_nlls, eps)
        assert choose_epochs(history(val_nlls), balls=(eps,)) == {key: v}
        want = _reference_epoch(test_nlls, eps, v)
        assert want == 0 or test[want] == "i"  # never an epoch outside the ball
        assert choose_epochs(history(test_nlls), balls=(eps,), max_epoch={key: v}) == {key: want}
        # any spelling of the ball's eps names the cap; the results file's ball record reports the same epoch
        assert choose_epochs(history(test_nlls), balls=(eps,), max_epoch={repr(eps): v}) == {key: want}
        epochs = [EpochRecord.from_dict({"epoch": i, "general_nll": n, "success_rate": i / 10, "targeted_nll": 1.0,
                                         "hard_negative_nll": 1.0, "degradation": n / test_nlls[0] - 1})
                  for i, n in enumerate(test_nlls)]
        record = ball_records(epochs, (eps,), {key: v})[key]
        assert record.epoch == want and record.metrics.general_nll == test_nlls[want]


def test_the_test_pairs_epoch_on_random_histories_matches_the_reference() -> None:
    import random

    rng = random.Random(34)
    balls = (1e-3, 1e-4, 1e-5)
    for _ in range(300):
        n = rng.randint(1, 11)  # epoch 0 and up to 10 epochs
        base = rng.uniform(2.0, 6.0)
        val = [base] + [base * (1 + 10 ** rng.uniform(-6.5, -2)) for _ in range(n - 1)]
        test = [base] + [base * (1 + 10 ** rng.uniform(-6.5, -2)) for _ in range(rng.randint(0, 10))]
        if rng.random() < 0.1 and len(test) > 1:
            test[rng.randrange(1, len(test))] = float("nan")
        caps = {ball_key(eps): _reference_epoch(val, eps) for eps in balls}
        assert choose_epochs(history(val), balls) == caps
        got = choose_epochs(history(test), balls, max_epoch=caps)
        for eps in balls:
            epoch = got[ball_key(eps)]
            assert epoch == _reference_epoch(test, eps, caps[ball_key(eps)])
            assert epoch <= caps[ball_key(eps)]
            assert epoch == 0 or test[epoch] < (1 + eps) * test[0]


# --- issue 36: the best epoch inside the ball (--budget.epoch_rule best, editing auto's trials) ----------------------
def _reference_best_epoch(records: list[dict], eps: float, v: int | None = None) -> int:
    """Written out: among the epochs 0..v (all without v) whose general NLL is strictly below (1 + eps) times epoch
    0's (NaN never inside), the one with the highest reliability + success rate (a missing or NaN rate is 0), the
    later on a tie; epoch 0 when none is inside."""
    best, best_value = None, None
    for record in records:
        if v is not None and record["epoch"] > v:
            break
        nll = record["general_nll"]
        if not (nll == nll and nll < (1.0 + eps) * records[0]["general_nll"]):
            continue
        value = 0.0
        for name in ("reliability", "success_rate"):
            x = record.get(name)
            if x is not None and x == x:
                value += x
        if best_value is None or value >= best_value:
            best, best_value = record["epoch"], value
    return 0 if best is None else best


def test_the_best_epoch_rule_keeps_an_early_epoch_that_generalizes_best() -> None:
    base = 3.0
    records = [{"epoch": 0, "general_nll": base, "success_rate": 0.0, "reliability": 0.0},
               {"epoch": 1, "general_nll": base * (1 + 5e-3), "success_rate": 0.6, "reliability": 1.0},  # outside
               {"epoch": 2, "general_nll": base * (1 + 5e-4), "success_rate": 0.5, "reliability": 1.0},
               {"epoch": 3, "general_nll": base * (1 + 2e-4), "success_rate": 0.3, "reliability": 1.0},
               {"epoch": 4, "general_nll": base * (1 + 1e-4), "success_rate": 0.3, "reliability": 1.0}]
    assert choose_epochs(records, balls=(1e-3,)) == {"1e-03": 4}  # SPEC section 6: the last inside
    assert choose_epochs(records, balls=(1e-3,), rule="best") == {"1e-03": 2}  # epoch 1 is outside: never chosen
    # a tie goes to the later epoch; with a cap, only epochs 0..cap count
    records[4]["success_rate"] = 0.5
    assert choose_epochs(records, balls=(1e-3,), rule="best") == {"1e-03": 4}
    assert choose_epochs(records, balls=(1e-3,), rule="best", max_epoch={"1e-03": 3}) == {"1e-03": 2}
    with pytest.raises(Exception, match=r"--budget\.epoch_rule"):
        choose_epochs(records, balls=(1e-3,), rule="first")


def test_the_best_epoch_rule_on_random_histories_matches_the_reference() -> None:
    import random

    rng = random.Random(36)
    balls = (1e-3, 1e-4, 1e-5)
    for _ in range(400):
        base = rng.uniform(2.0, 6.0)
        records = [{"epoch": 0, "general_nll": base, "success_rate": rng.choice([0.0, 0.25]), "reliability": 0.0}]
        for epoch in range(1, rng.randint(1, 11)):
            nll = base * (1 + 10 ** rng.uniform(-6.5, -2)) if rng.random() < 0.9 else float("nan")
            record = {"epoch": epoch, "general_nll": nll, "success_rate": rng.choice([0.0, 0.25, 0.5, 0.75]),
                      "reliability": rng.choice([0.0, 0.5, 1.0, None, float("nan")])}
            records.append(record)
        cap = rng.choice([None, rng.randint(0, 10)])
        for eps in balls:
            key = ball_key(eps)
            want = _reference_best_epoch(records, eps, cap)
            got = choose_epochs(records, balls=(eps,), rule="best", max_epoch=None if cap is None else {key: cap})
            assert got == {key: want}


def test_a_fit_with_the_best_epoch_rule_exports_the_edit_of_that_epoch(tmp_path, monkeypatch, data_root) -> None:
    """Every epoch is inside every ball; reliability is best at epoch 2 of 3, so the best rule reports epoch 2 and
    its edit must be epoch 2's (the reference: the same 3-epoch fit under SPEC's rule capped at epoch 2, whose edit
    the test above checks), not epoch 3's."""
    import torch

    inside_all = [1.0, 1 + 5e-6, 1 + 6e-6, 1 + 7e-6]
    best = scripted_fit(tmp_path / "best", monkeypatch, inside_all, epochs=3, reliability=[0.0, 0.5, 1.0, 0.5],
                        epoch_rule="best")
    assert {k: b["epoch"] for k, b in best["balls"].items()} == {"1e-03": 2, "1e-04": 2, "1e-05": 2}
    assert [e["reliability"] for e in best["epochs"]] == [0.0, 0.5, 1.0, 0.5]
    assert best["balls"]["1e-03"]["metrics"]["reliability"] == 1.0
    capped = scripted_fit(tmp_path / "capped", monkeypatch, inside_all, epochs=3, max_epoch={"1e-03": 2})
    assert capped["balls"]["1e-03"]["epoch"] == 2
    got = _edit_tensors(tmp_path / "best" / "run" / "edits" / "ball_1e-03")
    want = _edit_tensors(tmp_path / "capped" / "run" / "edits" / "ball_1e-03")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    last = scripted_fit(tmp_path / "last", monkeypatch, inside_all, epochs=3, reliability=[0.0, 0.5, 1.0, 0.5])
    assert last["balls"]["1e-03"]["epoch"] == 3  # the default stays SPEC section 6's last epoch inside
    late = _edit_tensors(tmp_path / "last" / "run" / "edits" / "ball_1e-03")
    assert any(not torch.equal(got[k], late[k]) for k in got)  # epochs 2 and 3 differ, so the check can fail


def test_best_patience_stops_when_the_objective_inside_the_ball_has_not_risen(tmp_path, monkeypatch, capsys,
                                                                            data_root) -> None:
    inside = [1.0] + [1 + 5e-6] * 6
    # best at epoch 1 (reliability 1.0), not beaten at 2 and 3: with patience 2 the fit stops after epoch 3
    flat = scripted_fit(tmp_path / "flat", monkeypatch, inside, epochs=6, reliability=[0, 1.0, 0.5, 1.0, 1, 1, 1],
                        epoch_rule="best", best_patience=2)
    assert [e["epoch"] for e in flat["epochs"]] == [0, 1, 2, 3]
    assert flat["balls"]["1e-03"]["epoch"] == 3  # the tie at epoch 3 goes to the later epoch
    assert flat["stopped_early"]["epoch"] == 3 and "best_patience 2" in flat["stopped_early"]["reason"]
    assert "epochs 4..6 were not trained" in flat["stopped_early"]["reason"]
    assert "--budget.best_patience" in capsys.readouterr().out
    # a rise restarts the count; an epoch outside the ball never counts as one (epoch 2: 1.0 but outside)
    rising = scripted_fit(tmp_path / "rising", monkeypatch, [1.0, 1 + 5e-6, 1 + 5e-3, 1 + 5e-6, 1 + 5e-6, 1 + 5e-6,
                                                             1 + 5e-6],
                          epochs=6, reliability=[0, 0.25, 1.0, 0.5, 0.5, 0.5, 0.5], epoch_rule="best",
                          best_patience=2)
    assert [e["epoch"] for e in rising["epochs"]] == [0, 1, 2, 3, 4, 5]
    # best first reached at epoch 3 (0.5), tied at 4 and 5: stopped after 5, which the tie rule reports
    assert rising["balls"]["1e-03"]["epoch"] == 5 and rising["stopped_early"]["epoch"] == 5
    # nothing edited inside the ball yet: no stop
    outside = scripted_fit(tmp_path / "out", monkeypatch, [1.0, 1 + 5e-3, 1 + 5e-3, 1 + 5e-3], epochs=3,
                           reliability=[0, 1.0, 1.0, 1.0], epoch_rule="best", best_patience=1)
    assert [e["epoch"] for e in outside["epochs"]] == [0, 1, 2, 3] and outside["stopped_early"] is None


def test_stop_at_cap_ends_the_fit_after_the_largest_cap_of_every_ball(tmp_path, monkeypatch, data_root) -> None:
    inside_all = [1.0, 1 + 5e-6, 1 + 6e-6, 1 + 7e-6, 1 + 8e-6]
    caps = {"1e-03": 2, "1e-04": 1, "1e-05": 1}
    stopped = scripted_fit(tmp_path / "stop", monkeypatch, inside_all, epochs=4, max_epoch=caps, stop_at_cap=True)
    assert [e["epoch"] for e in stopped["epochs"]] == [0, 1, 2]
    assert {k: b["epoch"] for k, b in stopped["balls"].items()} == caps
    assert "stop_at_cap" in stopped["stopped_early"]["reason"]
    trained = scripted_fit(tmp_path / "all", monkeypatch, inside_all, epochs=4, max_epoch=caps)
    assert [e["epoch"] for e in trained["epochs"]] == [0, 1, 2, 3, 4]  # the default trains every epoch
    assert {k: b["epoch"] for k, b in trained["balls"].items()} == caps
    # a ball without a cap can still report a later epoch: no stop
    some = scripted_fit(tmp_path / "some", monkeypatch, inside_all, epochs=4, max_epoch={"1e-03": 1},
                        stop_at_cap=True)
    assert [e["epoch"] for e in some["epochs"]] == [0, 1, 2, 3, 4] and some["stopped_early"] is None
