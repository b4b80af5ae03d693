"""A peer side by side (issue 37 item 5): the paper's own scoring code and our evaluator on the same model and examples.

The paper's code is never part of this project: it is run from a checkout of its public repository at ``PATH``
(imported from there at run time, its files untouched), on the model and tokenizer this project loads, through a thin
shim (``PeerScorer``). Getting ``PATH``, once:

    git clone https://github.com/john-hewitt/model-editing-canonical-examples /some/where/mecr
    export EDITING_PEER_REFERENCE=/some/where/mecr      # or pass --reference /some/where/mecr

(measured at its commit 15a1e7b; only ``evaluate.py`` and ``utils.py`` are used, so a checkout without the two large
``data/*-chunked.jsonl`` files does as well). Then:

    OMP_NUM_THREADS=1 python benchmarks/peer_eval.py --reference PATH [--model smollm2-135m] [--task country_capital]
        [--limit 100] [--general 100] [--repeat 2] [--threads 1] [--float64] [--json out.json]

For each task: the first ``--limit`` examples of its validation evaluation set, scored by the paper's
``ScoreEvaluator``/``PairEvaluator`` (one example per call, its batch size of 1, its threshold test) and by our
``Evaluator``; and the first ``--general`` texts of G, whose token-mean NLL each computes. Both run in fp32 on the
same weights (the paper's transformer runs used bf16 autocast on a GPU; fp32 is what our evaluator measures, and a
flag comparison in two precisions would compare the precisions). Prints the tokens/s of each (the same tokens: every
sequence's prefix and suffix ids, which are checked equal, as are the scored positions), the ratio, the largest score
difference, and the failure flags compared example by example. Exit status: 0 when every flag agrees, 1 when any
differs (each listed) or the token ids differ, 2 for bad input.

Shims, all at run time: the paper's ``utils.py`` looks up ``transformers.models.llama.tokenization_llama_fast
.LlamaTokenizerFast``, a module transformers 5 no longer has; it is supplied, naming transformers' own
``LlamaTokenizerFast``, so the paper's strip-the-suffix rule applies to exactly the Llama tokenizers. Its progress
bars are silenced. Nothing else is changed.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch

REFERENCE_ENV = "EDITING_PEER_REFERENCE"
PEER_MODULES = ("evaluate", "utils")
HOW_TO_GET = ("clone the paper's repository (`git clone https://github.com/john-hewitt/model-editing-canonical-examples"
              " PATH`) and pass --reference PATH or set " + REFERENCE_ENV + "=PATH")


@dataclass
class Side:
    """One evaluator's results on one task: per-example scores and flags, the G NLL, and its timed seconds."""

    scores: list[float] = field(default_factory=list)
    failed: list[bool] = field(default_factory=list)
    general_nll: float | None = None
    eval_seconds: list[float] = field(default_factory=list)
    general_seconds: list[float] = field(default_factory=list)


def load_peer(path: str | Path) -> tuple[types.ModuleType, list[str]]:
    """Import the paper's ``evaluate`` module (and the ``utils`` it imports) from the checkout at ``path``.

    The two modules are imported under their own names with ``path`` first on ``sys.path``, then moved to
    ``peer_evaluate``/``peer_utils`` in ``sys.modules``, so that no other module named ``evaluate`` or ``utils`` is
    shadowed (or shadows them).

    Args:
        path: the checkout's folder.

    Returns:
        The paper's ``evaluate`` module and the shims applied (one line each).

    Raises:
        ConfigError: ``path`` is not a checkout holding ``evaluate.py`` and ``utils.py``, or they fail to import.
    """
    from editing.core.errors import ConfigError

    folder = Path(path).expanduser().resolve()
    missing = [f"{name}.py" for name in PEER_MODULES if not (folder / f"{name}.py").is_file()]
    if missing:
        raise ConfigError(f"--reference {path}: no {' or '.join(missing)} there, so it is not a checkout of the "
                          f"paper's repository; {HOW_TO_GET}")
    shims = _tokenizer_module_shim()
    saved = {name: sys.modules.pop(name) for name in PEER_MODULES if name in sys.modules}
    sys.path.insert(0, str(folder))
    try:
        peer = importlib.import_module("evaluate")
        for name in PEER_MODULES:
            where = Path(getattr(sys.modules.get(name), "__file__", "") or "").resolve()
            if where.parent != folder:
                raise ConfigError(f"--reference {path}: module {name!r} was imported from {where}, not from the "
                                  "checkout; run from another folder or rename that module")
    except ImportError as err:
        raise ConfigError(f"--reference {path}: the paper's evaluate.py does not import here ({err}); install what it "
                          "names (it needs only torch, transformers and tqdm)") from err
    finally:
        sys.path.remove(str(folder))
        for name in PEER_MODULES:
            module = sys.modules.pop(name, None)
            if module is not None:
                sys.modules[f"peer_{name}"] = module
        sys.modules.update(saved)
    peer.tqdm = lambda iterable, **_: iterable  # a bar per one-example call would bury the output
    return peer, [*shims, "progress bars of the paper's evaluate.py silenced"]


