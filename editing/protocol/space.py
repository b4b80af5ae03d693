"""Search spaces of the protocol's random search (SPEC section 6): a method's ``lightning_configs/sweeps/<method>.yaml``
parsed into distributions over dotted ``editing fit`` keys, and the seeded sampler that draws from them."""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from editing.core.errors import ConfigError
from editing.core.paths import SPACE_DIR
from editing.core.textfiles import load_yaml

DISTRIBUTIONS = ("log10_uniform", "uniform", "int_uniform", "categorical")


@dataclass(frozen=True)
class Parameter:
    """One searched setting: a dotted ``editing fit`` key and its distribution.

    Args:
        key: the CLI key, e.g. ``model.init_args.lora.rank``.
        kind: ``log10_uniform`` (10^U(low, high)), ``uniform``, ``int_uniform`` (U{low..high}) or ``categorical``.
        args: ``[low, high]``, or the choices of a categorical.
    """

    key: str
    kind: str
    args: tuple

    def suggest(self, trial) -> Any:
        """Draw the value for an optuna trial (10^U(low, high) is a log-uniform float between 10^low and 10^high)."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, list(self.args))
        low, high = self.args
        if self.kind == "log10_uniform":
            return trial.suggest_float(self.key, 10.0 ** low, 10.0 ** high, log=True)
        if self.kind == "uniform":
            return trial.suggest_float(self.key, float(low), float(high))
        return trial.suggest_int(self.key, int(low), int(high))


def parse_space(spec: dict, source: str = "search space") -> dict[str, Parameter]:
    """Check and parse a search space mapping (the ``parameters`` of a sweep YAML).

    Args:
        spec: dotted key -> ``{distribution: args}``.
        source: where it came from, for messages.

    Returns:
        Key -> Parameter, in the file's order.
    """
    if not isinstance(spec, dict) or not spec:
        raise ConfigError(f"{source}: `parameters` must map dotted `editing fit` keys to distributions")
    space = {}
    for key, dist in spec.items():
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+", key):
            raise ConfigError(f"{source}: {key!r} is not a dotted key such as model.init_args.optimizer.lr")
        if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
            raise ConfigError(f"{source}: {key}: expected one of {{{', '.join(DISTRIBUTIONS)}: ...}}, got {dist!r}")
        kind, args = next(iter(dist.items()))
        if not isinstance(args, (list, tuple)) or not args:
            raise ConfigError(f"{source}: {key}: {kind} needs a list, got {args!r}")
        if kind != "categorical":
            if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
                raise ConfigError(f"{source}: {key}: {kind} needs [low, high], got {args!r}")
            if args[0] > args[1] or (kind == "int_uniform" and not all(float(a).is_integer() for a in args)):
                raise ConfigError(f"{source}: {key}: bad bounds {args!r}")
        space[key] = Parameter(key, kind, tuple(args))
    return space


def load_space(method: str, files: Sequence[str] | str | None = None,
               params: dict | None = None) -> dict[str, Parameter]:
    """The search space of a method: ``lightning_configs/sweeps/<method>.yaml`` unless ``files`` are given; later
    files and then ``params`` override earlier entries key by key.

    Args:
        method: the method name (``lora``, ``full``, ... any method with a sweeps YAML).
        files: search-space YAMLs to use instead of the default one (one path or a list).
        params: extra entries, ``{key: {distribution: args}}``.
    """
    if isinstance(files, (str, Path)):
        files = [files]
    paths = [Path(f) for f in files] if files else [SPACE_DIR / f"{method}.yaml"]
    merged: dict = {}
    for path in paths:
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in SPACE_DIR.glob("*.yaml")))
            raise ConfigError(f"no search space {path} (methods with one: {known}); write one, see "
                              f"lightning_configs/sweeps/lora.yaml")
        doc = load_yaml(path, "search space") or {}
        if not isinstance(doc, dict) or not isinstance(doc.get("parameters") or {}, dict):
            raise ConfigError(f"{path}: a search space is a mapping with `parameters:` (dotted `editing fit` key -> "
                              "{distribution: args}); see lightning_configs/sweeps/lora.yaml")
        if doc.get("method") not in (None, method):
            raise ConfigError(f"{path} is the search space of method {doc['method']!r}, not {method!r}")
        merged.update(doc.get("parameters") or {})
    merged.update(params or {})
    return parse_space(merged, ", ".join(str(p) for p in paths))


def make_sampler(seed: int):
    """Random search whose draws depend only on (seed, trial number, key): a sweep samples the same configurations
    however many workers share it, and workers never draw identical ones by sharing a seed."""
    import numpy as np
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    from optuna.samplers import BaseSampler

    class _Sampler(BaseSampler):
        def infer_relative_search_space(self, study, trial):
            return {}

        def sample_relative(self, study, trial, search_space):
            return {}

        def sample_independent(self, study, trial, param_name, param_distribution):
            digest = hashlib.sha256(f"{seed}/{trial.number}/{param_name}".encode()).digest()
            rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
            d = param_distribution
            if isinstance(d, CategoricalDistribution):
                return d.choices[int(rng.integers(len(d.choices)))]
            if isinstance(d, IntDistribution):
                return int(rng.integers(d.low, d.high + 1))
            if isinstance(d, FloatDistribution) and d.log:
                return float(math.exp(rng.uniform(math.log(d.low), math.log(d.high))))
            return float(rng.uniform(d.low, d.high))

    return _Sampler()


def space_dict(space: dict[str, Parameter]) -> dict[str, dict]:
    """The YAML/JSON form of a parsed space (what ``parse_space`` reads back)."""
    return {k: {p.kind: list(p.args)} for k, p in space.items()}
