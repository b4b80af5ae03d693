"""Shared fixtures: the read-only task data, tiny random models loaded once per session, and reference helpers."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch

# The product mode, pinned for the whole session: module- and session-scoped fixtures run fits before any
# function-scoped fixture pins it (``_own_evaluation_caches`` below), and on a CPU where an exact non-default mode is
# faster (AMD EPYC: oneDNN's bf16 math mode) such a fixture's fit would take another mode's bits than the test's own
# fits, and runs compared bit for bit would differ in the last place.
os.environ["EDITING_PRODUCTS"] = "default"

REPO_DIR = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY_FAMILIES = ("tiny-gpt2", "tiny-llama", "tiny-neox", "tiny-backpack")


def gpu_test_device() -> str:
    """Where ``gpu``-marked tests run: ``cuda``, or ``cpu`` under ``GPU_CHECK_DEVICE=cpu`` (the dry mode of
    ``scripts/gpu_check.sh``: the same tests on the CPU, to check the tests themselves)."""
    return os.environ.get("GPU_CHECK_DEVICE", "cuda")


def pytest_collection_modifyitems(config, items) -> None:
    """Skip ``gpu``-marked tests, with the reason, where the GPUs they need are missing."""
    if gpu_test_device() == "cpu":
        return
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        marker = item.get_closest_marker("gpu")
        if marker is None:
            continue
        needed = int(marker.kwargs.get("gpus", 1))
        if available < needed:
            build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a build without CUDA")
            item.add_marker(pytest.mark.skip(
                reason=f"needs {needed} CUDA GPU(s), found {available} ({build}); scripts/gpu_check.sh runs these"))


@pytest.fixture
def gpu_device() -> torch.device:
    """The device of a ``gpu``-marked test (see ``gpu_test_device``)."""
    return torch.device(gpu_test_device())


@pytest.fixture(autouse=True)
def _own_evaluation_caches(tmp_path_factory, monkeypatch):
    """Each test has its own evaluation caches (p0 and incremental, ``editing.evaluation.caching``), on disk and in
    memory: what one test cached is never another test's result. Subprocesses inherit the folder.

    The product mode is pinned to ``default`` (``editing.evaluation.products``): with a fresh cache folder per test,
    the machine's choice would be measured again (seconds) in every test that evaluates, and the suite's numbers
    would depend on the machine's timing. ``tests/evaluation/test_products.py`` tests the choice itself."""
    from editing.evaluation.incremental import clear_memory

    monkeypatch.setenv("EDITING_EVAL_CACHE_DIR", str(tmp_path_factory.mktemp("eval-cache")))
    monkeypatch.setenv("EDITING_PRODUCTS", "default")
    clear_memory()
    yield
    clear_memory()


# What Lightning's launchers write into the launching process's own environment: an in-process Trainer under a
# distributed strategy (even on one device) leaves LOCAL_RANK=0 behind, and a CLI subprocess that inherits it takes
# itself for an already launched rank, never starts rank 1, and waits for it forever.
LAUNCHER_VARIABLES = ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                      "PL_GLOBAL_SEED", "PL_SEED_WORKERS", "TORCHELASTIC_RUN_ID")


@pytest.fixture(autouse=True)
def _own_distributed_environment():
    """Each test starts from the session's environment with no launcher variables, its own free port for distributed
    processes (a port left by an earlier test's processes fails with EADDRINUSE), and no process group; whatever the
    test or the Lightning code it ran wrote into ``os.environ`` is undone afterwards."""
    saved = dict(os.environ)
    for name in LAUNCHER_VARIABLES:
        os.environ.pop(name, None)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The shared task data (read-only; never copied into the repository)."""
    if not (SHARED_DATA / "general" / "degradation.jsonl").is_file():
        pytest.skip(f"task data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_module():
    """``tiny_module(name)``: an fp32 ``EditingModule`` of a tiny random family, built once per session.

    Tests must not change its weights; ``evaluate`` rebinds the task and resets the metrics itself.
    """
    from editing.methods.base import EditingModule
    from editing.models.loading import ModelConfig

    cache: dict[str, EditingModule] = {}

    def get(name: str) -> EditingModule:
        if name not in cache:
            cache[name] = EditingModule(ModelConfig(name=name, precision="fp32"))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tokenizer_of():
    """``tokenizer_of(alias)`` for ``gpt2``, ``neox`` and ``smollm2`` (offline, cached)."""
    from editing.models.loading import _offline_tokenizer

    cache: dict = {}

    def get(alias: str):
        if alias not in cache:
            cache[alias] = _offline_tokenizer(alias)
        return cache[alias]

    return get


# --- independent references (SPEC sections 3 and 5), written here without the package's scoring code ------------

@torch.no_grad()
def reference_sequence_nll(model, ids: list[int], score_from: int) -> list[float]:
    """NLL of each scored token ``ids[score_from:]`` of one sequence: one forward pass, full logits, float64
    log-softmax; token t is predicted by the logits at position t - 1."""
    logits = model(input_ids=torch.tensor([ids], dtype=torch.long)).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [-float(logprobs[t - 1, ids[t]]) for t in range(score_from, len(ids))]


def spec_score(sums: list[float], loss: str) -> float:
    """SPEC section 5: an evaluation example's score from the SUM of each suffix's token NLL."""
    if loss == "good":
        return sums[0]
    if loss == "bad":
        return -sums[0]
    if loss == "balance":
        return abs(sums[0] - sums[1])
    if loss == "good-v-bad":
        return sums[0] - sums[1]
    raise ValueError(f"no SPEC score for loss {loss!r}")


def reference_scores(model, examples, loss: str) -> torch.Tensor:
    """Scores of the one-at-a-time reference loop (float64), in the order of ``examples``."""
    scores = []
    for e in examples:
        sums = [sum(reference_sequence_nll(model, s.ids, s.score_from)) for s in e.sequences]
        scores.append(spec_score(sums, loss))
    return torch.tensor(scores, dtype=torch.float64)


def reference_text_stats(model, examples) -> tuple[float, int]:
    """(sum of scored-token NLL, number of scored tokens) of text examples, by the reference loop."""
    total, tokens = 0.0, 0
    for e in examples:
        (seq,) = e.sequences
        nll = reference_sequence_nll(model, seq.ids, seq.score_from)
        total += sum(nll)
        tokens += len(nll)
    return total, tokens


@pytest.fixture
def offline_hub(monkeypatch):
    """No network: the hub is unreachable and huggingface_hub works from its cache only."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    return os.environ


WORDS = ("the river ran past the old mill and the miller sang of the rain while the children counted boats "
         "under a grey sky that promised snow before the market opened in the square").split()


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A small text corpus folder (one JSONL file of random sentences) for distillation tests."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    gen = torch.Generator().manual_seed(0)
    lines = []
    for _ in range(60):
        picks = torch.randint(0, len(WORDS), (40,), generator=gen).tolist()
        lines.append(json.dumps({"text": " ".join(WORDS[i] for i in picks) + "."}))
    (folder / "part.jsonl").write_text("\n".join(lines) + "\n")
    return folder