def _tokenizer_module_shim() -> list[str]:
    """Supply ``transformers.models.llama.tokenization_llama_fast`` where transformers lacks it (version 5)."""
    import transformers
    import transformers.models.llama as llama

    try:
        llama.tokenization_llama_fast  # noqa: B018 - the attribute lookup is what the paper's code does
        return []
    except (AttributeError, ImportError, ModuleNotFoundError):
        pass
    name = "transformers.models.llama.tokenization_llama_fast"
    module = types.ModuleType(name)
    module.LlamaTokenizerFast = transformers.LlamaTokenizerFast
    sys.modules[name] = module
    llama.tokenization_llama_fast = module
    return [f"{name} supplied (transformers {transformers.__version__} has none), naming "
            f"{transformers.LlamaTokenizerFast.__module__}.LlamaTokenizerFast"]


class PeerScorer:
    """The paper's evaluators on one task's examples and on G, driven one example at a time.

    The paper's ``ScoreEvaluator``/``PairEvaluator`` read a JSONL file and tokenize it into batches of one example
    (its ``EVAL_BATCH_SIZE``); ``evaluate()`` then scores all its batches and returns the failure rate. Giving it one
    batch at a time makes that rate the example's own failure flag (1.0 or 0.0), computed by its code.

    Args:
        peer: the paper's ``evaluate`` module (``load_peer``).
        model: the model under evaluation (Hugging Face interface: ``model(ids).logits``, ``model.device``).
        tokenizer: its tokenizer.
        loss: the task's loss type (the paper's names: good, bad, balance, good-v-bad).
        threshold: the task's failure threshold.
        evaluation_file: the evaluation examples (JSONL).
        general_file: the texts of G (JSONL).
    """

    def __init__(self, peer: types.ModuleType, model, tokenizer, loss: str, threshold: float, evaluation_file: str,
                 general_file: str) -> None:
        pair = loss in ("balance", "good-v-bad")
        cls = peer.PairEvaluator if pair else peer.ScoreEvaluator
        args = {"evaluation_set": evaluation_file}
        # as the paper's ft_experiment.py builds them: suffix scores summed per example ('example'), G per token
        self.flags = cls(args, model, tokenizer, loss_type=loss, threshold=threshold, normalize="example")
        self.scores = cls(args, model, tokenizer, loss_type=loss, threshold=None, normalize="example")
        self.general = peer.ScoreEvaluator({"evaluation_set": general_file}, model, tokenizer,
                                           eval_type="unconditional", normalize="token")
        self.batches = list(self.flags.batches)

    def failed(self) -> list[bool]:
        """Each example's failure flag, by the paper's threshold test (timed by the caller)."""
        out = []
        for batch in self.batches:
            self.flags.batches = [batch]
            out.append(bool(self.flags.evaluate() > 0.5))
        self.flags.batches = self.batches
        return out

    def example_scores(self) -> list[float]:
        """Each example's score (suffix NLL sum, or its pair difference): the paper's code without a threshold."""
        out = []
        for batch in self.batches:
            self.scores.batches = [batch]
            out.append(float(self.scores.evaluate()))
        self.scores.batches = self.batches
        return out

    def general_nll(self) -> float:
        """Token-mean NLL of G, the paper's way (one text per forward pass, full logits)."""
        return float(self.general.evaluate())

    def sequences(self) -> list[list[tuple[list[int], list[int]]]]:
        """Per example, per suffix: the token ids the paper's batcher built and the positions its mask scores."""
        keys = (("input_ids1", "loss_mask1"), ("input_ids2", "loss_mask2")) if "input_ids1" in self.batches[0] \
            else (("input_ids", "loss_mask"),)
        return [[(b[ids][0].tolist(), b[mask][0].nonzero().flatten().tolist()) for ids, mask in keys]
                for b in self.batches]

    def general_sequences(self) -> list[list[int]]:
        """The token ids of each text of G as the paper's batcher built them."""
        return [b["input_ids"][0].tolist() for b in self.general.batches]


