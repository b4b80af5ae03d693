"""Fit time with the evaluation caches off and on (issue 13): the main job's LoRA fit, a MEMIT fit and a sense edit.

Each method is fitted three times in this one process, on the same model and data: with the caches off (every
evaluation a full pass over every set), then on and cold (a fresh cache: p0 is computed and stored, the frozen
prefix captured), then on and warm (a second fit: p0 and the prefix come from the cache). Prints the wall time of
each fit, the ratio to the fit without caches, and checks that every epoch's metrics are equal within 1e-6 relative
and every ball decision (each epoch inside or outside each ball, and each ball's chosen epoch) is identical; the
exit status is 1 when a check fails.

By default every text of G is evaluated each epoch (the paper's protocol; the main job's config limits it to 300).
Run it smaller with ``--general_limit``/``--eval_limit``/``--epochs``/``--train_batches``. Untimed before the fits:
one load of the model (a GGUF's first load converts it) and MEMIT's covariance statistics (cached on disk, as after
any first run). ``senses`` (not run by default) is sense finetuning of the Backpack distilled from SmolLM2
(``lightning_configs/main/senses_country_capital.yaml``: the main job's data limits; ``--model FOLDER`` names another
Backpack); its sense selection's background statistics are cached by the first fit, like MEMIT's.

    OMP_NUM_THREADS=2 python benchmarks/fit_time.py [--general_limit N] [--eval_limit N] [--epochs N]
        [--train_batches N] [--methods lora memit senses] [--covariance_samples N] [--model NAME]

``--paths`` compares instead the evaluation path before issue 37 with today's, caches warm in both (a first fit of
one epoch of one batch warms each path's, untimed): before, every product on the default kernels
(``EDITING_PRODUCTS=default``), a LoRA adapter evaluated as a branch beside each weight, the head's log-sum-exp over
whole blocks, the padding mask passed to every forward and the attention under the product mode; today, the
machine's chosen product mode, the adapter merged, the chunked log-sum-exp, no mask for right-padded batches and the
attention in IEEE fp32. Fits alternate (``--repeat`` pairs); the same equality checks apply (a degradation to within
1e-6 absolute: the general NLL's 1e-6 relative), and each path's time is projected to ``--project`` epochs: p0's
evaluation + E x (the mean epoch evaluation + the rest per epoch), the rest (training and setup) counted per epoch,
which overstates training by the setup.

    OMP_NUM_THREADS=2 python benchmarks/fit_time.py --paths --methods lora --epochs 2 [--project 5]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"lora": REPO / "lightning_configs" / "main" / "lora_country_capital.yaml",
           "memit": REPO / "lightning_configs" / "main" / "memit_country_capital.yaml",
           "senses": REPO / "lightning_configs" / "main" / "senses_country_capital.yaml"}
DEFAULT_METHODS = ["lora", "memit"]  # senses needs a distilled Backpack, which a fresh machine does not have
METRICS = ("success_rate", "general_nll", "targeted_nll", "hard_negative_nll", "degradation")
RTOL = 1e-6
DEGRADATION_ATOL = RTOL


def _cpu() -> str:
    """The CPU's model name (``/proc/cpuinfo``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return "unknown CPU"


