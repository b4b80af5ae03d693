"""Carry a Backpack edit to a larger model: per ball, the largest beta (1.0 down in steps of 0.1) whose ensemble
stays inside the ball on the general set, then the ensemble's evaluation at that beta (SPEC section 9).

The general NLL of every beta comes from one pass over G: the three models' hidden states are computed once per batch
and only the cheap head arithmetic is repeated per beta.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from editing.core.errors import ConfigError
from editing.core.types import Metric
from editing.data.batching import IGNORE
from editing.evaluation import evaluate
from editing.evaluation.precision import full_precision
from editing.methods.base import EditingModule
from editing.models.architecture import backpack_of
from editing.models.ensemble import EnsembleLM, beta_set_to, shared_vocabulary
from editing.models.loading import LoadedModel
from editing.rules.budget import Ball, ball_key, choose_beta, degradation, edit_folder_name
from editing.runs.records import Metrics
from editing.runs.tables import ensemble_table

log = logging.getLogger(__name__)

BETAS = tuple(round(1.0 - 0.1 * i, 1) for i in range(11))  # 1.0, 0.9, ..., 0.0


@torch.no_grad()
def general_nll_by_beta(ensemble: EnsembleLM, datamodule, betas: tuple[float, ...] = BETAS,
                        progress: bool = False) -> dict[float, float]:
    """Token-mean NLL on the general set G of the ensemble at each beta, from one pass over G (in full fp32)."""
    device = next(ensemble.large.parameters()).device
    ensemble.eval()
    sums = torch.zeros(len(betas), dtype=torch.float64, device=device)  # summed on the device, read once
    tokens = 0
    loader = datamodule.eval_dataloader("general")
    if progress:
        loader = tqdm(loader, desc="ensemble general NLL (all betas)", leave=False, file=sys.stderr)
    with full_precision():
        for batch in loader:
            ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
            scored = labels != IGNORE
            hidden = ensemble.hidden_states(ids, mask)[scored]
            targets = labels[scored]
            tokens += int(targets.numel())
            for start in range(0, hidden.shape[0], 1024):
                # the three heads once per chunk; only the weighted sum is repeated per beta
                large, change = ensemble.head.parts_from_hidden(hidden[start: start + 1024])
                tgt = targets[start: start + 1024, None]
                for i, beta in enumerate(betas):
                    logits = large + beta * change if beta != 0.0 else large
                    nll = torch.logsumexp(logits, -1) - logits.gather(1, tgt).squeeze(1)
                    sums[i] += nll.double().sum()
    return {b: float(total) / max(1, tokens) for b, total in zip(betas, sums.tolist(), strict=True)}


def ensemble_module(large: LoadedModel, backpack: EditingModule, vocab: int) -> tuple[LoadedModel, EnsembleLM]:
    """The ensemble of ``large`` and an edited Backpack module, as a model ``evaluate`` can score."""
    ensemble = EnsembleLM(large.model, backpack.model, backpack.reference, vocab)
    identity = {"name": f"ensemble({large.identity['name']} + {backpack.identity['name']})",
                "large": large.identity, "backpack": backpack.identity}
    loaded = LoadedModel(model=ensemble, tokenizer=large.tokenizer, max_length=min(large.max_length,
                                                                                   backpack.max_length),
                         identity=identity)
    return loaded, ensemble


def search(large: LoadedModel, backpacks: dict[str, EditingModule], datamodule, balls: tuple[float, ...],
           progress: bool = True) -> dict:
    """Per ball: choose beta on G, then evaluate the ensemble there.

    Args:
        large: the large model.
        backpacks: ball key -> the Backpack module carrying that ball's edit (``reference()`` gives its p0); each is
            moved to the large model's device.
        datamodule: the task's data (attached to the large model's tokenizer here).
        balls: the eps values.
        progress: progress bars.

    Returns:
        ``{"initial": metrics of the large model, "balls": {key: {"beta", "general_nll_by_beta", "metrics"}}}``.
    """
    first = next(iter(backpacks.values()))
    # both models on the large model's device (a Backpack edit is loaded onto the CPU)
    device = next(large.model.parameters()).device
    for module in backpacks.values():
        module.to(device)
    vocab = shared_vocabulary(large.tokenizer, first.tokenizer)
    datamodule.attach(large.tokenizer, min(large.max_length, first.max_length))
    module, ensemble = ensemble_module(large, first, vocab)
    with beta_set_to(ensemble, 0.0):
        initial = evaluate(module, datamodule, progress=progress)
    out: dict = {"initial": initial, "balls": {}, "vocab": vocab}
    # balls whose runs chose the same epoch carry identical edits: measure each distinct edit (and beta) once
    nll_cache: dict[str, dict[float, float]] = {}
    metrics_cache: dict[tuple[str, float], dict] = {}
    for eps in balls:
        key = ball_key(eps)
        if key not in backpacks:
            raise ConfigError(f"no Backpack edit for ball {key}")
        module, ensemble = ensemble_module(large, backpacks[key], vocab)
        digest = _edit_digest(backpacks[key])
        if digest not in nll_cache:
            nll_cache[digest] = general_nll_by_beta(ensemble, datamodule, progress=progress)
        by_beta = nll_cache[digest]
        beta = choose_beta(by_beta, eps)
        if beta == 0.0:
            metrics = initial
        elif (digest, beta) in metrics_cache:
            metrics = metrics_cache[(digest, beta)]
        else:
            with beta_set_to(ensemble, beta):
                metrics = metrics_cache[(digest, beta)] = evaluate(module, datamodule, progress=progress)
        log.info("ensemble ball %s: beta %.1f", key, beta)
        out["balls"][key] = {"beta": beta, "general_nll_by_beta": {f"{b:.1f}": v for b, v in by_beta.items()},
                             "metrics": metrics}
    return out


def ball_results(found: dict, balls: tuple[float | Ball, ...]) -> dict[str, dict]:
    """Per ball, the ensemble's results-file entry: beta, the general NLL at every beta, success before and after
    (and their difference, a fraction), the general NLL, the degradation relative to the large model alone, and
    the metrics at the chosen beta.

    Args:
        found: ``search``'s output.
        balls: the balls, in the order to report them.
    """
    initial = found["initial"]
    out = {}
    for eps in balls:
        key = ball_key(eps)
        entry = found["balls"][key]
        m = entry["metrics"]
        out[key] = {"beta": entry["beta"], "general_nll_by_beta": entry["general_nll_by_beta"],
                    "success_before": initial[Metric.SUCCESS_RATE], "success_after": m[Metric.SUCCESS_RATE],
                    "success_change": m[Metric.SUCCESS_RATE] - initial[Metric.SUCCESS_RATE],
                    Metric.GENERAL_NLL.value: m[Metric.GENERAL_NLL],
                    Metric.DEGRADATION.value: degradation(m[Metric.GENERAL_NLL], initial[Metric.GENERAL_NLL]),
                    "metrics": {k: v for k, v in m.items() if k != "per_example"}}
    return out


def results_table(found: dict, balls: tuple[float | Ball, ...]) -> str:
    """``search``'s outcome as a Markdown table (see ``editing.runs.tables.ensemble_table``)."""
    initial = found["initial"]
    rows = {}
    for key, entry in ball_results(found, balls).items():
        rows[key] = (entry["beta"], Metrics.of(entry["metrics"], entry[Metric.DEGRADATION]))
    return ensemble_table(Metrics.of(initial), rows)


