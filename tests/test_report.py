"""``editing report`` on a constructed set of run results: the selection rule, seed means and standard errors,
the table cells (Markdown, LaTeX) and the plots."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
from test_sweep import fake_results

from editing.cli import main
from editing.records import Selection, TrialRecord
from editing.report import Cell, average_cells, mean_se
from editing.sweep import select_best

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
    from editing.report import TestRun, plot_sizes

    def run(model, size, task, seed, gain):
        return TestRun(model=model, task=task, method="lora", ball="1e-03", trial=0, seed=seed, epoch=1,
                       success_change_pp=gain, initial_success_rate=0.1, degradation=1e-4, hard_negative_nll=None,
                       initial_hard_negative_nll=None, num_parameters=size)

    small = [run("small", 10**6, t, s, 1.0 + s) for t in ("country_capital", "stereoset") for s in range(2)]
    large = [run("large", 10**8, t, s, 5.0 + s) for t in ("country_capital", "stereoset") for s in range(2)]
    assert plot_sizes(small, tmp_path / "one.png") is None
    path = plot_sizes(small + large, tmp_path / "sizes.png")
    assert path is not None and path.read_bytes()[:4] == b"\x89PNG"