@torch.no_grad()
def float64_general_nll(model, texts: list[list[int]]) -> float:
    """Token-mean NLL of ``texts`` with float64 log-softmax (one text per forward pass, full logits): the yardstick
    both fp32 figures are compared with."""
    total, count = 0.0, 0
    for ids in texts:
        x = torch.tensor([ids], dtype=torch.long, device=model.device)
        logprobs = torch.log_softmax(model(input_ids=x).logits[0, :-1].double(), dim=-1)
        total += float(-logprobs.gather(1, x[0, 1:, None]).sum())
        count += len(ids) - 1
    return total / count


def copy_lines(source: Path, lines: list[int], target: Path) -> None:
    """Write the lines numbered ``lines`` (1-based) of ``source`` to ``target``: the records our reader kept."""
    wanted = set(lines)
    with source.open("rb") as handle, target.open("wb") as out:
        for number, data in enumerate(handle, start=1):
            if number in wanted:
                out.write(data.rstrip(b"\r\n") + b"\n")


def differing(ours: list[bool], theirs: list[bool]) -> list[int]:
    """Positions whose failure flags differ (a length mismatch counts every unmatched position)."""
    n = max(len(ours), len(theirs))
    return [i for i in range(n) if i >= len(ours) or i >= len(theirs) or ours[i] != theirs[i]]


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _our_ids(dm, role: str) -> list[list[tuple[list[int], list[int]]]]:
    return [[(list(s.ids), list(range(s.score_from - 1, len(s.ids) - 1))) for s in e.sequences]
            for e in dm.load(role).examples]


