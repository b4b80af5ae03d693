"""The protocol at scale: search spaces, the shared trial budget, workers on one study (SQLite, PostgreSQL), a
killed worker, selection and test runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO_DIR
from fakes import FakeFit, FakeTestRun

from editing.cli import main
from editing.core.errors import ConfigError
from editing.core.paths import SPACE_DIR
from editing.protocol import select, storage, test_runs
from editing.protocol.select import select_best
from editing.protocol.space import load_space, make_sampler, parse_space
from editing.protocol.storage import make_storage, open_study
from editing.protocol.sweep import make_definition, run_worker, study_status
from editing.protocol.trials import overrides
from editing.runs.records import Selection, TrialRecord

SPACES = sorted(SPACE_DIR.glob("*.yaml"))
# a trial on a tiny random model: a few seconds
TINY_ARGS = "--data.eval_limit 4 --data.general_limit 4 --trainer.max_epochs 2 --trainer.limit_train_batches 3"
POSTGRES_URL = os.environ.get("EDITING_TEST_POSTGRES_URL")


def _storages() -> list:
    pg = pytest.param("postgres", marks=pytest.mark.skipif(
        not POSTGRES_URL, reason="EDITING_TEST_POSTGRES_URL is not set (.ci/run sets it when PostgreSQL starts)"))
    return ["sqlite", pg]


def _url(kind: str, tmp_path: Path, name: str) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / name / 'study.db'}"
    return POSTGRES_URL


def _unique(name: str) -> str:
    # PostgreSQL studies outlive a test run: a fresh name per run
    return f"{name}-{os.getpid()}-{time.time_ns()}"


# ---------------------------------------------------------------------------------------------------------------
# search spaces
# ---------------------------------------------------------------------------------------------------------------
def test_spec_distributions() -> None:
    lora = load_space("lora")
    assert {k: (p.kind, p.args) for k, p in lora.items()} == {
        "model.init_args.optimizer.lr": ("log10_uniform", (-6.5, -2.0)),
        "model.init_args.lora.rank": ("int_uniform", (1, 256)),
        "model.init_args.lora.layer_fraction": ("uniform", (0.1, 0.9)),
        "model.init_args.regularization.weight": ("log10_uniform", (-1.0, 0.0)),
    }
    full = load_space("full")
    assert full["model.init_args.optimizer.lr"].args == (-8.5, -4.0)
    assert full["model.init_args.regularization.weight"].args == (-1.0, 0.0)
    memit = load_space("memit")
    assert {k.rsplit(".", 1)[1]: (p.kind, p.args) for k, p in memit.items()} == {
        "clamp_norm_factor": ("log10_uniform", (-1.35, 0.0)),
        "covariance_weight": ("int_uniform", (9000, 75000)),
        "kl_factor": ("uniform", (0.001, 0.1)),
    }


@pytest.mark.parametrize("path", SPACES, ids=[p.stem for p in SPACES])
def test_search_space_keys_are_fit_keys(path: Path, capsys, monkeypatch) -> None:
    """Every key of a method's search space is a real `editing fit` key of its base config: the sampled value
    reaches the parsed config (a typo fails here, not hours into a sweep)."""
    method = path.stem
    space = load_space(method)
    base = REPO_DIR / "lightning_configs" / "fit" / f"{method}.yaml"
    if not base.is_file():
        pytest.skip(f"no base fit config for method {method}")
    # a value inside each distribution, distinct from the base config's
    values = {}
    for key, p in space.items():
        if p.kind == "categorical":
            values[key] = p.args[-1]
        elif p.kind == "int_uniform":
            values[key] = int(p.args[1])
        elif p.kind == "log10_uniform":
            values[key] = 10.0 ** ((p.args[0] + p.args[1]) / 2)
        else:
            values[key] = (p.args[0] + p.args[1]) / 2
    monkeypatch.chdir(REPO_DIR)
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(base), *overrides(values), "--print_config"])
    assert info.value.code in (0, None), capsys.readouterr().err
    printed = yaml.safe_load(capsys.readouterr().out)
    for key, value in values.items():
        node = printed
        for part in key.split("."):
            node = node[part]
        assert node == pytest.approx(value), key


@pytest.mark.parametrize("spec, message", [
    ({"lr": {"uniform": [0, 1]}}, "dotted key"),
    ({"model.lr": {"normal": [0, 1]}}, "expected one of"),
    ({"model.lr": {"uniform": [1, 0]}}, "bad bounds"),
    ({"model.rank": {"int_uniform": [1.5, 3]}}, "bad bounds"),
    ({"model.rank": {"categorical": []}}, "needs a list"),
])
def test_bad_search_spaces(spec, message) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_space(spec)


def test_space_overrides_and_new_methods(tmp_path) -> None:
    """A method's space is a YAML file; later files and --params override entries key by key."""
    mine = tmp_path / "mine.yaml"
    mine.write_text("method: lora\nparameters:\n  model.init_args.lora.rank: {categorical: [4, 8]}\n")
    space = load_space("lora", [str(SPACE_DIR / "lora.yaml"), str(mine)],
                       {"model.init_args.optimizer.lr": {"log10_uniform": [-4, -3]}})
    assert space["model.init_args.lora.rank"].args == (4, 8)
    assert space["model.init_args.optimizer.lr"].args == (-4, -3)
    assert space["model.init_args.lora.layer_fraction"].args == (0.1, 0.9)
    with pytest.raises(ConfigError, match="no search space"):
        load_space("no_such_method")


