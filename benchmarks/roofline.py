"""Where an evaluation pass goes on this machine, against the limit of its exact fp32 products (issue 37 item 1).

In one process:

1. The machine: CPU model, the flags that decide bf16 and AMX kernels, torch, the thread count.
2. The limit: the model's own products (attention q/k/v/o, MLP gate/up/down, the LM head; their shapes read from
   the model) at the evaluator's real batch sizes (the padded rows of G's batches; the head at the scored positions
   of a batch) are timed for every way of computing them that this torch offers: ``F.linear`` under each mode of
   ``editing.evaluation.backend.MODES``, ``torch.mm`` with the weight transposed as a view and as a contiguous
   copy, MKL's packed-weight linear, oneDNN's linear (plain and on oneDNN tensors). Each way's error against
   float64 is measured first (``backend.relative_error``) and a way that is not exact to fp32 rounding
   (``backend.is_exact``: within 8x the default's error and below 1e-5; bf16 rounding is about 2e-3) is excluded.
   The limit is the best exact way per product; a pass at the limit would take the pass's FLOPs over those rates.
3. One evaluation pass of the real evaluator over a sample of G (``--texts``; ``--all`` for all of G), timed plainly
   and then profiled by operation with ``torch.profiler``: matmuls, attention, norms and activations, the head with
   its log-sum-exp, LoRA branches (``--lora RANK``: an unmerged adapter), data movement, other operators, and Python
   (the pass's wall time not spent in any operator).
4. The evaluator's fraction of the limit: the pass's FLOPs per second over the limit's.
5. ``--before N``: the pass as it ran before the overheads removed in issue 37's third part (the head's
   log-sum-exp over the whole block, an explicit padding mask; ``OVERHEADS``) against today's, N alternating
   pairs in this process, with the general NLL of each (they must agree to fp32 rounding).

    OMP_NUM_THREADS=2 python benchmarks/roofline.py [--threads 2] [--texts 100 | --all] [--model smollm2-135m]
        [--before 2]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from editing.evaluation import backend, products

FLAGS_OF_INTEREST = ("avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")
MATMUL_OPS = {"aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm",
              "mkl::_mkl_linear", "mkldnn::_linear_pointwise", "aten::mkldnn_linear"}
MOVEMENT_OPS = {"aten::copy_", "aten::to", "aten::_to_copy", "aten::contiguous", "aten::cat", "aten::index",
                "aten::index_select", "aten::clone", "aten::embedding", "aten::gather", "aten::index_put_",
                "aten::index_add_", "aten::masked_select", "aten::nonzero", "aten::stack", "aten::pad",
                "aten::constant_pad_nd", "aten::empty", "aten::empty_like", "aten::zeros", "aten::ones_like",
                "aten::fill_", "aten::zero_", "aten::resize_", "aten::empty_strided", "aten::new_zeros"}


def cpu_description() -> dict:
    """CPU model (``lscpu``'s, else ``/proc/cpuinfo``'s), its bf16/AMX flags, torch, threads."""
    name, flags = products._cpu_info()
    if shutil.which("lscpu"):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        found = re.search(r"^Model name:\s*(.+)$", out, re.M)
        name = found.group(1).strip() if found else name
    have = set(flags.split())
    return {"cpu": name, "flags": {f: f in have for f in FLAGS_OF_INTEREST}, "torch": torch.__version__,
            "capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}


def describe_cpu(info: dict) -> str:
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in info["flags"].items())
    return f"CPU {info['cpu']} ({flags}); torch {info['torch']} ({info['capability']}); {info['threads']} threads"


# --- the model's products ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Product:
    """One matrix shape of the model: ``rows`` x ``k`` by ``k`` x ``n``, ``per_pass`` times per batch."""

    label: str
    k: int
    n: int
    per_batch: int


def _group(name: str) -> str:
    leaf = name.rsplit(".", 1)[-1]
    for group, leaves in (("attention q/o", ("q_proj", "o_proj", "out_proj", "dense", "c_proj_attn")),
                          ("attention k/v", ("k_proj", "v_proj")), ("attention qkv", ("c_attn", "qkv_proj")),
                          ("MLP gate/up", ("gate_proj", "up_proj", "c_fc", "fc1")),
                          ("MLP down", ("down_proj", "fc2"))):
        if leaf in leaves:
            return group
    return "mlp c_proj" if leaf == "c_proj" and ".mlp." in name else leaf


def model_products(model: torch.nn.Module) -> list[Product]:
    """The body's linear products grouped by shape and role (``nn.Linear`` and GPT-2's ``Conv1D``), head excluded."""
    head = model.get_output_embeddings()
    counts: dict[tuple[str, int, int], int] = defaultdict(int)
    for name, module in model.named_modules():
        if module is head or "lora_" in name:
            continue
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear):
            k, n = module.in_features, module.out_features
        elif type(module).__name__ == "Conv1D" and weight is not None:
            k, n = weight.shape
        else:
            continue
        counts[(_group(name), k, n)] += 1
    return [Product(label, k, n, c) for (label, k, n), c in sorted(counts.items())]


def pass_flops(body: list[Product], d: int, vocab: int, layers: int, sequences: list[tuple[int, int]]) -> dict:
    """FLOPs of one pass by part, for ``sequences`` of (tokens, scored tokens): linear layers 2 t k n per token,
    causal attention 2 t^2 d per layer (q k^T and the weighted sum, half of each square), head 2 s d V."""
    tokens = sum(t for t, _ in sequences)
    scored = sum(s for _, s in sequences)
    linear = 2.0 * tokens * sum(p.k * p.n * p.per_batch for p in body)
    attention = sum(2.0 * t * t * d * layers for t, _ in sequences)
    return {"linear": linear, "attention": attention, "head": 2.0 * scored * d * vocab}


# --- the ways of computing a product -------------------------------------------------------------------------------
def ways(x: torch.Tensor, w: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """Every way this torch offers to compute ``x @ w.T`` in fp32 (name -> call); modes as contexts."""
    found: dict[str, Callable[[], torch.Tensor]] = {}
    for mode, ctx in backend.MODES.items():
        if mode == backend.PACKED:  # F.linear under it is the default's; its packed product is timed below
            continue

        def call(ctx=ctx):
            with ctx():
                return F.linear(x, w)
        found[f"F.linear [{mode}]"] = call
    wt = w.t().contiguous()
    found["torch.mm(x, W.T view)"] = lambda: torch.mm(x, w.t())
    found["torch.mm(x, W^T contiguous)"] = lambda: torch.mm(x, wt)
    try:
        packed = torch.ops.mkl._mkl_reorder_linear_weight(w, x.shape[0])
        found["MKL packed linear"] = lambda: torch.ops.mkl._mkl_linear(x, packed, w, None, x.shape[0])
    except (AttributeError, RuntimeError):
        pass
    try:
        torch.ops.mkldnn._linear_pointwise(x[:1], w, None, "none", [], "")
        found["oneDNN linear"] = lambda: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    except (AttributeError, RuntimeError):
        pass
    try:
        wm = w.to_mkldnn()
        found["oneDNN tensors (x converted)"] = lambda: torch._C._nn.mkldnn_linear(x.to_mkldnn(), wm, None).to_dense()
    except (AttributeError, RuntimeError):
        pass
    return found


@dataclass
class WayResult:
    seconds: float
    error: float
    exact: bool
    same_bits: bool
    """Its output has the default way's bits: the same kernels (a speed difference is timing noise)."""


