"""Sequential (lifelong) editing (issue 38 item 4): a task's canonical examples in chunks of N, each chunk one fit on
top of the previous step's edit (``editing fit --base_edit``), measured after every step against the original base
model.

The output folder holds:

- ``chunks/chunk_<k>.jsonl`` (the canonical lines of chunk k, as in the task's file) and ``tasks/``: per chunk the
  task YAML its fit trains on (the chunk as canonical examples, the task's own evaluation files) and the one its
  success is measured on (the chunk as the evaluation set);
- ``step_<k>/``: step k's fit run folder; its ``edits/ball_<eps>`` (the cumulative edit, loadable alone) is the
  next step's base edit;
- ``sequence.json`` (the settings and one row per step) and ``sequence.csv`` (the table), rewritten atomically
  after every step, and ``sequence.png`` (chunk 1's success and the degradation per step).

Row 0 is the original base model. Row k: step k's saved edit, loaded with ``load_edited`` (what ``editing apply``
measures), on every chunk 1..k (the success rate of its canonical examples scored as evaluation examples, SPEC 5),
on the task's evaluation set (``success_rate``) and on the general set G (``general_nll``, and ``degradation`` =
general_nll / the original's - 1).

Resuming: a step whose fit finished and whose row is in ``sequence.json`` is not redone; a finished fit without its
row (killed in between) is measured, not refitted; a step whose base edit changed since it was fitted (the manifest
digest its results record) is refused. A folder holding a sequence of other settings is refused unless
``overwrite``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from editing.core.errors import ConfigError
from editing.core.files import save_atomically, write_json, write_text
from editing.core.types import Metric
from editing.rules.budget import ball_key, edit_folder_name
from editing.rules.tasks import get_task

SEQUENCE_FILE = "sequence.json"
TABLE_FILE = "sequence.csv"
PLOT_FILE = "sequence.png"
OVERWRITE_FLAG = "--overwrite true"


@dataclass(frozen=True)
class SequenceSettings:
    """What a sequence is (``sequence.json`` records it; a resumed sequence must have the same)."""

    fit_config: list[str]
    task: str
    chunk_size: int
    steps: int | None = None
    ball: float = 1e-3
    split: str = "val"
    eval_limit: int | None = None
    general_limit: int | None = None
    data_root: str | None = None
    seed: int = 0
    fit_args: list[str] = field(default_factory=list)

    def check(self) -> None:
        """Raise ``ConfigError`` naming the setting at fault and the fix."""
        if not self.fit_config:
            raise ConfigError("--fit_config: give the fit config of the method, e.g. lightning_configs/fit/rome.yaml")
        for path in self.fit_config:
            if not Path(path).is_file():
                raise ConfigError(f"--fit_config {path}: no such file; give a fit config "
                                  "(lightning_configs/fit/<method>.yaml)")
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ConfigError(f"--chunk_size {self.chunk_size!r}: give the number of canonical examples per step "
                              "(>= 1)")
        if self.steps is not None and (isinstance(self.steps, bool) or self.steps < 1):
            raise ConfigError(f"--steps {self.steps!r}: give a number of steps >= 1, or null for every chunk")
        if not (isinstance(self.ball, (int, float)) and math.isfinite(self.ball) and 0 < self.ball < 1):
            raise ConfigError(f"--ball {self.ball!r}: give the eps of the ball whose edit each step continues "
                              "(0 < eps < 1, e.g. 1e-3)")


def chunk_lines(settings: SequenceSettings) -> list[list[str]]:
    """The task's canonical lines (in file order) in chunks of ``chunk_size``, the first ``steps`` chunks."""
    task = get_task(settings.task)
    path = task.file("canonical", settings.split, _data_root(task, settings))
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    chunks = [lines[i: i + settings.chunk_size] for i in range(0, len(lines), settings.chunk_size)]
    if settings.steps is not None:
        if settings.steps > len(chunks):
            raise ConfigError(f"--steps {settings.steps}: {path} has {len(lines)} canonical examples, "
                              f"{len(chunks)} chunk(s) of {settings.chunk_size}; give at most {len(chunks)} steps or a "
                              "smaller --chunk_size")
        chunks = chunks[: settings.steps]
    return chunks


def _data_root(task, settings: SequenceSettings) -> str | None:
    from editing.core.paths import resolve_data_root

    return resolve_data_root(settings.data_root) if task.builtin or settings.data_root else None