def test_sampler_depends_on_seed_and_trial_number_only() -> None:
    import optuna

    space = load_space("lora")

    def draw(seed: int, n: int) -> list[dict]:
        study = optuna.create_study(sampler=make_sampler(seed), direction="maximize")
        out = []
        for _ in range(n):
            trial = study.ask()
            out.append({k: p.suggest(trial) for k, p in space.items()})
            study.tell(trial, 0.0)
        return out

    a, b, c = draw(0, 6), draw(0, 6), draw(1, 6)
    assert a == b and a != c
    assert len({json.dumps(x, sort_keys=True) for x in a}) == 6
    for x in a:
        assert 10 ** -6.5 <= x["model.init_args.optimizer.lr"] <= 10 ** -2
        assert isinstance(x["model.init_args.lora.rank"], int) and 1 <= x["model.init_args.lora.rank"] <= 256
        assert 0.1 <= x["model.init_args.lora.layer_fraction"] <= 0.9
        assert 0.1 <= x["model.init_args.regularization.weight"] <= 1.0


# ---------------------------------------------------------------------------------------------------------------
# the trial budget with in-process fake fits (fast)
# ---------------------------------------------------------------------------------------------------------------




def test_workers_share_the_trial_budget(tmp_path) -> None:
    """Three workers asking at once on one SQLite study run exactly n_trials fits, each configuration once."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    definition = make_definition("country_capital", "lora", "tiny-gpt2", args=[])
    fit = FakeFit()
    errors = []

    def worker() -> None:
        try:
            study = open_study(make_storage(url, heartbeat_interval=1), "s", definition)
            run_worker(study, definition, tmp_path / "s", n_trials=5, poll=0.2, runner=fit, log=lambda m: None)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    study = open_study(make_storage(url, None), "s")
    trials = study.get_trials()
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == 5 and len(fit.calls) == 5
    outputs = [c[c.index("--budget.output_dir") + 1] for c in fit.calls]
    assert len(set(outputs)) == 5  # no trial ran twice
    assert {Path(o).name for o in outputs} == {f"trial_{t.number}" for t in complete}
    # anything else is a surplus trial, pruned without running
    assert all(t.state.name == "PRUNED" and t.user_attrs.get("surplus") for t in trials if t not in complete)
    status = study_status(study)
    assert status["counts"]["complete"] == 5 and status["counts"]["running"] == 0
    best = max(complete, key=lambda t: t.user_attrs["balls"]["1e-03"]["success_change_pp"])
    assert status["best"]["1e-03"].trial == best.number


def test_joining_with_other_settings_is_refused(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    open_study(make_storage(url, None), "s", make_definition("country_capital", "lora", "tiny-gpt2", args=[]))
    other = make_definition("country_capital", "lora", "tiny-gpt2", args=["--trainer.max_epochs", "3"])
    with pytest.raises(ConfigError, match="args"):
        open_study(make_storage(url, None), "s", other)


# ---------------------------------------------------------------------------------------------------------------
# selection and test runs
# ---------------------------------------------------------------------------------------------------------------
def test_selection_rule() -> None:
    records = [
        {"trial": 0, "params": {"lr": 1}, "balls": {"1e-03": {"epoch": 3, "success_change_pp": 10.0,
                                                              "degradation": 5e-4},
                                                    "1e-05": {"epoch": 0, "success_change_pp": 0.0,
                                                              "degradation": 0.0}}},
        {"trial": 1, "params": {"lr": 2}, "balls": {"1e-03": {"epoch": 2, "success_change_pp": 12.5,
                                                              "degradation": 9e-4},
                                                    "1e-05": {"epoch": 1, "success_change_pp": 2.0,
                                                              "degradation": 8e-6}}},
        # ties the best 1e-05 gain with a smaller degradation: wins the tie
        {"trial": 2, "params": {"lr": 3}, "balls": {"1e-03": {"epoch": 1, "success_change_pp": 2.0,
                                                              "degradation": 1e-6},
                                                    "1e-05": {"epoch": 1, "success_change_pp": 2.0,
                                                              "degradation": 1e-6}}},
        # the same as trial 2: the earlier trial keeps the tie
        {"trial": 3, "params": {"lr": 4}, "balls": {"1e-05": {"epoch": 1, "success_change_pp": 2.0,
                                                              "degradation": 1e-6}}},
        # a non-finite gain never wins
        {"trial": 4, "params": {"lr": 5}, "balls": {"1e-03": {"epoch": 1, "success_change_pp": float("nan"),
                                                              "degradation": 0.0}}},
    ]
    best = select_best([TrialRecord.from_dict(r) for r in records])
    assert list(best) == ["1e-03", "1e-05"]
    assert best["1e-03"].to_dict() == {"trial": 1, "params": {"lr": 2}, "epoch": 2, "success_change_pp": 12.5,
                                       "degradation": 9e-4}
    assert best["1e-05"].trial == 2 and best["1e-05"].epoch == 1


def test_select_and_test_runs_from_a_study(tmp_path, capsys) -> None:
    """select reads the study; test-runs reruns each selected trial per seed on the test split with the epoch cap,
    one run per (trial, seed) for all balls that chose it, skipping finished seeds."""
    root = tmp_path / "sweeps"
    definition = make_definition("country_capital", "lora", "tiny-gpt2", args=["--trainer.max_epochs", "3"])
    url = f"sqlite:///{root / 'st' / 'study.db'}"
    study = open_study(make_storage(url, None), "st", definition)
    run_worker(study, definition, root / "st", n_trials=3, runner=FakeFit(0), log=lambda m: None)
    selection = main_select(root)
    # the fake gain grows as the learning rate falls: the smallest lr wins every ball
    lrs = {t.number: t.params["model.init_args.optimizer.lr"] for t in study.get_trials()}
    winner = min(lrs, key=lrs.get)
    assert {b["trial"] for b in selection["balls"].values()} == {winner}
    assert {k: b["epoch"] for k, b in selection["balls"].items()} == {"1e-03": 2, "1e-05": 1}
    assert test_runs.test_run_plan(Selection.from_dict(selection)) == {
        winner: {"params": selection["balls"]["1e-03"]["params"], "max_epoch": {"1e-03": 2, "1e-05": 1}}}

    runner = FakeTestRun()
    calls = runner.calls

    paths = test_runs.test_runs("st", root=str(root), seeds=2, runner=runner)
    assert len(paths) == 2 and len(calls) == 2
    for seed, args in enumerate(calls):
        assert args[args.index("--data.split") + 1] == "test"
        assert args[args.index("--seed_everything") + 1] == str(seed) == args[args.index("--data.seed") + 1]
        assert json.loads(args[args.index("--budget.max_epoch") + 1]) == {"1e-03": 2, "1e-05": 1}
        assert args[args.index("--trainer.max_epochs") + 1] == "3"  # the validation schedule, unchanged
        assert args[args.index("--model.init_args.optimizer.lr") + 1] == repr(lrs[winner])
        assert Path(args[args.index("--budget.output_dir") + 1]).parts[-3:] == ("test", f"trial_{winner}",
                                                                                f"seed_{seed}")
    # resumable: finished seeds are skipped, a new one runs; an interrupted one is moved aside and rerun
    partial = root / "st" / "test" / f"trial_{winner}" / "seed_2"
    partial.mkdir()
    (partial / "config.yaml").write_text("interrupted\n")
    assert test_runs.test_runs("st", root=str(root), seeds=3, runner=runner) and len(calls) == 3
    assert (partial / "results.json").is_file() and not (partial / "config.yaml").exists()
    assert [p.name.split(".")[1].split("-")[0] for p in partial.parent.glob("seed_2.*")] == ["interrupted"]
    # without a study name: every sweep under the root, or in the storage
    assert storage.study_names(str(root)) == ["st"] == storage.study_names(storage=url)
    assert select.select(root=str(root))["st"].to_dict()["balls"] == selection["balls"]
    assert len(test_runs.test_runs(root=str(root), seeds=3, runner=runner)) == 3 and len(calls) == 3


def test_fit_settings_spell_the_trial_and_test_run_command_lines(tmp_path) -> None:
    """The typed settings give the command lines the protocol has always run (later options override earlier
    ones, so the order matters: the sweep's --args, then the sampled values, then what the protocol fixes)."""
    definition = make_definition("country_capital", "lora", "tiny-gpt2", args=["--trainer.max_epochs", "3"])
    base, out = tmp_path / "base.yaml", tmp_path / "trial_0"
    params = {"model.init_args.optimizer.lr": 0.001, "model.init_args.lora.rank": 4}
    trial = definition.fit_settings(base, out, params=params, save_edits=False).args()
    # the paper's protocol: its config's accumulation and epochs, all of G (issue 36 item 6)
    shared = ["--config", str(base), "--data.task", "country_capital", "--model.init_args.base.name", "tiny-gpt2",
              "--small_data", "false", "--budget.general_sample", "all", "--trainer.max_epochs", "3",
              "--model.init_args.optimizer.lr", "0.001", "--model.init_args.lora.rank", "4"]
    quiet = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary",
             "false", "--checkpoint.save_top_k", "0", "--checkpoint.save_last", "false"]
    folders = ["--trainer.default_root_dir", str(out), "--budget.output_dir", str(out)]
    assert trial == [*shared, *quiet, *folders, "--budget.save_edits", "false"]
    test = definition.fit_settings(base, out, params=params, split="test", seed=7, max_epoch={"1e-03": 2},
                                   extra=("--data.eval_limit", "5")).args()
    assert test == [*shared, "--data.split", "test", "--seed_everything", "7", "--data.seed", "7",
                    "--budget.max_epoch", '{"1e-03": 2}', *quiet, *folders, "--data.eval_limit", "5"]