def measure_ways(rows: int, k: int, n: int, repeat: int,
                 candidates: Callable[[torch.Tensor, torch.Tensor], dict] | None = None) -> dict[str, WayResult]:
    """Each way's error against float64 (checked first, against the default way's) and median seconds; an inexact
    way is not timed (seconds NaN). The exact ways are timed in turn, one call each per round, so that on a shared
    machine every way sees the same mix of load."""
    x, w, exact = backend.operands(rows, k, n)
    found = (candidates or ways)(x, w)
    default_out = found["F.linear [default]"]()
    reference = backend.relative_error(default_out, exact)
    errors, same = {}, {}
    for name, fn in found.items():
        out = fn()
        errors[name], same[name] = backend.relative_error(out, exact), torch.equal(out, default_out)
    # a global mode whose output has the default's bits switched no kernel: it is the default (not timed again)
    timed = [name for name in found if backend.is_exact(errors[name], reference)
             and not (name.startswith("F.linear [") and name != "F.linear [default]" and same[name])]
    times: dict[str, list[float]] = {name: [] for name in timed}
    for _ in range(repeat):
        for name in timed:
            start = time.perf_counter()
            found[name]()
            times[name].append(time.perf_counter() - start)
    seconds = {name: statistics.median(t) for name, t in times.items()}
    return {name: WayResult(seconds.get(name, seconds["F.linear [default]"] if same[name] else float("nan")),
                            errors[name], backend.is_exact(errors[name], reference), same[name]) for name in found}


