"""Where MEMIT's memory goes with many canonical examples: peak resident memory by stage of one edit.

A synthetic country_capital task of N canonical examples (invented countries and capitals, seeded) replaces the
canonical file in a temporary copy of the data folder; the other files are the real ones. One process runs the
edit stage by stage while a thread samples its resident set size (/proc/self/statm, every few milliseconds); each
stage reports the RSS it started with and the highest RSS seen while it ran. The stages are found by wrapping
MEMIT's own functions, so the edit computed is the one ``MEMITEditor.compute_edit`` computes:

- ``requests``: the canonical records read and turned into requests;
- ``statistics``: C = E[k k^T] over R (a fresh temporary cache, so it is computed);
- ``templates``: the generated context templates;
- ``targets``: the target vectors z (the gradient steps, a batch of requests at a time);
- ``keys``: per edited layer, the keys averaged over the templates and the current outputs at the last layer;
- ``solve``: per edited layer, Delta W = R K^T (lambda C + K K^T)^-1;
- ``diagnostics``: per edited layer, what the update realises and the key geometry (``edit_diagnostics``);
- ``evaluation``: the edited model on the task's evaluation sets and its N canonical examples (reliability).

``ru_maxrss`` at the end is the kernel's own peak, a check on the sampler (it can only be higher).

    OMP_NUM_THREADS=1 python benchmarks/memit_memory.py [--requests 10000] [--quick] [--json out.json]
    OMP_NUM_THREADS=1 python benchmarks/memit_memory.py --requests 10000 --spread-only --templates 0 --no-eval

The target steps cost most of the time (about 1 s per batch of 32 requests and step on 2 shared cores) but hold
only one batch's graph; ``--steps 1`` measures the same memory. ``--spread-only`` skips them altogether (targets
are the scaled p0 outputs), for the spread alone at large N.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")
SYLLABLES = ("ka", "lo", "mi", "dra", "ven", "tor", "sel", "qua", "bri", "nox", "fen", "u", "ash", "rim", "pel",
             "gor", "tha", "zu", "mer", "ix", "lan", "os", "tre", "vy")


def rss_mib() -> float:
    """The current resident set size in MiB."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE / 2**20


def fixed_mmap_threshold() -> None:
    """Serve every allocation of 128 KiB or more by its own mapping, returned to the system when freed (glibc
    otherwise raises the threshold after large frees and carves such blocks from a heap that fragments), so the RSS
    follows the memory really held; where the values are computed does not change."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD; setting it stops the dynamic raise
    except (OSError, AttributeError):
        pass


def release_free_memory() -> None:
    """Hand the allocator's free pages back to the system (glibc), so that the next stage starts from what is really
    held and its peak counts what it allocates, not what an earlier stage freed but the allocator kept."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class StageSampler:
    """A thread sampling the RSS and charging each sample to the current stage (``switch(name)`` changes it).

    Per stage: ``start_mib`` the RSS when it was first entered, ``peak_mib`` the highest RSS seen in it, and
    ``added_mib`` the most any one call of it added above the RSS that call started at.
    """

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.current: str | None = None
        self.stages: dict[str, dict] = {}
        self._call_start = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _charge(self, value: float) -> None:
        with self._lock:
            if self.current is not None:
                entry = self.stages[self.current]
                entry["peak_mib"] = max(entry["peak_mib"], value)
                entry["added_mib"] = max(entry["added_mib"], value - self._call_start)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._charge(rss_mib())

    def end(self) -> None:
        self._charge(rss_mib())  # a stage ends at what it leaves behind
        with self._lock:
            if self.current is not None:
                entry = self.stages[self.current]
                entry["seconds"] += time.perf_counter() - entry.pop("_since")
            self.current = None

    def switch(self, name: str) -> None:
        self.end()
        release_free_memory()
        now = rss_mib()
        with self._lock:
            self.current = name
            self._call_start = now
            entry = self.stages.setdefault(name, {"start_mib": now, "peak_mib": now, "added_mib": 0.0,
                                                  "seconds": 0.0, "calls": 0})
            entry["calls"] += 1
            entry["_since"] = time.perf_counter()

    def __enter__(self) -> StageSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.end()
        self._stop.set()
        self._thread.join()


