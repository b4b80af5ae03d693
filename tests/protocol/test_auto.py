"""``editing auto`` (issue 14 item 5): the small-data defaults as stated, the held-out split, the search's draws,
the budget, and a search on a tiny model that returns the best edit inside its ball.

Every expectation is recomputed here from the rules as the README states them, not with the package's helpers.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_DIR, SHARED_DATA

from editing.core.errors import ConfigError
from editing.core.files import ResultsExistError
from editing.protocol.auto import (
    SmallData,
    Trial,
    auto_edit,
    context_prefixes,
    explore_draw,
    explore_orders,
    narrowed_draw,
    plan_data,
    run_fit_until,
)
from editing.protocol.space import load_space
from editing.rules.tasks import get_task

TINY_ARGS = "--data.eval_limit 4 --data.general_limit 4"
LR = "model.init_args.optimizer.lr"
KL = "model.init_args.regularization.weight"
RANK = "model.init_args.lora.rank"
FRACTION = "model.init_args.lora.layer_fraction"


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_DIR), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _user_task(folder: Path, n: int = 8, split: bool = False) -> Path:
    """A ``good`` task of ``n`` country_capital lines (with an extra field each), without ``{split}`` unless asked."""
    source = SHARED_DATA / "country_capital" / "split"
    folder.mkdir(parents=True, exist_ok=True)
    suffix = "-{split}" if split else ""
    for s in (("val", "test") if split else ("val",)):
        tail = f"-{s}" if split else ""
        canonical = source.joinpath(f"country_capital_fixed-{s}.jsonl").read_text().splitlines()[:n]
        rows = [dict(json.loads(line), note=i) for i, line in enumerate(canonical)]
        (folder / f"canonical{tail}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        for name, stem in (("evaluation", "country_capital_clear_eval"), ("hard", "country_capital_hard_neg")):
            lines = source.joinpath(f"{stem}-{s}.jsonl").read_text().splitlines()[:6]
            (folder / f"{name}{tail}.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "task.yaml").write_text(
        f"name: capitals\nloss: good\nthreshold: 1.6094379124341003\ncanonical: canonical{suffix}.jsonl\n"
        f"evaluation: evaluation{suffix}.jsonl\nhard_negatives: hard{suffix}.jsonl\n")
    return folder / "task.yaml"


def _edit_folder(trial: Trial, key: str) -> None:
    """What a fit with an edited epoch inside the ball leaves (for the fake fits below): its edit's folder."""
    if trial.epoch:
        (Path(trial.folder) / "edits" / f"ball_{key}").mkdir(parents=True, exist_ok=True)


