"""The paper's tables and plots from the protocol's test runs (``editing report``).

Input: sweep folders made by ``editing sweep``, ``select`` and ``test-runs`` (``<root>/<study>/selection.json``,
``trials.jsonl`` and ``test/trial_<n>/seed_<s>/results.json``; for a senses study also the ensemble's
``test/trial_<n>/seed_<s>/ensemble/results.json``, written by ``editing ensemble --backpack_edits <that seed's
folder> --split test --output_dir <that seed's folder>/ensemble``). For each (model, task, method, ball) the cell is the
mean over seeds of the test runs' success change (percentage points) at the ball's reported epoch, with its
standard error (sample standard deviation / sqrt(n)). Output: ``report.md`` and ``tables.tex`` (success table and
hard-negative table per model), ``report.json`` (every cell), and PNG plots.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from editing.core.errors import ConfigError, DataFormatError
from editing.core.files import ensure_writable, write_json, write_text
from editing.core.types import Metric
from editing.rules.budget import DEFAULT_BALLS, key_eps, key_label, success_change_pp
from editing.runs.records import (
    RESULTS_FILE,
    SELECTION_FILE,
    TRIALS_FILE,
    RunRecord,
    Selection,
    TrialRecord,
    read_trials,
)
from editing.runs.tables import markdown_table

AVERAGE = "average"
ENSEMBLE = "ensemble"
"""The method label of an ensemble's test runs. It is not a ``MethodName``: nothing fits it, it reuses a senses run's
edits; its runs go to the large model's table."""
ENSEMBLE_DIR = "ensemble"
"""The folder, inside a senses test run's seed folder, of the ensemble's results for that seed's edits."""


@dataclass(frozen=True)
class TestRun:
    """One test run's outcome in one ball (a seed of the configuration selected for that ball)."""

    model: str
    task: str
    method: str
    ball: str
    trial: int
    seed: int
    epoch: int
    success_change_pp: float
    initial_success_rate: float
    degradation: float
    hard_negative_nll: float | None
    initial_hard_negative_nll: float | None
    num_parameters: int | None


@dataclass(frozen=True)
class Cell:
    """Mean and standard error over seeds (``se`` is None with a single seed)."""

    mean: float
    se: float | None
    n: int


def mean_se(values: Sequence[float]) -> Cell:
    """Mean and standard error (sample standard deviation / sqrt(n)) of a list of numbers."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("no values")
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return Cell(statistics.fmean(values), se, len(values))


def average_cells(cells: Sequence[Cell]) -> Cell:
    """The average of independent cells: mean of means, standard error sqrt(sum se^2) / k."""
    k = len(cells)
    ses = [c.se for c in cells]
    se = None if any(s is None for s in ses) else math.sqrt(sum(s * s for s in ses)) / k
    return Cell(statistics.fmean(c.mean for c in cells), se, min(c.n for c in cells))


# ----------------------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ValidationTrial:
    """A validation trial of a study, with the study's model, task and method (for the scatter plots)."""

    model: str
    task: str
    method: str
    record: TrialRecord


def runs_from_results(results: RunRecord, sweep: dict, ball: str, trial: int) -> TestRun:
    """One ball of a test run's ``results.json`` (written by the DegradationBudget callback)."""
    initial = results.initial.metrics
    b = results.balls[ball]
    return TestRun(model=sweep["model"], task=task_label(sweep["task"], results), method=sweep["method"], ball=ball,
                   trial=trial, seed=int(results.seed or 0), epoch=b.epoch, success_change_pp=b.success_change_pp,
                   initial_success_rate=initial.success_rate, degradation=b.metrics.degradation,
                   hard_negative_nll=b.metrics.hard_negative_nll,
                   initial_hard_negative_nll=initial.hard_negative_nll, num_parameters=results.num_parameters)


