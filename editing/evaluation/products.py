"""The fp32 product mode every CPU evaluation runs under, chosen once per machine (issue 37 item 2).

``editing.evaluation.backend`` measures which of torch's fp32 product paths is fastest here *and* exact (its error
against float64 is fp32's, never bf16's or tf32's). That measurement takes seconds, so it runs once per machine and
its result is kept in the evaluation cache folder, ``<evaluation cache>/products/<key>.json``.

**What the key covers, and why that is enough.** The choice depends on which kernels run and how fast: the CPU model
and its full flag string (AMX, AVX512-BF16 decide whether oneDNN's bf16 math mode rounds to bf16 or runs fp32
kernels), torch's CPU capability and version (its oneDNN and MKL come with it), the thread count, the candidate
modes, the timed shapes and the digest of this code and ``backend``'s. A file is read only when it holds exactly
that material, a mode among the candidates that its own record says is exact, and finite timings; anything else is
a miss (a warning names the file), measured again and written over atomically. With ``$EDITING_EVAL_CACHES=off`` the
file is neither read nor written: each process measures afresh.

``$EDITING_PRODUCTS`` pins a mode (``default`` or a name of ``backend.MODES``; ``auto``, the default, measures). A
pinned mode must pass the error check too: a mode that rounds is refused with a ``ConfigError``, never used.

Only CPU evaluations take a mode; on any other device the evaluation runs as it always did.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch

from editing.caches.entries import canonical_json, write_errors
from editing.core.digests import code_digest
from editing.core.errors import ConfigError
from editing.core.files import write_json
from editing.core.paths import evaluation_cache_dir
from editing.evaluation import backend
from editing.evaluation.attention import attention_at_ieee

log = logging.getLogger(__name__)

PIN_ENV = "EDITING_PRODUCTS"
CACHES_ENV = "EDITING_EVAL_CACHES"  # the evaluation caches' switch (editing.evaluation.caching.SWITCH_ENV)
FORMAT = "canonical-editing product choice 1"

SMOLLM2_SHAPES: list[tuple[tuple[int, int, int], float]] = [
    ((1024, 576, 576), 60.0),     # attention q and o, 30 layers
    ((1024, 576, 192), 60.0),     # attention k and v (3 key-value heads of 64)
    ((1024, 576, 1536), 60.0),    # MLP gate and up
    ((1024, 1536, 576), 30.0),    # MLP down
    ((128, 576, 49152), 8.0),     # LM head over 1024 scored positions, timed on 128 of them (an eighth of the cost)
]
"""The products timed for the machine's choice, with how often each runs per 1024-token evaluation batch: SmolLM2's
(the project's model) at the evaluator's batch size (``max_tokens`` 1024). The choice is per machine, not per model:
the kernels that win on these shapes are the ones a smaller model's products take too, and its error check covers
other shapes (``backend.CHECK_SHAPES``)."""
TIMING_REPEAT = 3

_MEMO: dict[tuple, str] = {}
"""Choices already made in this process, by machine facts, pin and cache switch: the per-batch lookup."""


@lru_cache(maxsize=1)
def _cpu_info() -> tuple[str, str]:
    """(model name, flags) of the first CPU in ``/proc/cpuinfo``; elsewhere the platform's processor string."""
    name, flags = "", ""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and not name:
            name = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = " ".join(sorted(value.split()))
    return name or platform.processor() or platform.machine(), flags


def machine_facts() -> dict:
    """What decides which product path is fastest and exact here: CPU model and flags, torch's CPU capability and
    version, the thread count."""
    name, flags = _cpu_info()
    return {"cpu": name, "flags": flags, "capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def choice_material(facts: dict | None = None) -> dict:
    """The cache key's material: the machine facts, the candidate modes, the timed shapes and the code digest."""
    return {"facts": facts or machine_facts(), "modes": sorted(backend.MODES), "shapes": SMOLLM2_SHAPES,
            "repeat": TIMING_REPEAT, "margin": backend.MARGIN,
            "code": code_digest("editing.evaluation.backend", "editing.evaluation.products")}


def choice_path(material: dict) -> Path:
    """The file that holds the choice made under ``material``."""
    key = hashlib.sha256(canonical_json(material).encode()).hexdigest()[:24]
    return evaluation_cache_dir() / "products" / f"{key}.json"


def _caches_off() -> bool:
    return os.environ.get(CACHES_ENV, "").strip().lower() in ("off", "0", "false", "no")


def _problem(record, material: dict) -> str | None:
    """Why a stored record cannot be used (None when it can)."""
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        return "is not a product choice of this format"
    if canonical_json(record.get("material")) != canonical_json(material):
        return "was made for another machine, torch or code than its name says"
    mode, exact, seconds = record.get("mode"), record.get("exact"), record.get("seconds")
    if not isinstance(exact, list) or not isinstance(seconds, dict) or mode not in backend.MODES:
        return f"names an unknown mode {mode!r}" if isinstance(exact, list) else "lacks its exact modes"
    if mode not in exact or mode in (record.get("rejected") or {}):
        return f"chooses {mode!r}, which its own record does not count as exact"
    if not all(isinstance(s, (int, float)) and math.isfinite(s) and s > 0 for s in seconds.values()):
        return "holds timings that are not positive finite numbers"
    return None


def read_choice(path: Path, material: dict) -> str | None:
    """The mode stored at ``path`` for ``material``, or None (a miss; a warning says why when the file exists)."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        log.warning("product choice %s is unreadable (%s); measuring again", path, err)
        return None
    problem = _problem(record, material)
    if problem:
        log.warning("product choice %s %s; measuring again", path, problem)
        return None
    return record["mode"]


def measure_choice() -> backend.Choice:
    """Time every mode on ``SMOLLM2_SHAPES`` and check every mode's error (also on small and attention products)."""
    shapes = [shape for shape, _ in SMOLLM2_SHAPES]
    weights = [weight for _, weight in SMOLLM2_SHAPES]
    with warnings.catch_warnings():  # torch warns that oneDNN's TF32 mode is for Intel GPUs: the check decides
        warnings.simplefilter("ignore")
        return backend.choose_mode(shapes, repeat=TIMING_REPEAT, weights=weights, margin=backend.MARGIN, checks=True)


def _pinned(name: str) -> str:
    if name not in backend.MODES:
        raise ConfigError(f"${PIN_ENV}={name!r} is not a product mode; use auto or one of "
                          f"{', '.join(sorted(backend.MODES))}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        error, exact = backend.check_errors({"default": backend.MODES["default"], name: backend.MODES[name]})[name]
    if not exact:
        raise ConfigError(f"${PIN_ENV}={name!r} rounds fp32 products on this CPU (relative error {error:.1e} against "
                          f"float64): evaluation must be exact to fp32; set {PIN_ENV}=auto or default")
    return name


def chosen_mode(device: torch.device | str = "cpu") -> str:
    """The product mode evaluations on ``device`` run under: ``default`` off the CPU, else the pinned or measured
    (and cached) exact mode. Cheap after the first call in a process (a dictionary lookup).

    Raises:
        ConfigError: ``$EDITING_PRODUCTS`` names an unknown mode or one that rounds here.
    """
    if torch.device(device).type != "cpu":
        return "default"
    facts = machine_facts()
    pin = os.environ.get(PIN_ENV, "auto").strip() or "auto"
    memo = (canonical_json(facts), pin, _caches_off())
    if memo in _MEMO:
        return _MEMO[memo]
    if pin != "auto":
        mode = _pinned(pin)
    else:
        mode = _measured(facts)
    _MEMO[memo] = mode
    return mode


def _measured(facts: dict) -> str:
    material = choice_material(facts)
    path = choice_path(material)
    off = _caches_off()
    mode = None if off else read_choice(path, material)
    if mode is not None:
        return mode
    choice = measure_choice()
    log.info("product mode for this machine: %s (exact: %s; refused: %s)", choice.mode, ", ".join(choice.seconds),
             ", ".join(choice.rejected) or "none")
    if not off:
        record = {"format": FORMAT, "material": material, "mode": choice.mode, "exact": sorted(choice.seconds),
                  "seconds": choice.seconds, "rejected": choice.rejected}
        try:
            write_json(path, record, overwrite=True)
        except write_errors() as err:
            log.warning("could not write the product choice %s (%s); the run goes on without it", path, err)
    return choice.mode


@contextmanager
def evaluation_products(device: torch.device | str = "cpu") -> Iterator[str]:
    """Within the context, fp32 products run under ``chosen_mode(device)`` (enter it inside ``full_precision``,
    which sets every backend to IEEE first); yields the mode's name."""
    mode = chosen_mode(device)
    # the mode is timed on the linear layers and the head; attention keeps IEEE (editing.evaluation.attention)
    with backend.MODES[mode](), attention_at_ieee(mode != "default"):
        yield mode


def forget_choices() -> None:
    """Drop this process's memo of choices (the next evaluation reads the cache file or measures again)."""
    _MEMO.clear()


__all__ = ["FORMAT", "PIN_ENV", "SMOLLM2_SHAPES", "choice_material", "choice_path", "chosen_mode",
           "evaluation_products", "forget_choices", "machine_facts", "measure_choice", "read_choice"]