# ----------------------------------------------------------------------------------------------------------------
# the small-data defaults
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 3, 7, 8, 12, 16, 20, 39, 40, 100, 1000])
def test_small_data_defaults_as_stated(n: int) -> None:
    # the README's rule: accumulate so that an epoch holds at least 8 optimizer steps (at most the paper's 5), and
    # train ceil(120 / steps per epoch) epochs, at least 10 and at most 20
    accumulate = 1
    while accumulate < 5 and n // (accumulate + 1) >= 8:
        accumulate += 1
    steps = -(-n // accumulate)
    epochs = min(20, max(10, -(-120 // steps)))
    got = SmallData.of(n)
    assert (got.accumulate, got.steps_per_epoch, got.max_epochs) == (accumulate, steps, epochs)
    assert got.steps_per_epoch >= min(n, 8)  # an epoch never holds fewer steps than the rule's floor
    assert got.args() == ["--trainer.accumulate_grad_batches", str(accumulate), "--trainer.max_epochs", str(epochs)]
    assert SmallData.of(n, epochs=3).max_epochs == 3


@pytest.mark.parametrize(("args", "expected"), [
    ([], 0), (["--data.general_limit", "200"], 0), (["--data.context_prefixes", "4"], 4),
    (["--data.context_prefixes=3", "--data.general_limit", "9"], 3), (["--data.context_prefixes", "0"], 0)])
def test_the_rule_counts_each_example_behind_its_context_prefixes(args, expected) -> None:
    """With --data.context_prefixes N an epoch trains each canonical example N + 1 times (behind each prefix and
    bare): 16 facts with 4 prefixes are 80 batches an epoch, so the rule accumulates 5 (16 steps), not 2 (which
    would have been 40 steps an epoch, not the 8 the plan printed)."""
    assert context_prefixes(args) == expected
    rule = SmallData.of(16 * (1 + context_prefixes(["--data.context_prefixes", "4"])))
    assert (rule.accumulate, rule.steps_per_epoch, rule.max_epochs) == (5, 16, 10)
    for bad in (["--data.context_prefixes", "many"], ["--data.context_prefixes", "-1"], ["--data.context_prefixes"]):
        with pytest.raises(ConfigError, match="context_prefixes"):
            context_prefixes(bad)


def test_fewer_examples_mean_less_accumulation_and_more_epochs() -> None:
    small, large = SmallData.of(12), SmallData.of(200)
    assert (small.accumulate, small.max_epochs) == (1, 10) and (large.accumulate, large.max_epochs) == (5, 10)
    assert SmallData.of(4).max_epochs == 20 and SmallData.of(4).accumulate == 1
    with pytest.raises(ConfigError, match="epochs"):
        SmallData.of(12, epochs=0)


# ----------------------------------------------------------------------------------------------------------------
# the held-out split
# ----------------------------------------------------------------------------------------------------------------
def _read(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("n", [2, 8, 13])
def test_held_out_split_is_disjoint_and_covers_the_examples(tmp_path, n: int) -> None:
    task = _user_task(tmp_path / "task", n=n)
    # a task with evaluation prompts holds those out by default (tests/protocol/test_auto_selection.py)
    plan = plan_data(str(task), tmp_path / "data", holdout=0.25, seed=3, selection="examples")
    train, held = _read(plan.holdout_files["train"]), _read(plan.holdout_files["heldout"])
    every = _read(tmp_path / "task" / "canonical.jsonl")
    want = max(1, min(n - 1, round(0.25 * n)))
    assert len(held) == want and len(train) == n - want
    keys = [json.dumps(r, sort_keys=True) for r in every]
    assert not {json.dumps(r, sort_keys=True) for r in train} & {json.dumps(r, sort_keys=True) for r in held}
    assert sorted(json.dumps(r, sort_keys=True) for r in train + held) == sorted(keys)  # all fields kept
    assert [r["note"] for r in held] == plan.holdout == sorted(random.Random(3).sample(range(n), want))
    # the trials read the training part and are scored on the held-out part; the final fit reads the task itself
    search = get_task(plan.search_task)
    assert search.file("canonical", "val") == Path(plan.holdout_files["train"]).resolve()
    assert search.file("evaluation", "val") == Path(plan.holdout_files["heldout"]).resolve()
    assert search.file("hard_negatives", "val") == (tmp_path / "task" / "hard.jsonl").resolve()
    assert (search.name, search.loss, search.threshold) == ("capitals", "good", pytest.approx(-math.log(0.2)))
    assert plan.final_task == str(task.resolve()) and plan.retrain
    assert (plan.train_examples, plan.final_examples) == (n - want, n)
    # the same seed, the same split; another seed, (here) another one
    again = plan_data(str(task), tmp_path / "again", holdout=0.25, seed=3, selection="examples")
    assert again.holdout == plan.holdout


def test_no_hold_out_for_a_task_with_a_validation_pair(tmp_path, data_root) -> None:
    task = _user_task(tmp_path / "task", split=True)
    plan = plan_data(str(task), tmp_path / "data")
    assert plan.holdout == [] and (plan.search_split, plan.final_split) == ("val", "test")
    builtin = plan_data("country_capital", tmp_path / "b")
    assert builtin.search_task == builtin.final_task == "country_capital" and builtin.holdout == []
    assert builtin.train_examples == len(_read(data_root / "country_capital/split/country_capital_fixed-val.jsonl"))


def test_plain_examples_and_holdout_zero(tmp_path) -> None:
    task = _user_task(tmp_path / "task")
    jsonl = tmp_path / "task" / "canonical.jsonl"
    plan = plan_data(str(jsonl), tmp_path / "data")
    assert not plan.generalization_measured and len(plan.holdout) == 2
    with pytest.raises(ConfigError, match="threshold"):
        plan_data(str(jsonl), tmp_path / "d2", loss="bad")
    same = plan_data(str(task), tmp_path / "d3", holdout=0)
    assert not same.retrain and same.search_task == same.final_task and same.holdout == []
    with pytest.raises(ConfigError, match="cannot be split"):
        plan_data(str(_user_task(tmp_path / "one", n=1)), tmp_path / "d4", selection="examples")


# ----------------------------------------------------------------------------------------------------------------
# the draws
# ----------------------------------------------------------------------------------------------------------------
def test_exploring_draws_cover_each_stratum_once() -> None:
    space = load_space("lora")
    rng = random.Random(0)
    count = 4
    order = {k: rng.sample(range(count), count) for k in space}
    draws = [explore_draw(space, i, count, rng, order) for i in range(count)]
    lows = sorted(math.floor((math.log10(d[LR]) + 6.5) / 4.5 * count) for d in draws)
    assert lows == list(range(count))  # lr 10^U(-6.5, -2): one draw per quarter of the log range
    assert all(1 <= d[RANK] <= 256 and isinstance(d[RANK], int) for d in draws)
    assert all(0.1 <= d[KL] <= 1.0 for d in draws)


def test_the_first_exploring_draw_is_strong_on_the_task_and_protective_of_general_text() -> None:
    space = load_space("lora")
    count = 4
    order = explore_orders(space, count, random.Random(0))
    draws = [explore_draw(space, i, count, random.Random(i), order) for i in range(count)]
    # lr 10^U(-6.5, -2), rank U{1..256}, KL weight 10^U(-1, 0), layer fraction U(0.1, 0.9): the top quarter first
    assert math.log10(draws[0][LR]) >= -2 - 4.5 / 4 - 1e-9 and draws[0][RANK] >= 1 + 255 * 3 / 4 - 1
    assert math.log10(draws[0][KL]) >= -1 / 4 - 1e-9 and draws[0][FRACTION] >= 0.9 - 0.8 / 4 - 1e-9
    for setting in (LR, RANK, KL, FRACTION):
        assert [d[setting] for d in draws] == sorted((d[setting] for d in draws), reverse=True)
    # MEMIT: the highest clamp and the lowest covariance weight (the strongest spread) first
    memit = load_space("memit")
    first = explore_draw(memit, 0, 1, random.Random(0), explore_orders(memit, 1, random.Random(0)))
    assert math.log10(first["model.init_args.memit.clamp_norm_factor"]) >= -1.35 / 4 - 1e-9
    assert first["model.init_args.memit.covariance_weight"] <= 9000 + (75000 - 9000) / 4 + 1
    # a setting with no preferred end gets a seeded permutation of its strata
    assert sorted(explore_orders(memit, count, random.Random(0))["model.init_args.memit.kl_factor"]) == \
        list(range(count))
    # one exploring trial: still the extreme quarter of each such setting, for any seed
    one = explore_orders(space, 1, random.Random(0))
    for seed in range(20):
        d = explore_draw(space, 0, 1, random.Random(seed), one)
        assert math.log10(d[LR]) >= -2 - 4.5 / 4 - 1e-9 and d[RANK] >= 192 and math.log10(d[KL]) >= -0.25 - 1e-9
        assert d[FRACTION] >= 0.7 - 1e-9


def test_a_trial_says_which_way_the_next_draws_go() -> None:
    def trial(epoch: int, last: int, reliability: float) -> Trial:
        return Trial(0, "lora", {}, "explore", "f", status="finished", epoch=epoch, last_epoch=last,
                     reliability=reliability)

    assert trial(10, 10, 0.5).direction == 1  # never left the ball, not reliable: too weak
    assert trial(0, 1, 0.0).direction == -1  # left the ball in its first epoch: too strong
    assert trial(3, 5, 0.5).direction == 0  # inside for three epochs, then out: around it
    assert trial(10, 10, 1.0).direction == 0  # fully reliable inside the ball: around it
    assert Trial(0, "lora", {}, "explore", "f", status="failed").direction == 0


def test_narrowed_draws_stay_in_the_window_and_go_stronger_or_weaker_as_the_best_says() -> None:
    space = load_space("lora")
    best = {LR: 1e-4, RANK: 64, KL: 0.3, "model.init_args.lora.layer_fraction": 0.5}
    rng = random.Random(1)
    for level in (1, 2, 3):
        half = 0.5 ** level / 2
        for _ in range(50):
            d = narrowed_draw(space, best, level, direction=0, rng=rng)
            assert abs(math.log10(d[LR]) + 4) <= 4.5 * half + 1e-9
            assert abs(math.log10(d[KL]) - math.log10(0.3)) <= 1.0 * half + 1e-9
            w = narrowed_draw(space, best, level, direction=1, rng=rng)
            assert 1e-4 * (1 - 1e-9) <= w[LR] <= 10 ** (-4 + 4.5 * 2 * half) * (1 + 1e-9)  # a stronger lr
            assert w[KL] <= 0.3 * (1 + 1e-9) and w[RANK] >= 64  # a weaker pull toward p0, more rank
            s = narrowed_draw(space, best, level, direction=-1, rng=rng)
            assert 10 ** (-4 - 4.5 * 2 * half) * (1 - 1e-9) <= s[LR] <= 1e-4 * (1 + 1e-9)  # a weaker lr
            assert s[KL] >= 0.3 * (1 - 1e-9) and s[RANK] <= 64  # a stronger pull toward p0, less rank
            assert abs(s["model.init_args.lora.layer_fraction"] - 0.5) <= 0.8 * half + 1e-9  # no strength: centred
    # clipped to the space
    edge = narrowed_draw(space, {**best, LR: 1e-2}, 1, direction=1, rng=rng)
    assert edge[LR] <= 1e-2 * (1 + 1e-9)


# ----------------------------------------------------------------------------------------------------------------
# the budget
# ----------------------------------------------------------------------------------------------------------------
def test_a_trial_that_overshoots_is_followed_by_a_step_back_of_its_method(tmp_path, data_root, monkeypatch) -> None:
    import editing.protocol.auto as auto_module

    outcomes = iter([(0, 2), (0, 2), (3, 10), (10, 10), (4, 10)])  # (ball epoch, last epoch) of each trial in turn
    seen: list[tuple[str, dict]] = []

    def fake_run(trial, args, runner, deadline, key, clock) -> None:  # the fit's outcome, without fitting
        seen.append((trial.method, dict(trial.params)))
        trial.status, trial.seconds = "finished", 1.0
        trial.epoch, trial.last_epoch = next(outcomes) if trial.phase != "final" else (3, 10)
        trial.reliability = trial.generalization = 0.0
        # lower is better: lora's best edit is trial 2's (7.0); full stays far from its targets
        score = 10.0 - trial.epoch if trial.method == "lora" else 20.0
        trial.reliability_mean_score, trial.degradation, trial.objective = score, 0.0, 0.0
        _edit_folder(trial, key)

    monkeypatch.setattr(auto_module, "_run", fake_run)
    result = auto_edit(str(_user_task(tmp_path / "task", n=8)), methods=["lora", "full"], ball=1e-3, trials=5,
                       model="tiny-gpt2", output_dir=str(tmp_path / "auto"), seed=0)
    phases = [(t.method, t.phase) for t in result.trials]
    # lora overshoots twice: two steps back before full is explored; then the bisection of the best (lora, trial 2)
    assert phases == [("lora", "explore"), ("lora", "step back (weaker)"), ("lora", "step back (weaker)"),
                      ("full", "explore"), ("lora", "narrow 1")]
    space = load_space("lora")
    for before, after in zip(result.trials[:2], result.trials[1:3], strict=True):
        b, a = before.params, after.params
        # an eighth of each range on the weaker side: lower lr and rank, higher KL weight
        assert -4.5 / 8 - 1e-9 <= math.log10(a[LR]) - math.log10(b[LR]) <= 0
        assert -255 / 8 - 1 <= a[RANK] - b[RANK] <= 0
        assert 0 <= math.log10(a[KL]) - math.log10(b[KL]) <= 1 / 8 + 1e-9
        assert abs(a[FRACTION] - b[FRACTION]) <= 0.8 / 16 + 1e-9
        assert set(a) == set(space)
    assert result.best == 4 and result.final is not None and result.final.method == "lora"


def test_a_method_that_keeps_overshooting_gives_way_after_three_step_backs(tmp_path, data_root,
                                                                          monkeypatch) -> None:
    import editing.protocol.auto as auto_module

    def fake_run(trial, args, runner, deadline, key, clock) -> None:  # every trial overshoots
        trial.status, trial.seconds, trial.epoch, trial.last_epoch = "finished", 1.0, 0, 2
        trial.reliability = trial.generalization = trial.objective = 0.0
        trial.reliability_mean_score, trial.degradation = 30.0, 0.0

    monkeypatch.setattr(auto_module, "_run", fake_run)
    # no edited epoch of any trial inside the ball: no edit, an error (issue 34 item 17) after the record is written
    with pytest.raises(auto_module.NoEditError, match="no edited epoch stayed inside") as info:
        auto_edit(str(_user_task(tmp_path / "task", n=8)), methods=["lora", "full"], ball=1e-3, trials=7,
                  model="tiny-gpt2", output_dir=str(tmp_path / "auto"), seed=0)
    result = info.value.result
    assert [(t.method, t.phase) for t in result.trials] == [
        ("lora", "explore"), *[("lora", "step back (weaker)")] * 3, ("full", "explore"),
        *[("full", "step back (weaker)")] * 2]


def test_a_fit_past_the_deadline_is_killed(tmp_path, data_root) -> None:
    start = time.monotonic()
    code = run_fit_until(["--model", "LoRAEditor", "--model.base.name", "tiny-gpt2", "--data.task",
                          "country_capital"], tmp_path / "fit.log", deadline=time.monotonic() + 1.0)
    assert code == -9 and time.monotonic() - start < 30
    assert "killed at the budget's deadline" in (tmp_path / "fit.log").read_text()


class FakeClock:
    """A clock that a runner advances by a fixed time per fit (the budget logic, without waiting)."""

    def __init__(self, per_fit: float) -> None:
        self.now, self.per_fit = 0.0, per_fit
        self.calls: list[tuple[list[str], float, float | None]] = []

    def __call__(self) -> float:
        return self.now

    def runner(self, args, log_path, deadline):
        self.calls.append((list(args), self.now, deadline))
        code = run_fit_until(args, log_path, None)
        self.now += self.per_fit
        return code


def _max_time_seconds(args: list[str]) -> float:
    d, h, m, s = (int(x) for x in args[args.index("--trainer.max_time") + 1].split(":"))
    return ((d * 24 + h) * 60 + m) * 60 + s


def test_minutes_budget_is_respected(tmp_path, data_root) -> None:
    task = _user_task(tmp_path / "task", n=8)
    clock = FakeClock(per_fit=100.0)
    # the whole-example hold-out (trials on 6 of 8 examples) is what the arithmetic below follows
    result = auto_edit(str(task), methods=["lora"], ball=0.5, minutes=5.0, model="tiny-gpt2",
                       output_dir=str(tmp_path / "auto"), epochs=1, args=TINY_ARGS, clock=clock,
                       runner=clock.runner, selection="examples")
    # t=0: 300 s left, nothing yet to keep for the final fit: trial 0 runs. t=100: the final fit is expected to
    # take 1.2 x 100 s x 8/6 examples = 160 s, leaving 40 s, less than 50 s (half a trial): the search stops and
    # the final fit runs; the whole command ends at t=200 <= 300.
    assert [t.number for t in result.trials] == [0]
    assert len(clock.calls) == 2 and clock.now == 200.0 <= 300.0
    trial_args, t0, deadline = clock.calls[0]
    assert deadline == pytest.approx(300.0) and _max_time_seconds(trial_args) <= 0.75 * 300
    final_args, t1, _ = clock.calls[1]
    assert t1 == 100.0 and _max_time_seconds(final_args) <= 0.75 * 200
    assert result.final is not None and result.final.ok


def test_no_budget_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="give a budget"):
        auto_edit("country_capital", output_dir=str(tmp_path / "a"))
    proc = subprocess.run([sys.executable, "-m", "editing.cli", "auto", "--task", "country_capital", "--trials", "0"],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "at least one trial" in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------------------------------------------
# a search on a tiny model
# ----------------------------------------------------------------------------------------------------------------
def _ball_outcome(results: Path, key: str) -> dict:
    """A fit's outcome in a ball, read from its results.json by key (the SPEC 6 epoch recomputed)."""
    run = json.loads(results.read_text())
    epochs = run["epochs"]
    eps = float(key)
    inside = [e["epoch"] for e in epochs if e["general_nll"] < (1 + eps) * epochs[0]["general_nll"]]
    epoch = epochs[max(inside)]
    assert run["balls"][key]["epoch"] == epoch["epoch"]
    return epoch


def test_auto_returns_the_best_edit_inside_the_ball(tmp_path, data_root) -> None:
    task = _user_task(tmp_path / "task", n=8)
    out = tmp_path / "auto"
    result = auto_edit(str(task), methods=["lora", "full"], ball=1e-2, trials=3, model="tiny-gpt2",
                       output_dir=str(out), epochs=2, patience=None, args=TINY_ARGS, seed=0,
                       selection="examples")  # the whole-example hold-out: trials on 6 of the 8 examples
    record = json.loads((out / "auto.json").read_text())
    assert len(record["trials"]) == 3  # the budget of trials; the final fit comes on top
    assert [t["method"] for t in record["trials"][:2]] == ["lora", "full"]  # each method explored first
    # the best: the largest reliability + generalization at the ball's epoch; then the lower mean canonical score,
    # the smaller degradation, the earlier trial
    outcomes = {}
    for t in record["trials"]:
        e = _ball_outcome(Path(t["folder"]) / "results.json", "1e-02")
        outcomes[t["number"]] = e
        assert t["reliability"] == e["reliability"] and t["generalization"] == e["success_rate"]
        assert t["degradation"] < 1e-2  # inside the ball
        # every trial trained on the 6 training examples, with the small-data defaults (1 step per example)
        data = json.loads((Path(t["folder"]) / "results.json").read_text())["data_files"]
        assert data["canonical"]["examples"] == 6 and data["evaluation"]["examples"] == 2
    best = max(outcomes, key=lambda n: (outcomes[n]["reliability"] + outcomes[n]["success_rate"],
                                        -outcomes[n]["reliability_mean_score"], -outcomes[n]["degradation"], -n))
    assert record["best"] == best
    chosen = record["trials"][best]
    # the final fit: the chosen configuration on all 8 examples, reported on the task's evaluation set
    final = Path(record["final"]["folder"]) / "results.json"
    e = _ball_outcome(final, "1e-02")
    run = json.loads(final.read_text())
    assert run["data_files"]["canonical"]["examples"] == 8 and run["data_files"]["evaluation"]["examples"] == 4
    assert run["method"] == chosen["method"]
    assert (result.final.reliability, result.final.generalization, result.final.locality,
            result.final.degradation) == (e["reliability"], e["success_rate"], e["locality"], e["degradation"])
    assert record["config"]["params"] == chosen["params"]
    # the edit is saved and loads onto its base model; only the best trial keeps an edit
    from editing.edits.load import load_edited

    assert result.edit is not None and load_edited(result.edit).model is not None
    kept = [t["number"] for t in record["trials"] if (Path(t["folder"]) / "edits").exists()]
    assert kept == [best]
    # a second search into the same folder is refused (never overwritten silently)
    with pytest.raises(ResultsExistError, match="already exists"):
        auto_edit(str(task), methods=["lora"], trials=1, model="tiny-gpt2", output_dir=str(out))


# ----------------------------------------------------------------------------------------------------------------
# issue 34 item 17: plain examples (the README's `--task facts.jsonl`), no edit means a non-zero exit, labels
# ----------------------------------------------------------------------------------------------------------------
def _facts(folder: Path, n: int = 8, copies: int = 1) -> Path:
    """``facts.jsonl``: ``n`` country_capital canonical lines (each ``copies`` times in a row)."""
    lines = (SHARED_DATA / "country_capital" / "split" / "country_capital_fixed-val.jsonl").read_text().splitlines()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "facts.jsonl"
    path.write_text("".join((line + "\n") * copies for line in lines[:n]))
    return path


def test_plain_examples_produce_an_edit_with_and_without_a_hold_out(tmp_path, data_root) -> None:
    facts = _facts(tmp_path / "t")
    # --holdout 0: the one trial trains on every example and is the final edit
    same = auto_edit(str(facts), methods=["lora"], ball=0.5, trials=1, model="tiny-gpt2", holdout=0,
                     output_dir=str(tmp_path / "h0"), epochs=1, args=TINY_ARGS)
    assert same.trials[0].ok, same.trials[0].error
    # the held-out default: the trials train on 6, the final fit on all 8 (the README's own example)
    result = auto_edit(str(facts), methods=["lora"], ball=0.5, trials=1, model="tiny-gpt2",
                       output_dir=str(tmp_path / "auto"), epochs=1, args=TINY_ARGS)
    assert result.final is not None and result.final.ok, result.final.error
    run = json.loads((Path(result.final.folder) / "results.json").read_text())
    assert run["data_files"]["canonical"]["examples"] == 8
    assert result.edit is not None and Path(result.edit).is_dir()
    # without --evaluation the final's evaluation set is the canonical file: its "generalization" is training-set
    # success, never reported as generalization (null in auto.json, said so on the console)
    record = json.loads((tmp_path / "auto" / "auto.json").read_text())
    assert record["final"]["generalization"] is None and record["final"]["generalization_mean_score"] is None
    assert record["plan"]["generalization_measured"] is False
    from editing.protocol.auto import summary_text

    text = summary_text(result)
    assert "epoch None" not in text and "not measured" in text
    # --holdout 0 without --evaluation: the trials' evaluation set is the canonical file too
    assert same.trials[0].generalization is None and "not measured" in summary_text(same)


def test_duplicate_canonical_examples_split_by_the_hold_out_are_warned_about(tmp_path, capsys) -> None:
    facts = _facts(tmp_path / "t", n=3, copies=3)  # every example three times: a held-out one has a copy in training
    plan = plan_data(str(facts), tmp_path / "data", holdout=0.25, seed=0)
    err = capsys.readouterr().err
    assert plan.holdout and "facts.jsonl" in err and "duplicate" in err and "line" in err
    # no duplicates, no warning
    plan_data(str(_facts(tmp_path / "u", n=8)), tmp_path / "d2", holdout=0.25, seed=0)
    assert "duplicate" not in capsys.readouterr().err


def test_a_search_that_produced_no_edit_is_an_error_after_writing_its_record(tmp_path, data_root,
                                                                            monkeypatch) -> None:
    import editing.protocol.auto as auto_module
    from editing.core.errors import EditingError

    def failing(trial, args, runner, deadline, key, clock) -> None:
        trial.status, trial.seconds, trial.error = "failed", 1.0, "editing fit exited with 2"

    monkeypatch.setattr(auto_module, "_run", failing)
    with pytest.raises(EditingError, match="no trial finished") as info:
        auto_edit(str(_user_task(tmp_path / "task", n=8)), methods=["lora"], trials=2, model="tiny-gpt2",
                  output_dir=str(tmp_path / "a"))
    assert "fit.log" in str(info.value)
    assert len(json.loads((tmp_path / "a" / "auto.json").read_text())["trials"]) == 2  # the record is kept

    def final_fails(trial, args, runner, deadline, key, clock) -> None:
        trial.status, trial.seconds = "finished", 1.0
        if trial.phase == "final":
            trial.status, trial.error = "failed", "editing fit exited with 1"
            return
        trial.epoch, trial.last_epoch = 3, 10
        trial.reliability = trial.generalization = 0.5
        trial.reliability_mean_score, trial.degradation, trial.objective = 1.0, 0.0, 1.0

    monkeypatch.setattr(auto_module, "_run", final_fails)
    with pytest.raises(EditingError, match="final fit failed"):
        auto_edit(str(_user_task(tmp_path / "task2", n=8)), methods=["lora"], trials=1, model="tiny-gpt2",
                  output_dir=str(tmp_path / "b"))
    text = auto_module.summary_text(auto_module.AutoResult(**{
        **{k: None for k in auto_module.AutoResult.__dataclass_fields__},
        "folder": "f", "ball": "1e-03", "trials": [], "seconds": 1.0, "config": {}, "plan": {
            "generalization_measured": True},
        "final": Trial(-1, "lora", {}, "final", "f", status="failed", error="editing fit exited with 1")}))
    assert "epoch None" not in text and "failed" in text


# ----------------------------------------------------------------------------------------------------------------
# issue 34 item 16: the final edit on the test pair is capped at the epoch chosen at validation
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("split", [True, False])
def test_the_final_fit_is_capped_at_the_best_trials_ball_epoch(tmp_path, data_root, monkeypatch, split) -> None:
    import editing.protocol.auto as auto_module

    finals: list[list[str]] = []

    def fake_run(trial, args, runner, deadline, key, clock) -> None:
        if trial.phase == "final":
            finals.append(list(args))
        trial.status, trial.seconds, trial.epoch, trial.last_epoch = "finished", 1.0, 4, 10
        trial.reliability = trial.generalization = 0.5
        trial.reliability_mean_score, trial.degradation, trial.objective = 1.0, 0.0, 1.0
        _edit_folder(trial, key)

    monkeypatch.setattr(auto_module, "_run", fake_run)
    auto_edit(str(_user_task(tmp_path / "task", n=8, split=split)), methods=["lora"], ball=1e-3, trials=1,
              model="tiny-gpt2", output_dir=str(tmp_path / "a"))
    (args,) = finals
    # the validation's choice (epoch 4 of the 1e-3 ball) caps the test pair's epoch, as editing test-runs does
    assert "--budget.max_epoch" in args and json.loads(args[args.index("--budget.max_epoch") + 1]) == {"1e-03": 4}
    assert args[args.index("--data.split") + 1] == ("test" if split else "val")


# ----------------------------------------------------------------------------------------------------------------
# issue 34 item 11: an interrupted search resumes (finished trials kept); only a finished one needs --overwrite
# ----------------------------------------------------------------------------------------------------------------
class Interrupt(KeyboardInterrupt):
    pass


def _scripted_run(calls: list[int], stop_at: int | None = None):
    """A fit outcome per trial number (no fitting); Ctrl-C (KeyboardInterrupt) in trial ``stop_at``."""

    def fake_run(trial, args, runner, deadline, key, clock) -> None:
        calls.append(trial.number)
        Path(trial.folder).mkdir(parents=True, exist_ok=True)
        (Path(trial.folder) / "fit.log").write_text(f"trial {trial.number}\n")
        if trial.number == stop_at:
            raise Interrupt()
        n = max(trial.number, 0)
        trial.status, trial.seconds, trial.epoch, trial.last_epoch = "finished", 1.0, (n % 3) + 1, 10
        trial.reliability = trial.generalization = 0.25
        trial.reliability_mean_score, trial.degradation, trial.objective = 5.0 - n, 0.0, 0.5
        _edit_folder(trial, key)

    return fake_run


def test_an_interrupted_search_resumes_keeping_its_finished_trials(tmp_path, data_root, monkeypatch) -> None:
    import editing.protocol.auto as auto_module

    task = str(_user_task(tmp_path / "task", n=8))
    kw = dict(methods=["lora", "full"], ball=1e-3, trials=4, model="tiny-gpt2", seed=0)
    # the same search uninterrupted, for reference
    calls: list[int] = []
    monkeypatch.setattr(auto_module, "_run", _scripted_run(calls))
    whole = auto_edit(task, output_dir=str(tmp_path / "whole"), **kw)
    # interrupted in trial 2 (Ctrl-C): trials 0 and 1 are finished
    calls = []
    monkeypatch.setattr(auto_module, "_run", _scripted_run(calls, stop_at=2))
    with pytest.raises(KeyboardInterrupt):
        auto_edit(task, output_dir=str(tmp_path / "a"), **kw)
    assert calls == [0, 1] + [2] and not (tmp_path / "a" / "auto.json").exists()
    # the same command again resumes: trials 0 and 1 are not fitted again, trial 2 starts afresh
    calls = []
    monkeypatch.setattr(auto_module, "_run", _scripted_run(calls))
    resumed = auto_edit(task, output_dir=str(tmp_path / "a"), **kw)
    assert calls == [2, 3, -1]
    assert [(t.method, t.params, t.phase) for t in resumed.trials] == \
        [(t.method, t.params, t.phase) for t in whole.trials]
    assert resumed.best == whole.best and resumed.final is not None and resumed.final.ok
    # the interrupted trial's files are kept aside, not deleted
    assert [p.name.split(".")[0] for p in (tmp_path / "a").glob("trial_2.interrupted-*")] == ["trial_2"]
    # a finished search is refused without --overwrite (and starts again from scratch with it)
    with pytest.raises(ResultsExistError, match="finished"):
        auto_edit(task, output_dir=str(tmp_path / "a"), **kw)
    calls = []
    monkeypatch.setattr(auto_module, "_run", _scripted_run(calls))
    auto_edit(task, output_dir=str(tmp_path / "a"), overwrite=True, **kw)
    assert calls == [0, 1, 2, 3, -1]


def test_an_interrupted_search_resumed_with_other_settings_is_refused(tmp_path, data_root, monkeypatch) -> None:
    import editing.protocol.auto as auto_module

    task = str(_user_task(tmp_path / "task", n=8))
    calls: list[int] = []
    monkeypatch.setattr(auto_module, "_run", _scripted_run(calls, stop_at=1))
    with pytest.raises(KeyboardInterrupt):
        auto_edit(task, methods=["lora"], trials=3, model="tiny-gpt2", output_dir=str(tmp_path / "a"))
    with pytest.raises(ConfigError, match=r"--model.*tiny-gpt2.*tiny-llama.*--overwrite true"):
        auto_edit(task, methods=["lora"], trials=3, model="tiny-llama", output_dir=str(tmp_path / "a"))
    # a larger budget is not another search: it resumes
    calls = []
    monkeypatch.setattr(auto_module, "_run", _scripted_run(calls))
    auto_edit(task, methods=["lora"], trials=4, model="tiny-gpt2", output_dir=str(tmp_path / "a"))
    assert calls == [1, 2, 3, -1]


def test_a_search_interrupted_in_its_final_fit_resumes_with_the_real_fits_kept(tmp_path, data_root) -> None:
    facts = _facts(tmp_path / "t")
    out = tmp_path / "auto"
    fits: list[str] = []

    def runner(args, log_path, deadline):
        fits.append(Path(log_path).parent.name)
        if Path(log_path).parent.name == "final":
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
            Path(log_path).write_text("interrupted\n")
            raise KeyboardInterrupt  # Ctrl-C while the final fit runs
        return run_fit_until(args, log_path, None)

    kw = dict(methods=["lora"], ball=0.5, trials=1, model="tiny-gpt2", output_dir=str(out), epochs=1,
              args=TINY_ARGS)
    with pytest.raises(KeyboardInterrupt):
        auto_edit(str(facts), runner=runner, **kw)
    trial_results = (out / "trial_0" / "results.json").read_text()
    assert fits == ["trial_0", "final"] and (out / "auto.progress.json").is_file()
    fits.clear()
    result = auto_edit(str(facts), runner=lambda a, p, d: fits.append(Path(p).parent.name) or run_fit_until(a, p, d),
                       **kw)
    assert fits == ["final"]  # the finished trial is not fitted again
    assert (out / "trial_0" / "results.json").read_text() == trial_results
    assert result.final is not None and result.final.ok and result.edit is not None
    assert not (out / "auto.progress.json").exists() and (out / "auto.json").is_file()
    assert [p.name.split(".")[0] for p in out.glob("final.interrupted-*")] == ["final"]


# ----------------------------------------------------------------------------------------------------------------
# issue 36: the trials report their best epoch inside the ball; the final fit keeps the test rule
# ----------------------------------------------------------------------------------------------------------------
def test_the_trials_report_their_best_epoch_and_the_final_fit_the_last_inside(tmp_path, data_root,
                                                                             monkeypatch) -> None:
    import editing.protocol.auto as auto_module

    seen: dict[str, list[list[str]]] = {}

    def fake_run(trial, args, runner, deadline, key, clock) -> None:
        seen.setdefault(trial.phase, []).append(list(args))
        trial.status, trial.seconds, trial.epoch, trial.last_epoch = "finished", 1.0, 2, 10
        trial.reliability = trial.generalization = 0.5
        trial.reliability_mean_score, trial.degradation, trial.objective = 1.0, 0.0, 1.0
        _edit_folder(trial, key)

    monkeypatch.setattr(auto_module, "_run", fake_run)
    auto_edit(str(_user_task(tmp_path / "task", n=8)), methods=["lora"], ball=1e-3, trials=2, model="tiny-gpt2",
              output_dir=str(tmp_path / "a"))
    trials = [a for phase, runs in seen.items() if phase != "final" for a in runs]
    (final,) = seen["final"]
    assert len(trials) == 2
    for args in trials:
        assert args[args.index("--budget.epoch_rule") + 1] == "best"
        assert args[args.index("--budget.best_patience") + 1] == "3" and "--budget.stop_at_cap" not in args
    assert "--budget.epoch_rule" not in final  # SPEC section 6's rule, capped at the best trial's chosen epoch
    assert "--budget.best_patience" not in final
    assert json.loads(final[final.index("--budget.max_epoch") + 1]) == {"1e-03": 2}
    assert final[final.index("--budget.stop_at_cap") + 1] == "true"  # it stops after epoch 2


def test_the_final_fits_reserve_counts_the_epochs_it_trains(tmp_path, data_root) -> None:
    from editing.protocol.auto import _open_search

    search = _open_search(task=str(_user_task(tmp_path / "task", n=8)), methods=["lora"], ball=1e-3, trials=None,
                          minutes=30, model="tiny-gpt2", output_dir=str(tmp_path / "a"), holdout=0.25, explore=1,
                          epochs=None, patience=None, args=None, loss="good", threshold=None, evaluation=None,
                          hard_negatives=None, seed=0, overwrite=False, clock=None, runner=None)
    plan = search.plan
    trial = Trial(0, "lora", {}, "explore", "f", status="finished", seconds=110.0, epoch=2, last_epoch=10,
                  objective=1.0, reliability=1.0)
    search.done.append(trial)
    # epochs 0..2 of the trial's 0..10, scaled to the final fit's examples, plus 20%
    want = 1.2 * 110.0 * (3 / 11) * plan.final_examples / plan.train_examples
    assert plan.retrain and math.isclose(search.final_reserve(), want)
    trial.epoch = 10
    assert math.isclose(search.final_reserve(), 1.2 * 110.0 * plan.final_examples / plan.train_examples)


def test_a_trial_at_an_early_best_epoch_that_ended_inside_the_ball_is_still_too_weak(tmp_path, monkeypatch,
                                                                                    data_root) -> None:
    """The narrowing's direction reads whether the edit ended inside the ball, not whether its reported epoch is its
    last: under the best rule an edit inside the ball throughout, best at epoch 1 and never fully reliable, is too
    weak (+1); one that left the ball after its best epoch is not (0). Real (tiny, scripted) fits' results.json."""
    from fakes import scripted_fit

    for factors, want in (([1.0, 1 + 1e-4, 1 + 2e-4, 1 + 3e-4], 1), ([1.0, 1 + 1e-4, 1 + 2e-4, 1 + 3e-3], 0)):
        folder = tmp_path / f"t{want}"
        scripted_fit(folder, monkeypatch, factors, epochs=3, reliability=[0.0, 0.75, 0.5, 0.5], balls=[1e-3],
                     epoch_rule="best")
        trial = Trial(0, "lora", {}, "explore", str(folder / "run"))
        trial.read_results("1e-03")
        assert (trial.epoch, trial.last_epoch, trial.reliability) == (1, 3, 0.75)
        assert trial.last_inside is (want == 1) and trial.direction == want