def ensemble_run(path: Path, sweep: dict, ball: str, trial: int) -> TestRun:
    """One ball of the ensemble's ``results.json`` (``editing ensemble``) on a senses test run's edits: a run of the
    large model, whose ensemble with that seed's Backpack edit for ``ball`` is searched inside the same ball.

    Args:
        path: ``<seed folder>/ensemble/results.json``.
        sweep: the senses study's sweep settings.
        ball: the ball key.
        trial: the senses trial selected for ``ball``.
    """
    try:
        data = json.loads(path.read_text())
        split, entry, initial = data["split"], data["balls"][ball], data["initial"]
        large = str(data["large"]["name"])
        before, after = float(entry["success_before"]), float(entry["success_after"])
        degradation = float(entry[Metric.DEGRADATION.value])
        hard_negative = entry["metrics"].get(Metric.HARD_NEGATIVE_NLL.value)
    except (KeyError, TypeError, ValueError) as err:
        raise DataFormatError(str(path), None, f"not an ensemble results file with ball {ball} ({err!r}); rerun "
                              "`editing ensemble` on this seed's edits with the sweep's balls") from err
    if split != "test":
        raise DataFormatError(str(path), None, f"the ensemble ran on the {split!r} pair; a report needs the test "
                              "pair (rerun `editing ensemble` with --split test)")
    return TestRun(model=large, task=task_label(sweep["task"]), method=ENSEMBLE, ball=ball, trial=trial,
                   seed=int(path.parent.parent.name.removeprefix("seed_")), epoch=-1,
                   success_change_pp=success_change_pp(before, after), initial_success_rate=before,
                   degradation=degradation, hard_negative_nll=hard_negative,
                   initial_hard_negative_nll=initial.get(Metric.HARD_NEGATIVE_NLL.value), num_parameters=None)


def load_study(sweep_dir: Path) -> tuple[Selection, list[TestRun], list[ValidationTrial]]:
    """A sweep folder's selection, its test runs (one per ball and seed) and its validation trials."""
    selection = Selection.read(sweep_dir / SELECTION_FILE)
    sweep = selection.sweep
    runs = []
    for ball, chosen in selection.balls.items():
        folder = sweep_dir / "test" / f"trial_{chosen.trial}"
        for path in sorted(folder.glob(f"seed_*/{RESULTS_FILE}")):
            runs.append(runs_from_results(RunRecord.read(path), sweep, ball, chosen.trial))
        for path in sorted(folder.glob(f"seed_*/{ENSEMBLE_DIR}/{RESULTS_FILE}")):
            runs.append(ensemble_run(path, sweep, ball, chosen.trial))
    label = runs[0].task if runs else task_label(sweep["task"])
    trials = [ValidationTrial(sweep["model"], label, sweep["method"], t) for t in read_trials(sweep_dir / TRIALS_FILE)]
    return selection, runs, trials


def task_label(task: str, results: RunRecord | None = None) -> str:
    """How tables and plots name a sweep's task: its ``name`` (as a run's results recorded it, else as its task
    YAML gives it), never the path of a user's task YAML."""
    from editing.core.errors import EditingError
    from editing.rules.tasks import BUILTIN_TASKS, get_task

    if results is not None and results.task is not None and results.task.name:
        return str(results.task.name)
    if task in BUILTIN_TASKS:
        return task
    try:
        return get_task(task).name
    except EditingError:  # the YAML moved since the sweep: its file name is the best label left
        return Path(task).stem


def collect(roots: Iterable[str | Path]) -> tuple[list[TestRun], list[ValidationTrial]]:
    """Every test run and validation trial under the sweep roots (folders holding ``<study>/selection.json``, or a
    study folder itself)."""
    runs: list[TestRun] = []
    trials: list[ValidationTrial] = []
    seen: set[Path] = set()
    for root in roots:
        root = Path(root)
        single = (root / SELECTION_FILE).is_file()
        for d in [root] if single else sorted(p.parent for p in root.glob(f"*/{SELECTION_FILE}")):
            if d.resolve() in seen:  # a study named twice (its root and itself) counts once
                continue
            seen.add(d.resolve())
            _, r, t = load_study(d)
            runs += r
            trials += t
    return runs, trials


# ----------------------------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------------------------
def _ball_order(balls: Iterable[str]) -> list[str]:
    return sorted(set(balls), key=lambda b: -key_eps(b))


def _task_order(tasks: Iterable[str]) -> list[str]:
    from editing.rules.tasks import BUILTIN_TASKS

    builtin = list(BUILTIN_TASKS)
    return sorted(set(tasks), key=lambda t: (builtin.index(t) if t in builtin else len(builtin), t))