def write_chunk_tasks(out: Path, settings: SequenceSettings, chunks: list[list[str]]) -> list[tuple[Path, Path]]:
    """Per chunk, (the task YAML its fit trains on, the task YAML its success is measured on)."""
    import yaml

    task = get_task(settings.task)
    root = _data_root(task, settings)
    roles = {role: task.file(role, settings.split, root) for role in ("evaluation", "targeted", "hard_negatives")}
    common = {"name": task.name, "loss": task.loss.value, "threshold": task.threshold}
    out_tasks = []
    for k, lines in enumerate(chunks, start=1):
        chunk = write_text(out / "chunks" / f"chunk_{k:02d}.jsonl", "".join(f"{line}\n" for line in lines),
                           overwrite=True)
        fit = {**common, "canonical": str(chunk.resolve()),
               **{role: str(Path(p).resolve()) for role, p in roles.items() if p is not None}}
        measure = {**common, "canonical": str(chunk.resolve()), "evaluation": str(chunk.resolve())}
        paths = (out / "tasks" / f"fit_{k:02d}.yaml", out / "tasks" / f"chunk_{k:02d}.yaml")
        write_text(paths[0], yaml.safe_dump(fit, sort_keys=False), overwrite=True)
        write_text(paths[1], yaml.safe_dump(measure, sort_keys=False), overwrite=True)
        out_tasks.append(paths)
    return out_tasks


def fit_command(settings: SequenceSettings, task_yaml: Path, step_dir: Path, base_edit: Path | None,
                overwrite: bool) -> list[str]:
    """The ``editing fit`` arguments of one step."""
    from editing.protocol.trials import PAPER_PROTOCOL

    args = [a for path in settings.fit_config for a in ("--config", str(path))]
    # every step measured alike, on all of G with the config's accumulation (a base edit's steps are never sampled)
    args += PAPER_PROTOCOL
    args += ["--data.task", str(task_yaml), "--data.split", settings.split, "--budget.output_dir", str(step_dir),
             "--budget.balls", json.dumps([settings.ball]), "--seed_everything", str(settings.seed),
             "--data.seed", str(settings.seed), "--data.eval_limit", json.dumps(settings.eval_limit),
             "--data.general_limit", json.dumps(settings.general_limit)]
    if settings.data_root is not None:
        args += ["--data.data_root", settings.data_root]
    if base_edit is not None:
        args += ["--base_edit", str(base_edit)]
    if (step_dir / "checkpoints" / "last.ckpt").is_file() and not overwrite:
        args += ["--ckpt_path", "last"]  # a step killed during its fit resumes
    if overwrite:
        args += ["--budget.overwrite", "true"]
    return [*args, *settings.fit_args]


def edit_of(step_dir: Path, settings: SequenceSettings) -> Path:
    """Step's saved edit of the sequence's ball."""
    return step_dir / "edits" / edit_folder_name(ball_key(settings.ball))


def _finished(step_dir: Path):
    from editing.runs.records import RESULTS_FILE, RunRecord

    path = step_dir / RESULTS_FILE
    if not path.is_file():
        return None
    run = RunRecord.read(path)
    return run if run.status.value == "finished" else None


def _check_base(step: int, run, base_edit: Path | None) -> None:
    """A finished step was fitted on the step before's edit as it is now (its manifest digest)."""
    from editing.methods.base_edit import file_sha256
    from editing.runs.manifest import MANIFEST

    if base_edit is None:
        return
    recorded = (run.model.get("base_edit") or {}).get("manifest_sha256")
    now = file_sha256(base_edit / MANIFEST) if (base_edit / MANIFEST).is_file() else None
    if recorded != now:
        raise ConfigError(f"step {step} was fitted on top of {base_edit} (manifest sha256 {str(recorded)[:12]}), which "
                          f"has changed since (now {str(now)[:12]}): the steps after it no longer follow from it; "
                          f"start the sequence again with {OVERWRITE_FLAG} (or in another --output_dir)")


def measure(model, chunk_tasks: Sequence[Path], settings: SequenceSettings) -> dict:
    """One row's numbers for ``model`` (an ``EditingModule``/``EditedModule``): success on each chunk (and the
    chunk's mean score, SPEC 5), on the task's evaluation set, and the general NLL."""
    from editing.data.datamodule import TaskDataModule
    from editing.evaluation import evaluate

    chunks, scores = {}, {}
    for k, path in enumerate(chunk_tasks, start=1):
        dm = TaskDataModule(task=str(path), split=settings.split, data_root=settings.data_root)
        summary = evaluate(model, dm, roles=["evaluation"])
        chunks[str(k)] = summary[Metric.SUCCESS_RATE]
        scores[str(k)] = summary[Metric.GENERALIZATION_MEAN_SCORE]
    dm = TaskDataModule(task=settings.task, split=settings.split, data_root=settings.data_root,
                        eval_limit=settings.eval_limit, general_limit=settings.general_limit)
    summary = evaluate(model, dm, roles=["evaluation", "general"])
    return {"chunks": chunks, "chunk_scores": scores, "success_rate": summary[Metric.SUCCESS_RATE],
            "general_nll": summary[Metric.GENERAL_NLL]}


