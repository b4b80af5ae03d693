"""``editing report`` on a constructed set of run results: the selection rule, seed means and standard errors,
the table cells (Markdown, LaTeX) and the plots."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
from fakes import fake_results

from editing.cli import main
from editing.protocol.report import Cell, average_cells, mean_se
from editing.protocol.select import select_best
from editing.runs.records import Selection, TrialRecord

# validation outcome per (task, method): trial -> {ball: (epoch, gain)}
VALIDATION = {
    ("country_capital", "lora"): {0: {"1e-03": (3, 30.0), "1e-05": (1, 2.0)},
                                  1: {"1e-03": (2, 35.0), "1e-05": (0, 0.0)}},
    ("country_capital", "full"): {0: {"1e-03": (2, 10.0), "1e-05": (1, 1.0)}},
    ("stereoset", "lora"): {0: {"1e-03": (1, 5.0), "1e-05": (1, 5.0)},
                            1: {"1e-03": (2, 4.0), "1e-05": (2, 6.0)}},
    ("stereoset", "full"): {0: {"1e-03": (1, 1.0), "1e-05": (1, 1.0)}},
}
# test gains per (task, method, ball) over three seeds, and the initial success rate per task
TEST = {
    ("country_capital", "lora", "1e-03"): [10.0, 20.0, 30.0],
    ("country_capital", "lora", "1e-05"): [1.0, 2.0, 6.0],
    ("country_capital", "full", "1e-03"): [4.0, 4.0, 7.0],
    ("country_capital", "full", "1e-05"): [0.0, 0.0, 0.0],
    ("stereoset", "lora", "1e-03"): [2.0, 3.0, 4.0],
    ("stereoset", "lora", "1e-05"): [5.0, 6.0, 10.0],
    ("stereoset", "full", "1e-03"): [-1.0, 0.0, 1.0],
    ("stereoset", "full", "1e-05"): [0.0, 1.0, 2.0],
}
INITIAL = {"country_capital": 0.25, "stereoset": 0.5}


def _se(values):
    return statistics.stdev(values) / math.sqrt(len(values))


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory) -> Path:
    """Sweep folders as select and test-runs leave them, with hand-made results."""
    root = tmp_path_factory.mktemp("sweeps")
    for (task, method), trials in VALIDATION.items():
        d = root / f"{task}-tiny-{method}"
        records = [{"trial": n, "params": {"model.init_args.optimizer.lr": 10.0 ** -(n + 3)},
                    "balls": {k: {"epoch": e, "success_change_pp": g, "degradation": 1e-6 * e}
                              for k, (e, g) in balls.items()},
                    "history": fake_results(balls, initial=0.3)["epochs"]}
                   for n, balls in trials.items()]
        selection = Selection(study=d.name, trials=len(records),
                              balls=select_best([TrialRecord.from_dict(r) for r in records]),
                              sweep={"task": task, "model": "tiny", "method": method, "base_config": "", "space": {},
                                     "args": [], "seed": 0}).to_dict()
        d.mkdir()
        (d / "selection.json").write_text(json.dumps(selection))
        (d / "trials.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        # every trial gets test runs, so that the report must pick the selected trial's runs per ball
        for n in trials:
            for seed in range(3):
                gains = {ball: (1, TEST[(task, method, ball)][seed] + (0 if selection["balls"][ball]["trial"] == n
                                                                      else 1000)) for ball in ("1e-03", "1e-05")}
                out = d / "test" / f"trial_{n}" / f"seed_{seed}"
                out.mkdir(parents=True)
                (out / "results.json").write_text(json.dumps(fake_results(gains, seed, INITIAL[task], task=task)))
    return root


def test_selection_rule_on_the_constructed_sweeps(sweeps) -> None:
    chosen = {d.name: {k: b["trial"] for k, b in json.loads((d / "selection.json").read_text())["balls"].items()}
              for d in sweeps.iterdir()}
    # largest gain inside each ball; the 1e-05 tie-free choices differ from the 1e-03 ones
    assert chosen["country_capital-tiny-lora"] == {"1e-03": 1, "1e-05": 0}
    assert chosen["stereoset-tiny-lora"] == {"1e-03": 0, "1e-05": 1}


def test_mean_and_standard_error() -> None:
    cell = mean_se([10.0, 20.0, 30.0])
    assert cell.mean == 20.0 and cell.n == 3 and cell.se == pytest.approx(10.0 / math.sqrt(3))
    assert mean_se([4.0]).se is None
    avg = average_cells([Cell(20.0, 3.0, 3), Cell(10.0, 4.0, 3)])
    assert avg.mean == 15.0 and avg.se == pytest.approx(2.5)


def test_report_tables_and_plots(sweeps, tmp_path, capsys) -> None:
    out = tmp_path / "report"
    main(["report", "--root", f"[{sweeps}]", "--output_dir", str(out)])
    data = json.loads((out / "report.json").read_text())
    cells = {(c["table"], c["task"], c["method"], c["ball"]): c for c in data["cells"]}
    for (task, method, ball), gains in TEST.items():
        c = cells[("success", task, method, ball)]
        assert c["mean"] == pytest.approx(statistics.fmean(gains)), (task, method, ball)
        assert c["se"] == pytest.approx(_se(gains)) and c["n"] == 3
    for method in ("lora", "full"):
        for ball in ("1e-03", "1e-05"):
            a, b = TEST[("country_capital", method, ball)], TEST[("stereoset", method, ball)]
            c = cells[("success", "average", method, ball)]
            assert c["mean"] == pytest.approx((statistics.fmean(a) + statistics.fmean(b)) / 2)
            assert c["se"] == pytest.approx(math.sqrt(_se(a) ** 2 + _se(b) ** 2) / 2)
    # hard negatives: fake_results puts 10 + 0.1 x epoch; every reported epoch is 1
    assert cells[("hard_negative", "stereoset", "lora", "1e-03")]["mean"] == pytest.approx(0.1)

    md = (out / "report.md").read_text()
    header = "| task | initial success | full 1e-03 | full 1e-05 | lora 1e-03 | lora 1e-05 |"
    assert header in md
    assert "| country_capital | 25.0% | +5.0 ± 1.0 | +0.0 ± 0.0 | +20.0 ± 5.8 | +3.0 ± 1.5 |" in md
    assert "| stereoset | 50.0% | +0.0 ± 0.6 | +1.0 ± 0.6 | +3.0 ± 0.6 | +7.0 ± 1.5 |" in md
    assert "| average |  | +2.5 ± 0.6 | +0.5 ± 0.3 | +11.5 ± 2.9 | +5.0 ± 1.1 |" in md
    assert "initial hard-neg NLL" in md and "| stereoset | 10.000 |" in md
    tex = (out / "tables.tex").read_text()
    assert r"country\_capital & 25.0\% & $+5.0 \pm 1.0$" in tex and tex.count(r"\begin{tabular}") == 2
    for name in ("scatter_tiny.png", "bars_tiny.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "sizes.png").exists()  # one model size only

    with pytest.raises(SystemExit) as info:  # a report is not replaced silently
        main(["report", "--root", f"[{sweeps}]", "--output_dir", str(out)])
    assert info.value.code == 2 and "already exists" in capsys.readouterr().err


def test_size_plot_needs_several_sizes(tmp_path) -> None:
    from editing.protocol.report import TestRun, plot_sizes

    def run(model, size, task, seed, gain):
        return TestRun(model=model, task=task, method="lora", ball="1e-03", trial=0, seed=seed, epoch=1,
                       success_change_pp=gain, initial_success_rate=0.1, degradation=1e-4, hard_negative_nll=None,
                       initial_hard_negative_nll=None, num_parameters=size)

    small = [run("small", 10**6, t, s, 1.0 + s) for t in ("country_capital", "stereoset") for s in range(2)]
    large = [run("large", 10**8, t, s, 5.0 + s) for t in ("country_capital", "stereoset") for s in range(2)]
    assert plot_sizes(small, tmp_path / "one.png") is None
    path = plot_sizes(small + large, tmp_path / "sizes.png")
    assert path is not None and path.read_bytes()[:4] == b"\x89PNG"


# the ensemble's test runs: per ball, the success after the ensemble's beta search on each seed of the senses trial
# selected for that ball (the other trial's numbers must not be read)
ENSEMBLE_AFTER = {"1e-03": [0.40, 0.45, 0.55], "1e-05": [0.30, 0.30, 0.35]}
ENSEMBLE_BEFORE = 0.25


def _ensemble_results(ball_after: dict[str, float], split: str = "test") -> dict:
    """An ensemble results.json as ``editing ensemble`` writes it (the fields the report reads)."""
    balls = {}
    for ball, after in ball_after.items():
        metrics = {"success_rate": after, "general_nll": 3.001, "hard_negative_nll": 9.5}
        balls[ball] = {"beta": 0.5, "general_nll_by_beta": {"0.5": 3.001}, "success_before": ENSEMBLE_BEFORE,
                       "success_after": after, "success_change": after - ENSEMBLE_BEFORE, "general_nll": 3.001,
                       "degradation": 0.001 / 3.0, "metrics": metrics}
    return {"method": "ensemble", "task": "country_capital", "split": split,
            "large": {"name": "tiny-large", "num_parameters": 5000},
            "initial": {"success_rate": ENSEMBLE_BEFORE, "general_nll": 3.0, "hard_negative_nll": 10.0},
            "balls": balls}


def _senses_study(root: Path, ensemble_split: str = "test") -> Path:
    """A senses study whose selection picks trial 1 for 1e-03 and trial 0 for 1e-05, with ensemble results in every
    test seed folder of both trials."""
    d = root / "country_capital-tiny-backpack-senses"
    trials = {0: {"1e-03": (1, 5.0), "1e-05": (1, 4.0)}, 1: {"1e-03": (2, 9.0), "1e-05": (2, 1.0)}}
    records = [{"trial": n, "params": {}, "balls": {k: {"epoch": e, "success_change_pp": g, "degradation": 1e-6 * e}
                                                    for k, (e, g) in balls.items()},
                "history": fake_results(balls, initial=0.3)["epochs"]} for n, balls in trials.items()]
    selection = Selection(study=d.name, trials=2, balls=select_best([TrialRecord.from_dict(r) for r in records]),
                          sweep={"task": "country_capital", "model": "tiny-backpack", "method": "senses",
                                 "base_config": "", "space": {}, "args": [], "seed": 0}).to_dict()
    d.mkdir(parents=True)
    (d / "selection.json").write_text(json.dumps(selection))
    (d / "trials.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for n in trials:
        for seed in range(3):
            out = d / "test" / f"trial_{n}" / f"seed_{seed}"
            (out / "ensemble").mkdir(parents=True)
            (out / "results.json").write_text(json.dumps(fake_results({"1e-03": (1, 3.0), "1e-05": (1, 2.0)},
                                                                      seed, 0.25)))
            chosen = {b: selection["balls"][b]["trial"] == n for b in ENSEMBLE_AFTER}
            after = {b: ENSEMBLE_AFTER[b][seed] if chosen[b] else 0.99 for b in ENSEMBLE_AFTER}
            (out / "ensemble" / "results.json").write_text(json.dumps(_ensemble_results(after, ensemble_split)))
    return d


def test_report_puts_the_ensemble_in_the_large_models_table(tmp_path) -> None:
    study = _senses_study(tmp_path / "sweeps")
    assert json.loads((study / "selection.json").read_text())["balls"]["1e-03"]["trial"] == 1
    out = tmp_path / "report"
    main(["report", "--root", str(tmp_path / "sweeps"), "--output_dir", str(out)])
    cells = {(c["table"], c["model"], c["method"], c["ball"]): c
             for c in json.loads((out / "report.json").read_text())["cells"] if c["task"] == "country_capital"}
    for ball, afters in ENSEMBLE_AFTER.items():
        gains = [100.0 * (a - ENSEMBLE_BEFORE) for a in afters]
        c = cells[("success", "tiny-large", "ensemble", ball)]
        assert c["mean"] == pytest.approx(statistics.fmean(gains)) and c["se"] == pytest.approx(_se(gains))
        assert c["n"] == 3
        assert cells[("hard_negative", "tiny-large", "ensemble", ball)]["mean"] == pytest.approx(-0.5)
        # the Backpack's own senses runs stay in the Backpack's table
        assert cells[("success", "tiny-backpack", "senses", ball)]["n"] == 3
    md = (out / "report.md").read_text()
    assert "tiny-large: success change" in md and "| ensemble 1e-03 | ensemble 1e-05 |" in md
    assert "| country_capital | 25.0% | +21.7 ± 4.4 | +6.7 ± 1.7 |" in md


def test_report_refuses_an_ensemble_of_the_validation_pair(tmp_path) -> None:
    from editing.core.errors import DataFormatError
    from editing.protocol.report import collect

    study = _senses_study(tmp_path / "sweeps", ensemble_split="val")
    with pytest.raises(DataFormatError, match=r"seed_0/ensemble/results.json.*--split test"):
        collect([study])