@dataclass
class Table:
    """One model's table: rows are tasks (and their average), columns (method, ball)."""

    model: str
    title: str
    tasks: list[str]
    columns: list[tuple[str, str]]
    cells: dict[tuple[str, str, str], Cell]  # (task or AVERAGE, method, ball) -> cell
    initial: dict[str, float | None]  # task -> initial value (success rate, or hard-negative NLL)
    initial_label: str


def build_tables(runs: Sequence[TestRun], quantity: str = "success") -> list[Table]:
    """The success table (``quantity="success"``: change in percentage points) or the hard-negative table
    (``"hard_negative"``: change in the hard negatives' mean NLL, lower is better), one per model.

    The average row is the mean over tasks of the cell means (standard error sqrt(sum se^2) / number of tasks); it is
    given only for columns where every task has a value.
    """
    by_model: dict[str, list[TestRun]] = defaultdict(list)
    for r in runs:
        by_model[r.model].append(r)
    tables = []
    for model, model_runs in sorted(by_model.items()):
        tasks = _task_order(r.task for r in model_runs)
        methods = sorted({r.method for r in model_runs})
        balls = _ball_order(r.ball for r in model_runs)
        columns = [(m, b) for m in methods for b in balls if any(r.method == m and r.ball == b for r in model_runs)]
        values: dict[tuple[str, str, str], list[float]] = defaultdict(list)
        initial_values: dict[str, list[float]] = defaultdict(list)
        for r in model_runs:
            if quantity == "success":
                values[(r.task, r.method, r.ball)].append(r.success_change_pp)
                initial_values[r.task].append(r.initial_success_rate)
            elif r.hard_negative_nll is not None and r.initial_hard_negative_nll is not None:
                values[(r.task, r.method, r.ball)].append(r.hard_negative_nll - r.initial_hard_negative_nll)
                initial_values[r.task].append(r.initial_hard_negative_nll)
        cells = {k: mean_se(v) for k, v in values.items() if v}
        for method, ball in columns:
            column = [cells.get((t, method, ball)) for t in tasks]
            if all(c is not None for c in column):
                cells[(AVERAGE, method, ball)] = average_cells(column)
        initial = {t: statistics.fmean(initial_values[t]) if initial_values[t] else None for t in tasks}
        if quantity == "success":
            title, label = f"{model}: success change on the test pair (percentage points, mean ± s.e. over seeds)", \
                "initial success"
        else:
            title, label = (f"{model}: change in hard-negative NLL at the reported epoch (nats, lower is better; "
                            "mean ± s.e. over seeds)"), "initial hard-neg NLL"
        tables.append(Table(model, title, tasks, columns, cells, initial, label))
    return tables


def format_cell(cell: Cell | None, digits: int = 1, latex: bool = False) -> str:
    """``+12.3 ± 1.2`` (no ± with one seed); ``-`` when missing."""
    if cell is None:
        return "-"
    text = f"{cell.mean:+.{digits}f}"
    if cell.se is not None:
        text += (r" \pm " if latex else " ± ") + f"{cell.se:.{digits}f}"
    return f"${text}$" if latex else text


def _initial_text(value: float | None, quantity_digits: int, percent: bool) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if percent else f"{value:.{quantity_digits}f}"


def table_markdown(table: Table, digits: int = 1) -> str:
    """A table in Markdown."""
    percent = table.initial_label == "initial success"
    header = ["task", table.initial_label] + [f"{m} {b}" for m, b in table.columns]
    rows = []
    for task in [*table.tasks, AVERAGE]:
        if task == AVERAGE and not any((AVERAGE, m, b) in table.cells for m, b in table.columns):
            continue
        initial = "" if task == AVERAGE else _initial_text(table.initial.get(task), 3, percent)
        rows.append([task, initial] + [format_cell(table.cells.get((task, m, b)), digits) for m, b in table.columns])
    return f"**{table.title}**\n\n" + markdown_table(header, rows)


def _tex(text: str) -> str:
    return text.replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")