def _edit_digest(module: EditingModule) -> str:
    """A hash of everything the ensemble reads from a Backpack module: the edited model (every parameter and buffer,
    an installed sense edit, adapter settings) and the reference model its ``reference()`` yields.

    Hashing whole models rather than "the trainable deltas" keeps the digest right for every way an edit reaches
    the ensemble: a loaded LoRA adapter or changed tensors train nothing, and a full-finetuning module's p0 is a
    separate model.
    """
    digest = hashlib.sha256()
    _hash_model(digest, "edited", module.model)
    with module.reference() as base:
        _hash_model(digest, "base", base)
    return digest.hexdigest()


def _hash_model(digest, label: str, model: torch.nn.Module) -> None:
    state = dict(model.named_parameters())
    state.update(model.named_buffers())
    backpack = backpack_of(model)
    edit = getattr(backpack, "sense_edit", None) if backpack is not None else None
    if edit is not None:  # installed outside the module tree: not among the model's own tensors
        state.update({f"sense_edit.{n}": t for n, t in edit.state_dict().items()})
    digest.update(f"{label}:{type(model).__name__}".encode())
    # LoRA's scaling (alpha / rank) and target modules live in the adapter config, not in tensors
    for name, config in sorted((getattr(model, "peft_config", None) or {}).items()):
        settings = json.dumps(config.to_dict(), sort_keys=True, default=_jsonable)
        digest.update(f"peft:{name}:{settings}".encode())
    for name in sorted(state):
        tensor = state[name].detach()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def _jsonable(value: object) -> object:
    return sorted(map(str, value)) if isinstance(value, set | frozenset) else str(value)


def edit_folders(edits: str | Path, balls: tuple[float, ...]) -> dict[str, Path]:
    """Ball key -> edit folder: a fit run's ``edits/ball_<eps>`` folders, or one edit folder for every ball."""
    edits = Path(edits)
    if (edits / "base_model.json").is_file():
        return {ball_key(eps): edits for eps in balls}
    root = edits / "edits" if (edits / "edits").is_dir() else edits
    found = {ball_key(eps): root / edit_folder_name(ball_key(eps)) for eps in balls}
    missing = [str(p) for p in found.values() if not (p / "base_model.json").is_file()]
    if missing:
        raise ConfigError(f"{edits} is neither an edit folder nor a run folder with edits for every ball "
                          f"(missing: {', '.join(missing)})")
    return found