def run_task(task: str, loaded, peer, args, workdir: Path) -> tuple[dict, int]:
    """Both evaluators on one task (alternating, ``args.repeat`` rounds); returns the task's report and problems.

    Long because it is the benchmark's one sequence: prepare both sides, check that they see the same tokens, time
    them in alternation, then compare flags and scores.
    """
    from editing.data.datamodule import TaskDataModule
    from editing.evaluation.evaluator import evaluate

    dm = TaskDataModule(task=task, split="val", eval_limit=args.limit, general_limit=args.general)
    dm.attach(loaded.tokenizer, loaded.max_length)
    files = {}
    for role in ("evaluation", "general"):
        records = dm.records(role)
        files[role] = workdir / f"{task}-{role}.jsonl"
        copy_lines(dm.path(role), [r.line for r in records], files[role])
    scorer = PeerScorer(peer, loaded.model, loaded.tokenizer, dm.task.loss.value, dm.task.threshold,
                        str(files["evaluation"]), str(files["general"]))
    problems = 0
    same_eval = _our_ids(dm, "evaluation") == scorer.sequences()
    ours_general = [list(e.sequences[0].ids) for e in dm.load("general").examples]
    same_general = ours_general == scorer.general_sequences()
    if not (same_eval and same_general):
        problems += 1
        print(f"[{task}] TOKENS DIFFER: evaluation set {'same' if same_eval else 'different'}, G "
              f"{'same' if same_general else 'different'} (ids or scored positions): the comparison is void")
    eval_tokens = sum(len(s.ids) for e in dm.load("evaluation").examples for s in e.sequences)
    general_tokens = sum(len(e.sequences[0].ids) for e in dm.load("general").examples)
    n = len(dm.load("evaluation").examples)
    print(f"[{task}] {n} evaluation examples ({eval_tokens} tokens), {len(ours_general)} texts of G "
          f"({general_tokens} tokens); threshold {dm.task.threshold:.6g}, loss {dm.task.loss.value}", flush=True)

    # warm-up, untimed: our first evaluation measures this machine's product mode (once, cached); both run once
    evaluate(loaded, dm, roles=["evaluation"])
    scorer.flags.batches = scorer.batches[:1]
    scorer.flags.evaluate()
    scorer.flags.batches = scorer.batches
    from editing.evaluation.products import chosen_mode

    print(f"[{task}] our evaluator's product mode: {chosen_mode(next(loaded.model.parameters()).device)} (the peer "
          "runs under torch's defaults)", flush=True)
    ours, theirs = Side(), Side()
    for round_ in range(args.repeat):
        order = ("ours", "peer") if round_ % 2 == 0 else ("peer", "ours")
        for who in order:
            with torch.no_grad():
                if who == "ours":
                    start = time.perf_counter()
                    summary = evaluate(loaded, dm, roles=["evaluation"])
                    ours.eval_seconds.append(time.perf_counter() - start)
                    start = time.perf_counter()
                    ours.general_nll = evaluate(loaded, dm, roles=["general"])["general_nll"]
                    ours.general_seconds.append(time.perf_counter() - start)
                    rows = sorted(summary["per_example"], key=lambda r: r["index"])
                    ours.scores = [r["score"] for r in rows]
                    ours.failed = [r["failed"] for r in rows]
                else:
                    start = time.perf_counter()
                    theirs.failed = scorer.failed()
                    theirs.eval_seconds.append(time.perf_counter() - start)
                    start = time.perf_counter()
                    theirs.general_nll = scorer.general_nll()
                    theirs.general_seconds.append(time.perf_counter() - start)
        print(f"[{task}] round {round_ + 1}: ours {ours.eval_seconds[-1]:.2f} s + {ours.general_seconds[-1]:.2f} s "
              f"(evaluation set + G), peer {theirs.eval_seconds[-1]:.2f} s + {theirs.general_seconds[-1]:.2f} s",
              flush=True)
    with torch.no_grad():
        theirs.scores = scorer.example_scores()  # untimed: the same forward passes again, without the threshold

    def rate(tokens: int, seconds: list[float]) -> float:
        return tokens * len(seconds) / sum(seconds)

    rates = {"ours_eval": rate(eval_tokens, ours.eval_seconds), "peer_eval": rate(eval_tokens, theirs.eval_seconds),
             "ours_general": rate(general_tokens, ours.general_seconds),
             "peer_general": rate(general_tokens, theirs.general_seconds)}
    total = eval_tokens + general_tokens
    ours_all = rate(total, [a + b for a, b in zip(ours.eval_seconds, ours.general_seconds, strict=True)])
    peer_all = rate(total, [a + b for a, b in zip(theirs.eval_seconds, theirs.general_seconds, strict=True)])
    score_diff = max((abs(a - b) for a, b in zip(ours.scores, theirs.scores, strict=True)), default=0.0)
    nll_rel = abs(ours.general_nll - theirs.general_nll) / abs(theirs.general_nll)
    print(f"[{task}] evaluation set: ours {rates['ours_eval']:.1f} tokens/s, peer {rates['peer_eval']:.1f} tokens/s, "
          f"ratio {rates['ours_eval'] / rates['peer_eval']:.2f}x")
    print(f"[{task}] G: ours {rates['ours_general']:.1f} tokens/s, peer {rates['peer_general']:.1f} tokens/s, "
          f"ratio {rates['ours_general'] / rates['peer_general']:.2f}x; general NLL ours {ours.general_nll:.9f}, "
          f"peer {theirs.general_nll:.9f} (relative difference {nll_rel:.2e})")
    print(f"[{task}] both: ours {ours_all:.1f} tokens/s, peer {peer_all:.1f} tokens/s, "
          f"ratio {ours_all / peer_all:.2f}x")
    exact = None
    if args.float64:
        exact = float64_general_nll(loaded.model, ours_general)
        print(f"[{task}] G in float64 (log-softmax of the fp32 logits, untimed): {exact:.9f}; relative difference "
              f"ours {(ours.general_nll - exact) / exact:+.2e}, peer {(theirs.general_nll - exact) / exact:+.2e}")
    diff = differing(ours.failed, theirs.failed)
    print(f"[{task}] failure flags: ours {sum(ours.failed)}/{len(ours.failed)} failed, peer "
          f"{sum(theirs.failed)}/{len(theirs.failed)}; max |score difference| {score_diff:.2e}; "
          + ("IDENTICAL example by example" if not diff else f"{len(diff)} DIFFER:"))
    records = dm.records("evaluation")
    for i in diff:
        line = records[i].line if i < len(records) else None
        print(f"    example {i} (line {line}): ours failed={ours.failed[i] if i < len(ours.failed) else None} "
              f"score {ours.scores[i] if i < len(ours.scores) else float('nan'):.6f}; peer failed="
              f"{theirs.failed[i] if i < len(theirs.failed) else None} score "
              f"{theirs.scores[i] if i < len(theirs.scores) else float('nan'):.6f}")
    problems += bool(diff)
    report = {
        "task": task, "examples": n, "evaluation_tokens": eval_tokens, "general_texts": len(ours_general),
        "general_tokens": general_tokens, "same_tokens": same_eval and same_general, "tokens_per_s": rates,
        "tokens_per_s_both": {"ours": ours_all, "peer": peer_all}, "ratio_both": ours_all / peer_all,
        "seconds": {"ours_eval": ours.eval_seconds, "peer_eval": theirs.eval_seconds,
                    "ours_general": ours.general_seconds, "peer_general": theirs.general_seconds},
        "general_nll": {"ours": ours.general_nll, "peer": theirs.general_nll, "relative_difference": nll_rel,
                        "float64": exact},
        "max_score_difference": score_diff, "differing": diff,
        "per_example": [{"index": r.index, "line": r.line, "ours_score": a, "ours_failed": fa, "peer_score": b,
                         "peer_failed": fb}
                        for r, a, fa, b, fb in zip(records, ours.scores, ours.failed, theirs.scores, theirs.failed,
                                                   strict=False)],
    }
    return report, problems