def _read_state(out: Path, settings: SequenceSettings, overwrite: bool) -> list[dict]:
    """The rows already measured (none when starting, or with ``overwrite``); other settings are refused."""
    path = out / SEQUENCE_FILE
    if not path.is_file() or overwrite:
        return []
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        theirs = state["settings"]
        rows = list(state["rows"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path}: not a sequence record ({err}); choose another --output_dir, or pass "
                          f"{OVERWRITE_FLAG} to start the sequence again") from None
    ours = json.loads(json.dumps(asdict(settings)))
    differ = [f"{k}: {theirs.get(k)!r} there, {ours[k]!r} here" for k in ours if theirs.get(k) != ours[k]]
    if differ:
        raise ConfigError(f"{out} holds a sequence of other settings ({'; '.join(differ)}); resume it with its "
                          f"settings, choose another --output_dir, or pass {OVERWRITE_FLAG} to start it again")
    return rows


def write_state(out: Path, settings: SequenceSettings, rows: list[dict], chunks: int) -> None:
    """``sequence.json``, ``sequence.csv`` and ``sequence.png``, each atomically."""
    write_json(out / SEQUENCE_FILE, {"schema_version": 1, "settings": asdict(settings), "rows": rows}, overwrite=True)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["step", "epoch", "success_rate", "general_nll", "degradation",
                     *[f"chunk_{k}" for k in range(1, chunks + 1)]])
    for row in rows:
        writer.writerow([row["step"], row["epoch"], row["success_rate"], row["general_nll"], row["degradation"],
                         *[row["chunks"].get(str(k), "") for k in range(1, chunks + 1)]])
    write_text(out / TABLE_FILE, buffer.getvalue(), overwrite=True)
    plot(out / PLOT_FILE, rows)


def plot(path: Path, rows: list[dict]) -> Path:
    """Chunk 1's success and the degradation (vs the original model) per step, one figure."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, left = plt.subplots(figsize=(6, 3.5))
    left.plot(steps, [r["chunks"].get("1") for r in rows], marker="o", color="tab:blue", label="chunk 1 success")
    left.set_xlabel("step (0: the original model)")
    left.set_ylabel("chunk 1 success rate", color="tab:blue")
    right = left.twinx()
    right.plot(steps, [r["degradation"] for r in rows], marker="s", color="tab:red", label="degradation")
    right.set_ylabel("degradation (general NLL / original - 1)", color="tab:red")
    fig.tight_layout()
    save_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"), overwrite=True)
    plt.close(fig)
    return path


def run_sequence(settings: SequenceSettings, out: Path, fit: Callable[[list[str]], None], overwrite: bool = False,
                 say: Callable[[str], None] = print) -> list[dict]:
    """Run (or resume) the sequence into ``out``; ``fit`` runs ``editing fit`` with the arguments it is given.

    Returns:
        The rows (row 0: the original model; row k: after step k).
    """
    from editing.edits.load import load_edited

    settings.check()
    chunks = chunk_lines(settings)
    rows = _read_state(out, settings, overwrite)
    tasks = write_chunk_tasks(out, settings, chunks)
    base: Path | None = None
    for k in range(1, len(chunks) + 1):
        step_dir = out / f"step_{k:02d}"
        run = None if overwrite and not any(r["step"] == k for r in rows) else _finished(step_dir)
        if run is None:
            say(f"step {k}/{len(chunks)}: fitting chunk {k} ({len(chunks[k - 1])} examples)"
                + (f" on top of {base}" if base else ""))
            fit(fit_command(settings, tasks[k - 1][0], step_dir, base, overwrite))
            run = _finished(step_dir)
            if run is None:
                raise ConfigError(f"step {k}'s fit in {step_dir} did not finish (no finished results.json); resume "
                                  "with the same command")
        _check_base(k, run, base)
        edit = edit_of(step_dir, settings)
        if not any(r["step"] == k for r in rows):
            model = load_edited(edit)
            if not rows:  # row 0: the original model, on every chunk
                with model.reference():
                    rows.append({"step": 0, "edit": None, "epoch": None,
                                 **measure(model, [t[1] for t in tasks], settings)})
            numbers = measure(model, [t[1] for t in tasks[:k]], settings)
            chosen = run.balls[ball_key(settings.ball)]
            rows.append({"step": k, "edit": str(edit), "epoch": chosen.epoch, **numbers,
                         "fit_degradation": chosen.metrics.degradation})
            del model
        rows = _with_degradation(rows)
        write_state(out, settings, rows, len(chunks))
        say(_row_line(next(r for r in rows if r["step"] == k)))
        base = edit
    return rows


def _with_degradation(rows: list[dict]) -> list[dict]:
    original = rows[0]["general_nll"]
    return [{**r, "degradation": r["general_nll"] / original - 1.0} for r in rows]


def _row_line(row: dict) -> str:
    chunks = " ".join(f"{k}:{v:.3f}" for k, v in row["chunks"].items())
    return (f"step {row['step']}: success {row['success_rate']:.3f}, degradation {row['degradation']:+.3e}, "
            f"chunk successes {chunks}")