# --- the profile ---------------------------------------------------------------------------------------------------
CATEGORIES = ("matmuls", "attention", "norms and activations", "head and log-sum-exp", "LoRA branches",
              "data movement", "other operators", "Python and the rest")


@contextmanager
def labelled(model: torch.nn.Module):
    """Profiler ranges around the modules whose operators a category collects (hooks on the model, removed on exit),
    and around the scorer's head."""
    from torch.autograd.profiler import record_function

    import editing.evaluation.scorer as scorer

    handles, stack = [], []

    def label_of(name: str, module: torch.nn.Module) -> str | None:
        if "lora_" in name:  # peft's lora_A / lora_B / dropout of an adapted layer
            return "range:lora"
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            return "range:linear"
        kind = type(module).__name__.lower()
        if "attention" in kind:
            return "range:attention"
        if "norm" in kind:
            return "range:norm"
        if "mlp" in kind:
            return "range:mlp"
        return None

    for name, module in model.named_modules():
        label = label_of(name, module)
        if label is None:
            continue

        def pre(mod, args, label=label):
            rf = record_function(label)
            rf.__enter__()
            stack.append(rf)

        def post(mod, args, out):
            stack.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    original = scorer.head_nll

    def head_nll(*args, **kwargs):
        with record_function("range:head"):
            return original(*args, **kwargs)

    scorer.head_nll = head_nll
    try:
        yield
    finally:
        scorer.head_nll = original
        for h in handles:
            h.remove()


def category(op: str, ranges: list[str]) -> str:
    """The category of an operator from its name and the labelled ranges around it (innermost first)."""
    inner = ranges[0] if ranges else None
    if "range:lora" in ranges:
        return "LoRA branches"
    if "range:head" in ranges:
        return "head and log-sum-exp"
    if inner == "range:linear":  # a linear layer's product with its views of the weight
        return "matmuls"
    if op in MOVEMENT_OPS:
        return "data movement"
    if "range:attention" in ranges:
        return "attention"
    if inner in ("range:norm", "range:mlp") or "range:mlp" in ranges:
        return "norms and activations"
    if op in MATMUL_OPS:
        return "matmuls"
    return "other operators"


def profile_shares(events, wall: float) -> dict[str, float]:
    """Seconds per category from the profiler's events: each operator's self time, under its labelled ranges;
    Python and the rest is the wall time no operator accounts for."""
    seconds = dict.fromkeys(CATEGORIES, 0.0)
    for ev in events:
        if ev.name.startswith("range:") or "::" not in ev.name:
            continue
        ranges, parent = [], ev.cpu_parent
        while parent is not None:
            if parent.name.startswith("range:"):
                ranges.append(parent.name)
            parent = parent.cpu_parent
        seconds[category(ev.name, ranges)] += ev.self_cpu_time_total / 1e6
    seconds["Python and the rest"] = max(0.0, wall - sum(seconds.values()))
    return seconds


# --- main ----------------------------------------------------------------------------------------------------------
def _batches(dm) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """(padded rows, scored positions, [(tokens, scored) per sequence]) of each G batch the evaluator runs."""
    out = []
    for batch in dm.eval_dataloader("general"):
        mask, labels = batch["attention_mask"], batch["labels"]
        seqs = [(int(m.sum()), int((lab != -100).sum())) for m, lab in zip(mask, labels, strict=True)]
        out.append((mask.numel(), int((labels != -100).sum()), seqs))
    return out


def _subject(args):
    from editing.methods.base import EditingModule
    from editing.models.loading import ModelConfig

    config = ModelConfig(name=args.model, precision="fp32")
    if not args.lora:
        return EditingModule(config)
    from editing.methods.base import RegularizationConfig
    from editing.methods.lora import LoRAConfig, LoRAEditor

    module = LoRAEditor(config, lora=LoRAConfig(rank=args.lora, layer_fraction=1.0),
                        regularization=RegularizationConfig(kind="none"))
    with torch.no_grad():  # B starts at zero; the branch runs all the same
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 1e-3)
    return module