def _flag(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


EVALUATIONS: list[float] = []  # seconds of each evaluation (p0, then each epoch) of the fit running now


def _timed_evaluations() -> None:
    """Time each evaluation of the budget callback, so that a run with fewer epochs can be projected to more."""
    import callbacks.degradation_budget as budget

    plain = budget.evaluate_epoch

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return plain(*args, **kwargs)
        finally:
            EVALUATIONS.append(time.perf_counter() - start)

    budget.evaluate_epoch = timed


def fit(method: str, args: argparse.Namespace, folder: Path, caches: bool) -> tuple[float, dict]:
    """One ``editing fit`` of ``method`` in this process; its wall time and ``results.json``."""
    from editing.commands.lightning import run_lightning_cli

    cli = ["--config", str(CONFIGS[method]), "--data.general_limit", _flag(args.general_limit),
           "--budget.output_dir", str(folder), "--budget.save_edits", "false",
           "--budget.p0_cache", _flag(caches), "--budget.incremental", _flag(caches),
           "--trainer.logger", "false", "--trainer.default_root_dir", str(folder.with_name(folder.name + "-root")),
           "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    if args.eval_limit is not None:
        cli += ["--data.eval_limit", str(args.eval_limit)]
    if args.model is not None:
        cli += ["--model.init_args.base.name", args.model]
    if args.epochs is not None and method != "memit":  # MEMIT is one closed-form edit: one epoch
        cli += ["--trainer.max_epochs", str(args.epochs)]
    if args.train_batches is not None and method != "memit":
        cli += ["--trainer.limit_train_batches", str(args.train_batches)]
    if method == "memit" and args.covariance_samples is not None:
        cli += ["--model.init_args.memit.covariance_samples", str(args.covariance_samples)]
    start = time.perf_counter()
    run_lightning_cli("fit", cli)
    seconds = time.perf_counter() - start
    return seconds, json.loads((folder / "results.json").read_text())


@contextmanager
def before_issue_37():
    """The evaluation path as it was before issue 37 (see the module's docstring), put back on exit: roofline.py's
    ``overheads_back`` (the unchunked log-sum-exp, the mask kept), the default products and the LoRA branch."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    import roofline

    from editing.evaluation import products
    from editing.methods.lora import LoRAEditor

    saved = os.environ.get(products.PIN_ENV), LoRAEditor.evaluation_weights
    os.environ[products.PIN_ENV] = "default"
    LoRAEditor.evaluation_weights = lambda self: nullcontext(self.model)
    products.forget_choices()
    try:
        with roofline.overheads_back():
            yield
    finally:
        pin, LoRAEditor.evaluation_weights = saved
        if pin is None:
            os.environ.pop(products.PIN_ENV, None)
        else:
            os.environ[products.PIN_ENV] = pin
        products.forget_choices()


def projected(seconds: float, evaluations: list[float], epochs: int, target: int) -> float:
    """A fit of ``target`` epochs from one of ``epochs``: p0's evaluation + target x (mean epoch evaluation + the
    rest per epoch)."""
    p0, later = evaluations[0], evaluations[1:]
    rest = seconds - sum(evaluations)
    return p0 + target * (sum(later) / max(1, len(later)) + rest / max(1, epochs))


def compare_paths(args: argparse.Namespace, work: Path) -> int:
    """``--paths``: before issue 37 against today, alternating, caches warm; prints the table, returns the exit."""
    failed = False
    summary = []
    for method in args.methods:
        # untimed: each path's p0 and prefix cached (the product mode is keyed); one epoch of one batch does it
        warming = argparse.Namespace(**{**vars(args), "epochs": 1, "train_batches": 1})
        for path in ("before", "today"):
            EVALUATIONS.clear()
            with before_issue_37() if path == "before" else nullcontext():
                seconds, _ = fit(method, warming, work / f"{method}-warming-{path}", caches=True)
            # cold: p0 a full pass over every set, epoch 1's the first of the edit's (what the caches then keep)
            print(f"warming {method} {path} (untimed): {seconds:.1f} s; evaluations, cold (p0, epoch 1) "
                  f"{', '.join(f'{s:.1f}' for s in EVALUATIONS)} s", flush=True)
        print("\n| method | path | fit (s) | evaluations: p0, epochs (s) | the rest (s) | projected "
              f"{args.project} epochs (s) |\n|---|---|---|---|---|---|")
        times: dict[str, list[float]] = {"before": [], "today": []}
        projections: dict[str, list[float]] = {"before": [], "today": []}
        records: dict[str, dict] = {}
        for number in range(args.repeat):
            for path in ("before", "today"):
                EVALUATIONS.clear()
                with before_issue_37() if path == "before" else nullcontext():
                    seconds, record = fit(method, args, work / f"{method}-{path}-{number}", caches=True)
                epochs = len(record["epochs"]) - 1
                times[path].append(seconds)
                projections[path].append(projected(seconds, list(EVALUATIONS), epochs, args.project))
                records.setdefault(path, record)
                print(f"| {method} | {path} | {seconds:.1f} | {', '.join(f'{s:.1f}' for s in EVALUATIONS)} | "
                      f"{seconds - sum(EVALUATIONS):.1f} | {projections[path][-1]:.1f} |", flush=True)
        problems = differences(records["before"], records["today"])
        failed |= bool(problems)
        for problem in problems:
            print(f"MISMATCH {method}: {problem}")
        med = {p: statistics.median(v) for p, v in times.items()}
        proj = {p: statistics.median(v) for p, v in projections.items()}
        summary.append(f"{method}: today {med['before'] / med['today']:.2f}x faster measured ({med['before']:.1f} "
                       f"-> {med['today']:.1f} s), {proj['before'] / proj['today']:.2f}x projected to "
                       f"{args.project} epochs; every epoch's metrics within {RTOL:g} relative and the same ball "
                       f"decisions: {'yes' if not problems else 'NO'}")
    print("\n" + "\n".join(summary))
    return 1 if failed else 0


def decisions(record: dict) -> tuple[list[list[bool]], dict[str, int]]:
    """Per epoch, per ball: inside or not (the rule of ``editing.rules.budget``); and each ball's chosen epoch."""
    from editing.rules.budget import parse_balls

    balls = parse_balls([float(k) for k in record["balls"]], "balls")
    p0 = record["epochs"][0]["general_nll"]
    inside = [[ball.inside(e["general_nll"], p0) for ball in balls] for e in record["epochs"]]
    return inside, {key: ball["epoch"] for key, ball in record["balls"].items()}


def differences(reference: dict, other: dict) -> list[str]:
    """Where ``other``'s epochs or ball decisions differ from ``reference``'s (empty: the same)."""
    problems = []
    if len(reference["epochs"]) != len(other["epochs"]):
        return [f"{len(other['epochs'])} epochs instead of {len(reference['epochs'])}"]
    for a, b in zip(reference["epochs"], other["epochs"], strict=True):
        if a["counts"] != b["counts"]:
            problems.append(f"epoch {a['epoch']}: counts differ")
        for key in METRICS:
            x, y = a[key], b[key]
            # degradation is a relative change of the general NLL near 0: its rounding is the NLL's relative
            # rounding, so it is held to an absolute DEGRADATION_ATOL (the NLL's RTOL: a tenth of the 1e-5 ball)
            atol = DEGRADATION_ATOL if key == "degradation" else 0.0
            if (x is None) != (y is None) or (x is not None and not math.isclose(x, y, rel_tol=RTOL, abs_tol=atol)):
                problems.append(f"epoch {a['epoch']} {key}: {x!r} vs {y!r}")
    if decisions(reference) != decisions(other):
        problems.append(f"ball decisions differ: {decisions(reference)} vs {decisions(other)}")
    return problems


def warm_up(methods: list[str], args: argparse.Namespace) -> None:
    """What any first run leaves cached and the comparison should not time: the model's load, MEMIT's statistics."""
    import yaml

    from editing.data.datamodule import TaskDataModule
    from editing.methods import MEMITConfig, MEMITEditor
    from editing.models.loading import ModelConfig, load_model

    for method in methods:  # each method's base (its config's, or --model)
        base = yaml.safe_load(CONFIGS[method].read_text())["model"]["init_args"]["base"]["name"]
        load_model(ModelConfig(name=args.model or base, precision="fp32"))
    if "memit" in methods:
        init = yaml.safe_load(CONFIGS["memit"].read_text())["model"]["init_args"]
        memit = dict(init["memit"])
        if args.covariance_samples is not None:
            memit["covariance_samples"] = args.covariance_samples
        module = MEMITEditor(ModelConfig(**init["base"]), MEMITConfig(**memit))
        dm = TaskDataModule(task="country_capital")
        dm.attach(module.tokenizer, module.max_length)
        module.statistics(dm, progress=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--general_limit", type=int, default=None, help="texts of G per evaluation (default: all)")
    parser.add_argument("--eval_limit", type=int, default=None,
                        help="examples of the evaluation, targeted and hard-negative sets (default: the config's)")
    parser.add_argument("--epochs", type=int, default=None, help="LoRA and senses epochs (default: the config's)")
    parser.add_argument("--train_batches", type=int, default=None,
                        help="LoRA, senses: canonical batches per epoch (default: all; fewer makes the run shorter, "
                             "and evaluation a larger share of it)")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=sorted(CONFIGS),
                        help="senses: a sense edit of the distilled Backpack (not by default)")
    parser.add_argument("--covariance_samples", type=int, default=None,
                        help="MEMIT's statistics tokens (default: the config's)")
    parser.add_argument("--paths", action="store_true",
                        help="compare the evaluation path before issue 37 with today's (caches warm in both)")
    parser.add_argument("--repeat", type=int, default=1, help="--paths: alternating pairs of fits per method")
    parser.add_argument("--project", type=int, default=5, help="--paths: epochs to project each path's time to")
    parser.add_argument("--model", default=None,
                        help="the base model of every method run (default: each config's: SmolLM2, for senses the "
                             "distilled Backpack)")
    args = parser.parse_args(argv)

    import torch

    from editing.evaluation.incremental import COUNTERS

    work = Path(tempfile.mkdtemp(prefix="fit-time-"))
    os.environ["EDITING_EVAL_CACHE_DIR"] = str(work / "eval-cache")  # a fresh cache: the first fit on is cold
    os.environ.pop("EDITING_EVAL_CACHES", None)
    warm_up(args.methods, args)
    _timed_evaluations()
    if args.paths:
        print(f"{_cpu()}; threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f}", flush=True)
        return compare_paths(args, work)
    print(f"threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f}; general_limit "
          f"{_flag(args.general_limit)}, eval_limit {_flag(args.eval_limit)}, epochs {_flag(args.epochs)}, "
          f"train_batches {_flag(args.train_batches)}",
          flush=True)
    rows, failed = [], False
    for method in args.methods:
        times, records = {}, {}
        for mode in ("off", "cold", "warm"):
            COUNTERS.clear()
            EVALUATIONS.clear()
            times[mode], records[mode] = fit(method, args, work / f"{method}-{mode}", caches=mode != "off")
            print(f"{method} caches {mode}: {times[mode]:.1f} s {dict(COUNTERS)}; evaluations (p0, epochs) "
                  f"{', '.join(f'{s:.1f}' for s in EVALUATIONS)} s; the rest {times[mode] - sum(EVALUATIONS):.1f} s",
                  flush=True)
        for mode in ("cold", "warm"):
            problems = differences(records["off"], records[mode])
            failed |= bool(problems)
            for problem in problems:
                print(f"MISMATCH {method} {mode}: {problem}")
        epochs = len(records["off"]["epochs"])
        rows.append((method, epochs, times["off"], times["cold"], times["warm"],
                     not differences(records["off"], records["cold"]) and not
                     differences(records["off"], records["warm"])))
    print()
    print("| method | evaluations | caches off (s) | on, cold (s) | on, warm (s) | ratio cold | ratio warm | "
          "metrics and balls identical |")
    print("|---|---|---|---|---|---|---|---|")
    for method, epochs, off, cold, warm, same in rows:
        print(f"| {method} | {epochs} | {off:.1f} | {cold:.1f} | {warm:.1f} | {off / cold:.2f}x | {off / warm:.2f}x "
              f"| {'yes' if same else 'NO'} |")
    print(f"\ncommand: {' '.join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