def table_latex(table: Table, digits: int = 1) -> str:
    """A table in LaTeX (booktabs)."""
    percent = table.initial_label == "initial success"
    methods = list(dict.fromkeys(m for m, _ in table.columns))
    lines = [f"% {table.title}", r"\begin{tabular}{l r " + " ".join("r" for _ in table.columns) + "}", r"\toprule"]
    groups = " & ".join(rf"\multicolumn{{{sum(1 for m, _ in table.columns if m == method)}}}{{c}}{{{_tex(method)}}}"
                        for method in methods)
    lines.append(f" & & {groups} \\\\")
    lines.append(f"task & {_tex(table.initial_label)} & " + " & ".join(
        rf"$\epsilon={key_label(b)}$" for _, b in table.columns) + r" \\")
    lines.append(r"\midrule")
    for task in [*table.tasks, AVERAGE]:
        if task == AVERAGE:
            if not any((AVERAGE, m, b) in table.cells for m, b in table.columns):
                continue
            lines.append(r"\midrule")
        initial = "" if task == AVERAGE else _tex(_initial_text(table.initial.get(task), 3, percent))
        cells = [format_cell(table.cells.get((task, m, b)), digits, latex=True) for m, b in table.columns]
        lines.append(" & ".join([_tex(task), initial, *cells]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_scatter(runs: Sequence[TestRun], trials: Sequence[ValidationTrial], model: str, path: Path) -> Path:
    """Success change vs degradation for every run of a model: every epoch of every validation trial (small
    points) and every test run at its reported epoch (large points), one panel per task, one colour per method."""
    plt = _pyplot()
    tasks = _task_order([r.task for r in runs if r.model == model] + [t.task for t in trials if t.model == model])
    methods = sorted({r.method for r in runs if r.model == model} | {t.method for t in trials if t.model == model})
    colours = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(methods)}
    balls = _ball_order([r.ball for r in runs if r.model == model] or [b.key for b in DEFAULT_BALLS])
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        seen_x = [key_eps(b) for b in balls]
        for method in methods:
            xs, ys = [], []
            for t in trials:
                history = t.record.history
                if (t.model, t.task, t.method) != (model, task, method) or not history:
                    continue
                initial = history[0][Metric.SUCCESS_RATE]
                for e in history[1:]:
                    if e.get(Metric.DEGRADATION) is not None and e.get(Metric.SUCCESS_RATE) is not None:
                        xs.append(e[Metric.DEGRADATION])
                        ys.append(success_change_pp(initial, e[Metric.SUCCESS_RATE]))
            ax.scatter(xs, ys, s=10, alpha=0.45, color=colours[method], label=f"{method} (validation epochs)")
            test = [r for r in runs if (r.model, r.task, r.method) == (model, task, method)]
            seen_x += xs + [r.degradation for r in test]
            ax.scatter([r.degradation for r in test], [r.success_change_pp for r in test], s=45, marker="D",
                       edgecolor="black", color=colours[method], label=f"{method} (test runs)")
        for b in balls:
            ax.axvline(key_eps(b), color="grey", linestyle="--", linewidth=0.8)
            ax.text(key_eps(b), ax.get_ylim()[1], f" ε={key_label(b)}", rotation=90, va="top", fontsize=7,
                    color="grey")
        ax.set_xscale("symlog", linthresh=1e-6)
        # a factor 3 of room on both sides (symlog's autoscale puts extreme points on the frame)
        finite = [x for x in seen_x if math.isfinite(x)]
        ax.set_xlim(min(-1e-6, 3 * min(finite)), 3 * max(finite))
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_title(task)
        ax.set_xlabel("degradation (general NLL / initial - 1)")
        ax.set_ylabel("success change (pp)")
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle(f"{model}: success change vs degradation")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_bars(table: Table, path: Path) -> Path:
    """Per-task bars of the success change, one panel per ball, one bar per method, standard errors as whiskers."""
    plt = _pyplot()
    balls = _ball_order(b for _, b in table.columns)
    methods = list(dict.fromkeys(m for m, _ in table.columns))
    rows = [*table.tasks] + ([AVERAGE] if any(k[0] == AVERAGE for k in table.cells) else [])
    width = 0.8 / max(1, len(methods))
    fig, axes = plt.subplots(1, len(balls), figsize=(max(4.0, 1.2 * len(rows)) * len(balls), 4), squeeze=False,
                             sharey=True)
    for ax, ball in zip(axes[0], balls, strict=True):
        for i, method in enumerate(methods):
            cells = [table.cells.get((task, method, ball)) for task in rows]
            xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(rows))]
            ax.bar(xs, [c.mean if c else 0.0 for c in cells], width,
                   yerr=[c.se if c and c.se is not None else 0.0 for c in cells], capsize=3, label=method)
        ax.set_xticks(range(len(rows)), rows, rotation=30, ha="right")
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_title(f"ball ε = {key_label(ball)}")
        ax.set_ylabel("success change (pp)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{table.model}: success change on the test pair per task")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_sizes(runs: Sequence[TestRun], path: Path) -> Path | None:
    """Success change (averaged over tasks) vs model size, one line per method, one panel per ball; only when
    several model sizes were run."""
    sizes = {r.model: r.num_parameters for r in runs if r.num_parameters}
    if len(set(sizes.values())) < 2:
        return None
    plt = _pyplot()
    tables = {t.model: t for t in build_tables(runs)}
    balls = _ball_order(r.ball for r in runs)
    methods = sorted({r.method for r in runs})
    fig, axes = plt.subplots(1, len(balls), figsize=(4.5 * len(balls), 4), squeeze=False, sharey=True)
    for ax, ball in zip(axes[0], balls, strict=True):
        for method in methods:
            points = sorted((sizes[m], t.cells[(AVERAGE, method, ball)]) for m, t in tables.items()
                            if m in sizes and (AVERAGE, method, ball) in t.cells)
            if points:
                ax.errorbar([p[0] for p in points], [p[1].mean for p in points],
                            yerr=[p[1].se or 0.0 for p in points], marker="o", capsize=3, label=method)
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_title(f"ball ε = {key_label(ball)}")
        ax.set_ylabel("success change (pp), average over tasks")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------------------------