def main_select(root: Path) -> dict:
    main(["select", "--study_name", "st", "--root", str(root)])
    return json.loads((root / "st" / "selection.json").read_text())


# ---------------------------------------------------------------------------------------------------------------
# real workers (subprocesses, tiny model): two at once, and a killed one
# ---------------------------------------------------------------------------------------------------------------
def _worker(root: Path, url: str, name: str, n: int, heartbeat: int = 1) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_DIR), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "editing.cli", "sweep", "--task", "country_capital", "--method", "lora", "--model",
           "tiny-gpt2", "--n_trials", str(n), "--root", str(root), "--study_name", name, "--storage", url,
           f"--args={TINY_ARGS}", "--heartbeat_interval", str(heartbeat), "--grace_period", str(4 * heartbeat),
           "--poll", "1", "--params", '{"model.init_args.lora.rank": {"int_uniform": [1, 8]}}']
    log_path = root.parent / f"worker-{time.time_ns()}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=root.parent, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    proc.log_path = log_path
    return proc


def _wait(proc: subprocess.Popen, timeout: float = 600) -> None:
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert code == 0, proc.log_path.read_text()[-3000:]


def _check_trials(study, n: int, root: Path, name: str) -> list:
    trials = study.get_trials()
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == n
    for t in complete:
        results = root / name / f"trial_{t.number}" / "results.json"
        assert results.is_file() and t.user_attrs["results"] == str(results)
        record = json.loads(results.read_text())
        assert record["split"] == "val" and record["model"]["name"] == "tiny-gpt2"
        assert record["hyperparameters"]["lora"]["rank"] == t.params["model.init_args.lora.rank"]
        # each trial's fit ran exactly once
        log = (root / name / f"trial_{t.number}" / "fit.log").read_text()
        assert log.count("$ editing fit") == 1
    assert len({json.dumps(t.params, sort_keys=True) for t in complete}) == n
    return trials