@contextmanager
def overheads_back():
    """The evaluator as it was before issue 37's third part: ``torch.logsumexp`` over each whole head block (no row
    chunks), the padding mask passed to every forward (``scorer.needed_mask`` keeps it) and the attention under the
    product mode (``editing.evaluation.attention`` keeps it IEEE)."""
    import editing.evaluation.scorer as scorer
    from editing.evaluation import attention, products

    saved = scorer.LSE_BYTES_PER_THREAD, scorer.needed_mask, products.attention_at_ieee
    scorer.LSE_BYTES_PER_THREAD, scorer.needed_mask = 1 << 62, lambda mask: mask
    products.attention_at_ieee = lambda enabled=True: attention.attention_at_ieee(False)
    try:
        yield
    finally:
        scorer.LSE_BYTES_PER_THREAD, scorer.needed_mask, products.attention_at_ieee = saved


def compare_before(module, dm, pairs: int) -> list[tuple[str, float, float]]:
    """(which, seconds, general NLL) of ``pairs`` alternating passes: before the overheads' removal, then today."""
    from editing.evaluation.evaluator import evaluate

    out = []
    for _ in range(pairs):
        for which in ("before", "today"):
            with overheads_back() if which == "before" else nullcontext():
                start = time.perf_counter()
                nll = evaluate(module, dm, roles=["general"])["general_nll"]
                out.append((which, time.perf_counter() - start, nll))
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own count)")
    parser.add_argument("--texts", type=int, default=100, help="first N texts of G for the evaluation pass")
    parser.add_argument("--all", action="store_true", help="all of G (2,007 texts)")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per product and way (median)")
    parser.add_argument("--lora", type=int, default=0, help="profile with an unmerged LoRA adapter of this rank")
    parser.add_argument("--before", type=int, default=0, metavar="N",
                        help="N alternating pairs of passes: before issue 37's overhead removals, and today")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
    from editing.data.datamodule import TaskDataModule
    from editing.evaluation.evaluator import evaluate

    info = cpu_description()
    print(describe_cpu(info), flush=True)
    module = _subject(args)
    model = module.model
    dm = TaskDataModule(task="country_capital", general_limit=None if args.all else args.texts)
    dm.attach(module.tokenizer, module.max_length)
    batches = _batches(dm)
    rows = sorted(b[0] for b in batches)[len(batches) // 2]
    head_rows = min(sorted(b[1] for b in batches)[len(batches) // 2], 2048)
    head = model.get_output_embeddings().weight
    vocab, d = head.shape
    body = model_products(model)
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None) or 1
    print(f"model {args.model}: {len(batches)} batches of G ({sum(len(b[2]) for b in batches)} texts), median "
          f"{rows} padded rows per batch and {head_rows} scored positions; products at those sizes; "
          f"median of {args.repeat}", flush=True)

    # 2. the limit
    shapes = [(p.label, rows, p.k, p.n) for p in body] + [("LM head", head_rows, d, vocab)]
    print("\n| product (rows x k x n) | way | GFLOP/s | relative error vs float64 | exact | default's bits |\n"
          "|---|---|---|---|---|---|")
    best: dict[str, tuple[str, float]] = {}
    default_rate: dict[str, float] = {}
    for label, m, k, n in shapes:
        results = measure_ways(m, k, n, args.repeat)
        flops = 2.0 * m * k * n
        for name, r in results.items():
            rate = flops / r.seconds / 1e9 if r.exact else float("nan")
            print(f"| {label} ({m}x{k}x{n}) | {name} | {rate:.1f} | {r.error:.1e} | "
                  f"{'yes' if r.exact else 'NO: excluded'} | {'yes' if r.same_bits else 'no'} |", flush=True)
            if r.exact:
                if label not in best or rate > best[label][1]:
                    best[label] = (name, rate)
        default_rate[label] = flops / results["F.linear [default]"].seconds / 1e9

    # 3. the pass: plain timing, then the limit's ways again (a shared machine's load moves), then the profile
    sequences = [s for b in batches for s in b[2]]
    flops = pass_flops(body, d, vocab, layers, sequences)
    total = sum(flops.values())
    mode = products.chosen_mode("cpu")
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    summary = evaluate(module, dm, roles=["general"])
    wall = time.perf_counter() - start
    load_pass = os.getloadavg()[0]
    after: dict[str, float] = {}
    for label, m, k, n in shapes:  # the best way and the default, right after the pass
        keep = {"F.linear [default]", best[label][0]}
        again = measure_ways(m, k, n, args.repeat, lambda x, w, keep=keep: {
            name: fn for name, fn in ways(x, w).items() if name in keep})
        after[label] = 2.0 * m * k * n / again[best[label][0]].seconds / 1e9
    load_after = os.getloadavg()[0]
    from torch.profiler import ProfilerActivity, profile

    with labelled(model), profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        evaluate(module, dm, roles=["general"])
        profiled_wall = time.perf_counter() - start
    seconds = profile_shares(prof.events(), profiled_wall)

    def pass_seconds(rates: dict[str, float]) -> float:
        """A pass at these per-product rates: each product's share of the FLOPs at its rate, the attention's
        products at the median rate."""
        share_of = {"LM head": flops["head"]}
        body_total = sum(p.k * p.n * p.per_batch for p in body)
        for p in body:
            share_of[p.label] = flops["linear"] * p.k * p.n * p.per_batch / body_total
        out = sum(share_of[label] / (rates[label] * 1e9) for label in share_of)
        return out + flops["attention"] / (statistics.median(rates.values()) * 1e9)

    limit_rate = total / pass_seconds({k: v[1] for k, v in best.items()}) / 1e9
    after_rate = total / pass_seconds(after) / 1e9
    rate = total / wall / 1e9
    print(f"\nlimit (best exact way per product): {limit_rate:.1f} GFLOP/s before the pass, {after_rate:.1f} after it; "
          f"the default F.linear's: {total / pass_seconds(default_rate) / 1e9:.1f} GFLOP/s (load average "
          f"{load_before:.1f} before the pass, {load_pass:.1f} after it, {load_after:.1f} after the re-check)")
    for label, (name, r) in best.items():
        print(f"  {label}: {name}, {r:.1f} GFLOP/s, {after[label]:.1f} after the pass "
              f"(default {default_rate[label]:.1f})")
    print(f"\nevaluation pass (product mode {mode!r}): {len(sequences)} texts, {sum(t for t, _ in sequences)} tokens, "
          f"{total / 1e12:.3f} TFLOP (linear {flops['linear'] / total:.1%}, head {flops['head'] / total:.1%}, "
          f"attention {flops['attention'] / total:.1%}); {wall:.2f} s, {rate:.1f} GFLOP/s; general NLL "
          f"{summary['general_nll']:.6f}")
    print(f"fraction of the limit: {rate / limit_rate:.3f} (of the limit after the pass: {rate / after_rate:.3f}; "
          f"{describe_cpu(info)})")
    print(f"\nprofile of one pass ({profiled_wall:.2f} s under the profiler):")
    print("| part | seconds | share |\n|---|---|---|")
    for name, s in seconds.items():
        print(f"| {name} | {s:.2f} | {s / profiled_wall:.1%} |")
    if args.before:
        timed = compare_before(module, dm, args.before)
        print("\npasses before the overheads' removal and today, alternating (seconds, general NLL):")
        for which, secs, nll in timed:
            print(f"  {which}: {secs:.2f} s, {nll:.9f}")
        med = {w: statistics.median(s for x, s, _ in timed if x == w) for w in ("before", "today")}
        nlls = [n for *_, n in timed]
        print(f"today {med['before'] / med['today']:.2f}x faster (medians {med['before']:.2f} s -> "
              f"{med['today']:.2f} s; general NLL spread {max(nlls) - min(nlls):.1e}; load average "
              f"{os.getloadavg()[0]:.1f})")
    print(f"\n(benchmark wall time {time.perf_counter() - began:.0f} s)")
    return {"info": info, "limit": limit_rate, "limit_after": after_rate, "rate": rate,
            "fraction": rate / limit_rate, "seconds": seconds,
            "flops": flops, "best": best, "mode": mode}


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