def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def make_report(root: list[str] | str | None = None, output_dir: str = "runs/report", digits: int = 1,
                overwrite: bool = False) -> dict:
    """The paper's tables (Markdown and LaTeX) and plots (PNG) from the test runs of one or more sweep roots.

    Args:
        root: a sweep root or a list of them (folders of ``<study>/selection.json``; default ``runs/sweeps``), or
            study folders.
        output_dir: where ``report.md``, ``tables.tex``, ``report.json`` and the PNG files go.
        digits: decimals of the table cells.
        overwrite: replace an earlier report in ``output_dir``.

    Returns:
        Paths of the files written.
    """
    roots = [root] if isinstance(root, str) else (root or ["runs/sweeps"])
    runs, trials = collect(roots)
    if not runs:
        raise ConfigError(f"no test runs found under {', '.join(map(str, roots))} (run `editing select` and "
                          "`editing test-runs` first)")
    out = Path(output_dir)
    ensure_writable(out / "report.md", overwrite, "--overwrite true")
    out.mkdir(parents=True, exist_ok=True)
    success = build_tables(runs, "success")
    hard = build_tables(runs, "hard_negative")
    markdown, latex = [], []
    for t in success:
        markdown.append(table_markdown(t, digits))
        latex.append(table_latex(t, digits))
    for t in hard:  # NLL changes are small: one more decimal
        markdown.append(table_markdown(t, digits + 1))
        latex.append(table_latex(t, digits + 1))
    files = {"markdown": out / "report.md", "latex": out / "tables.tex", "json": out / "report.json"}
    write_text(files["markdown"], "\n\n".join(markdown) + "\n", overwrite=True)
    write_text(files["latex"], "\n\n".join(latex) + "\n", overwrite=True)
    cells = [{"table": "success" if t in success else "hard_negative", "model": t.model, "task": k[0],
              "method": k[1], "ball": k[2], **asdict(c)} for t in [*success, *hard] for k, c in t.cells.items()]
    write_json(files["json"], {"cells": cells, "runs": [asdict(r) for r in runs]}, overwrite=True)
    for t in success:
        files[f"scatter {t.model}"] = plot_scatter(runs, trials, t.model, out / f"scatter_{_safe(t.model)}.png")
        files[f"bars {t.model}"] = plot_bars(t, out / f"bars_{_safe(t.model)}.png")
    sizes = plot_sizes(runs, out / "sizes.png")
    if sizes is not None:
        files["sizes"] = sizes
    print("\n\n".join(markdown))
    print("\n" + "\n".join(f"{name}: {path}" for name, path in files.items()))
    return {k: str(v) for k, v in files.items()}