@pytest.mark.parametrize("kind", _storages())
def test_two_worker_processes_finish_the_study(tmp_path, data_root, kind: str) -> None:
    root = tmp_path / "sweeps"
    name = _unique("two") if kind == "postgres" else "two"
    url = _url(kind, root, name)
    workers = [_worker(root, url, name, n=4)]
    time.sleep(1)  # the second joins a study that exists (creation itself is retried on collisions too)
    workers.append(_worker(root, url, name, n=4))
    for w in workers:
        _wait(w)
    study = open_study(make_storage(url, None), name)
    trials = _check_trials(study, 4, root, name)
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    logs = [w.log_path.read_text() for w in workers]
    ran = [int(log.rsplit("this worker ran ", 1)[1].split()[0]) for log in logs]
    assert sum(ran) == 4


@pytest.mark.parametrize("kind", _storages())
def test_killed_worker_is_retried_and_the_study_completes(tmp_path, data_root, kind: str) -> None:
    root = tmp_path / "sweeps"
    name = _unique("kill") if kind == "postgres" else "kill"
    url = _url(kind, root, name)
    worker = _worker(root, url, name, n=3)
    first_log = root / name / "trial_0" / "fit.log"
    deadline = time.time() + 300
    while not (first_log.is_file() and "$ editing fit" in first_log.read_text()):  # trial 0's fit has started
        assert worker.poll() is None and time.time() < deadline, "the worker did not start a trial"
        time.sleep(0.2)
    time.sleep(2)
    os.kill(worker.pid, signal.SIGKILL)  # the worker only: its fit dies with it (PR_SET_PDEATHSIG)
    worker.wait()
    assert not (root / name / "trial_0" / "results.json").exists()
    restarted = _worker(root, url, name, n=3)
    _wait(restarted)
    study = open_study(make_storage(url, None), name)
    trials = _check_trials(study, 3, root, name)
    killed = trials[0]
    assert killed.state.name == "FAIL"
    retry = [t for t in trials if t.user_attrs.get("retry_of") == 0]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE" and retry[0].params == killed.params
    assert study_status(study)["counts"] == {"complete": 3, "running": 0, "waiting": 0, "failed": 0, "retried": 1,
                                             "surplus": 0}