def main(argv: list[str] | None = None) -> int:
    """Run both evaluators on each task; returns the exit status (0 flags identical, 1 any differ, 2 bad input)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", default=os.environ.get(REFERENCE_ENV),
                        help=f"checkout of the paper's repository (default: ${REFERENCE_ENV})")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", nargs="+", default=["country_capital"], help="built-in tasks (validation split)")
    parser.add_argument("--limit", type=int, default=100, help="first N evaluation examples per task")
    parser.add_argument("--general", type=int, default=100, help="first N texts of G")
    parser.add_argument("--repeat", type=int, default=2, help="timed rounds of each side, alternating")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own count)")
    parser.add_argument("--float64", action="store_true",
                        help="also G's NLL with float64 log-softmax (one more pass, untimed), to see whose is nearer")
    parser.add_argument("--json", default=None, help="also write the report (per-example scores and flags) here")
    args = parser.parse_args(argv)
    from editing.core.errors import ConfigError, EditingError

    try:
        if not args.reference:
            raise ConfigError(f"no --reference given and {REFERENCE_ENV} is not set; {HOW_TO_GET}")
        for name, value in (("--limit", args.limit), ("--general", args.general), ("--repeat", args.repeat)):
            if value < 1:
                raise ConfigError(f"{name} {value}: give a positive number")
        if args.json:
            from editing.core.files import ensure_writable

            ensure_writable(args.json, overwrite=False, flag="another --json path")
        peer, shims = load_peer(args.reference)
        if args.threads:
            torch.set_num_threads(args.threads)
        from editing.models.loading import ModelConfig, load_model

        loaded = load_model(ModelConfig(name=args.model, precision="fp32"))
        print(f"CPU {_cpu()}; torch {torch.__version__}, {torch.get_num_threads()} threads; model {args.model} (fp32); "
              f"peer {Path(args.reference).resolve()}")
        for line in shims:
            print(f"shim: {line}")
        reports, problems = [], 0
        with tempfile.TemporaryDirectory(prefix="peer-eval-") as tmp:
            for task in args.task:
                report, bad = run_task(task, loaded, peer, args, Path(tmp))
                reports.append(report)
                problems += bad
    except EditingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        from editing.core.files import write_json

        write_json(args.json, {"model": args.model, "threads": torch.get_num_threads(), "cpu": _cpu(),
                               "reference": str(Path(args.reference).resolve()), "tasks": reports})
    print("flags: " + ("identical on every task" if not problems else f"{problems} task(s) with differences"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