def invented_name(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


def synthetic_data_root(folder: Path, real: Path, n: int, seed: int = 0) -> Path:
    """A data folder whose country_capital canonical file (val split) holds ``n`` invented facts; every other file
    is a link to the one under ``real``."""
    folder.mkdir(parents=True)
    (folder / "general").symlink_to(real / "general")
    split = folder / "country_capital" / "split"
    split.mkdir(parents=True)
    for path in (real / "country_capital" / "split").iterdir():
        if path.name != "country_capital_fixed-val.jsonl":
            (split / path.name).symlink_to(path)
    rng = random.Random(seed)
    seen: set[str] = set()
    with open(split / "country_capital_fixed-val.jsonl", "w") as handle:
        while len(seen) < n:
            country = invented_name(rng, rng.randint(2, 4))
            if country in seen:
                continue
            seen.add(country)
            record = {"prefix": f"The capital of {country} is", "suffix": f" {invented_name(rng, 3)}",
                      "country": country}
            handle.write(json.dumps(record) + "\n")
    return folder


def wrap(sampler: StageSampler, restore: list, owner, name: str, stage: str, after: str | None = None) -> None:
    """Replace ``owner.name`` by a function switching the sampler to ``stage`` (then to ``after``) around it."""
    original = getattr(owner, name, None)
    if original is None:
        return

    def wrapped(*args, **kwargs):
        sampler.switch(stage)
        try:
            return original(*args, **kwargs)
        finally:
            if after is not None:
                sampler.switch(after)

    restore.append((owner, name, original))
    setattr(owner, name, wrapped)


def wrap_stages(sampler: StageSampler) -> list:
    """Wrap MEMIT's functions so that each call switches the sampler to its stage; returns what to restore."""
    import editing.methods.memit.module as memit_module
    from editing.methods.memit.module import MEMITEditor

    restore: list = []
    wrap(sampler, restore, MEMITEditor, "canonical_requests", "requests")
    wrap(sampler, restore, MEMITEditor, "statistics", "statistics")
    wrap(sampler, restore, memit_module, "context_templates", "templates")
    wrap(sampler, restore, MEMITEditor, "target_vectors", "targets")
    wrap(sampler, restore, MEMITEditor, "spread_targets", "keys")
    # inside spread_targets, per layer: the keys (and current outputs), the solve, then the diagnostics
    for name in ("subject_activations", "mean_over_templates", "request_keys"):
        wrap(sampler, restore, memit_module, name, "keys")
    wrap(sampler, restore, memit_module, "layer_update", "solve", after="diagnostics")
    wrap(sampler, restore, memit_module, "_key_geometry", "diagnostics")
    return restore


def p0_targets(module, requests, templates, progress: bool = False):
    """Targets without the gradient steps (``--spread-only``): each request's own p0 output at the last edited
    layer, scaled by 1.1, so the spread has a residual to realise; its memory does not depend on the values."""
    from editing.methods.memit.compute import subject_activations
    from editing.methods.memit.requests import RowBuilder

    rows = RowBuilder(module.tokenizer, module.max_length).rows(requests, [""], with_suffixes=False)
    with module.deltas_off():
        z = 1.1 * subject_activations(module.model, rows, module.memit_layers[-1], "output", module._pad_id)
    module.edit_diagnostics = {"targets": z.cpu(), "templates": templates, "layers": []}
    return z


def measure(n: int, model: str, steps: int, templates: int, layers: list[int] | None, samples: int,
            eval_limit: int, evaluation: bool, spread_only: bool = False) -> dict:
    """Run one edit of ``n`` synthetic requests stage by stage; the peak RSS per stage."""
    fixed_mmap_threshold()
    start_rss = rss_mib()
    import torch

    from editing.core.paths import resolve_data_root
    from editing.data.datamodule import TaskDataModule
    from editing.evaluation import evaluate
    from editing.methods import MEMITConfig, MEMITEditor
    from editing.models.loading import ModelConfig

    torch.manual_seed(0)
    real = Path(resolve_data_root(None))
    tmp = tempfile.TemporaryDirectory(prefix="memit-memory-")
    os.environ["EDITING_CACHE"] = str(Path(tmp.name) / "cache")  # statistics really computed, nothing reused
    root = synthetic_data_root(Path(tmp.name) / "data", real, n)
    cfg = MEMITConfig(layers=layers, steps=steps, context_templates=templates, covariance_samples=samples)
    module = MEMITEditor(ModelConfig(name=model, precision="fp32"), cfg)
    dm = TaskDataModule(task="country_capital", data_root=str(root), eval_limit=eval_limit, general_limit=eval_limit)
    dm.attach(module.tokenizer, module.max_length)
    if spread_only:
        module.target_vectors = lambda requests, templates, progress=False: p0_targets(module, requests, templates)
    loaded_rss = rss_mib()
    record: dict = {"requests": n, "model": model, "parameters": sum(p.numel() for p in module.model.parameters()),
                    "steps": 0 if spread_only else steps, "templates": templates + 1, "covariance_samples": samples,
                    "threads": torch.get_num_threads(), "rss_before_import_mib": round(start_rss, 1),
                    "rss_model_loaded_mib": round(loaded_rss, 1)}
    with StageSampler() as sampler:
        restore = wrap_stages(sampler)
        if spread_only:
            wrap(sampler, restore, module, "target_vectors", "targets")
        try:
            started = time.perf_counter()
            module.compute_edit(dm, progress=False)
            record["edit_s"] = round(time.perf_counter() - started, 2)
            if evaluation:
                sampler.switch("evaluation")
                summary = evaluate(module, dm, roles=dm.eval_roles(canonical=True))
                record["reliability"] = summary.get("reliability")
        finally:
            for owner, name, original in restore:
                setattr(owner, name, original)
    record["layers"] = module.memit_layers
    record["stages"] = {name: {"start_mib": round(s["start_mib"], 1), "peak_mib": round(s["peak_mib"], 1),
                               "added_mib": round(s["added_mib"], 1), "seconds": round(s["seconds"], 2),
                               "calls": s["calls"]} for name, s in sampler.stages.items()}
    record["peak_rss_sampled_mib"] = round(max(s["peak_mib"] for s in sampler.stages.values()), 1)
    record["ru_maxrss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)
    tmp.cleanup()
    return record


def table(record: dict) -> str:
    lines = [f"MEMIT memory, {record['requests']} requests, {record['model']} ({record['parameters'] / 1e6:.1f}M "
             f"parameters), layers {record['layers']}, {record['templates']} templates, {record['steps']} steps; "
             f"model loaded at {record['rss_model_loaded_mib']:.0f} MiB",
             f"{'stage':<12} {'start MiB':>10} {'peak MiB':>10} {'added MiB':>10} {'seconds':>9} {'calls':>6}"]
    for name, s in record["stages"].items():
        lines.append(f"{name:<12} {s['start_mib']:>10.0f} {s['peak_mib']:>10.0f} {s['added_mib']:>10.0f} "
                     f"{s['seconds']:>9.1f} {s['calls']:>6}")
    lines.append(f"peak RSS: sampled {record['peak_rss_sampled_mib']:.0f} MiB, ru_maxrss {record['ru_maxrss_mib']:.0f} "
                 f"MiB; edit {record['edit_s']:.1f}s")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10000, help="canonical examples (requests) edited at once")
    parser.add_argument("--quick", action="store_true", help="a quick check: 200 requests, 2 steps")
    parser.add_argument("--model", default="tiny-gpt2")
    parser.add_argument("--steps", type=int, default=20, help="target optimization steps")
    parser.add_argument("--templates", type=int, default=5, help="generated context templates")
    parser.add_argument("--layers", default=None, help="edited layers, e.g. 1,2 (default: the model's)")
    parser.add_argument("--samples", type=int, default=5000, help="tokens of R for the statistics")
    parser.add_argument("--eval-limit", type=int, default=100, help="examples per evaluation set")
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation stage")
    parser.add_argument("--spread-only", action="store_true",
                        help="targets without gradient steps (p0 outputs scaled): measures the spread at large N fast")
    parser.add_argument("--json", help="also write the record here")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.steps = 200, 2
    if args.requests < 1:
        sys.exit("--requests must be at least 1")
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    record = measure(args.requests, args.model, args.steps, args.templates, layers, args.samples, args.eval_limit,
                     not args.no_eval, args.spread_only)
    print(table(record))
    print(json.dumps(record))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
