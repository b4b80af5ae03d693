"""Tokens per second of a Backpack distillation step: the teacher run every step (today's default,
``smollm2_backpack.yaml``) against the steps that read the teacher cache, measured in one run on the same corpus
(issue 15).

Each step is the product's own: ``BackpackDistillation.kl_loss`` forward, backward, gradient clipping at 1.0 and
the AdamW step (``sense_optimizer``), under bf16 autocast as ``--trainer.precision bf16-mixed`` runs it. The cache
is filled first (its time and tokens/s are printed on their own line: a one-off cost), then each configuration
trains ``--steps`` timed steps after two untimed ones. Three configurations:

* today's step: the teacher runs, full-vocabulary KL on ``--kl_fraction`` of the positions;
* the cached step at today's shape: what the cache alone buys;
* the cached step at the shape ``smollm2_backpack_cached.yaml`` trains (``--cached_*``): batch 64, sense network
  of width 1 x d, KL on 1/16 of the positions.

Tokens/s counts every token of a batch (each one's senses and alpha enter the sums); the KL positions per second
are printed too, since the configurations draw different shares of them.

    OMP_NUM_THREADS=2 python benchmarks/distill_throughput.py [--steps 8] [--batch_size 16] [--block_size 128]
        [--top_k 64] [--kl_fraction 0.25] [--num_senses 16] [--sense_scale 4]
        [--cached_batch_size 64] [--cached_kl_fraction 0.0625] [--cached_num_senses 16] [--cached_sense_scale 1]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from contextlib import nullcontext

import torch


def build(args: argparse.Namespace, cached: bool, shape: str):
    """The distillation module of one configuration (``shape``: "today" or "chosen") and a line saying what it is."""
    from editing.models.backpack.distill import BackpackDistillation, BackpackShape
    from editing.models.backpack.teacher_cache import TeacherCacheConfig
    from editing.models.loading import ModelConfig

    chosen = shape == "chosen"
    senses = args.cached_num_senses if chosen else args.num_senses
    scale = args.cached_sense_scale if chosen else args.sense_scale
    fraction = args.cached_kl_fraction if chosen else args.kl_fraction
    cache = TeacherCacheConfig(enabled=True, top_k=args.top_k, folder=args.cache_folder) if cached else None
    module = BackpackDistillation(teacher=ModelConfig(name=args.teacher), lr=1e-3, kl_fraction=fraction,
                                  shape=BackpackShape(num_senses=senses, sense_intermediate_scale=scale),
                                  teacher_cache=cache)
    return module, f"senses {senses}, sense scale {scale}, kl_fraction {fraction}" + (
        f", top_k {args.top_k}" if cached else ", full-vocabulary KL")


def autocast(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else nullcontext()


def train_steps(module, batches: list, steps: int, bf16: bool) -> float:
    """Seconds per step over ``steps`` timed steps (after two untimed ones); ``batches`` are reused in turn."""
    from editing.models.backpack.distill import sense_optimizer

    optimizer = sense_optimizer(module.student, lr=1e-3, clips=True)
    params = [p for p in module.student.parameters() if p.requires_grad]
    module.student.eval()
    times = []
    for step in range(steps + 2):
        start = time.perf_counter()
        with autocast(bf16):
            kl, _ = module.kl_loss(batches[step % len(batches)], module.kl_fraction, step)
        kl.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # as both configs do (trainer.gradient_clip_val 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= 2:
            times.append(time.perf_counter() - start)
    return sum(times) / len(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=16, help="today's config (smollm2_backpack.yaml)")
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--top_k", type=int, default=64)
    parser.add_argument("--kl_fraction", type=float, default=0.25)
    parser.add_argument("--num_senses", type=int, default=16)
    parser.add_argument("--sense_scale", type=int, default=4)
    parser.add_argument("--cached_batch_size", type=int, default=64, help="smollm2_backpack_cached.yaml's")
    parser.add_argument("--cached_kl_fraction", type=float, default=0.0625)
    parser.add_argument("--cached_num_senses", type=int, default=16)
    parser.add_argument("--cached_sense_scale", type=int, default=1)
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast (slower; for comparison)")
    parser.add_argument("--cache_folder", default=None, help="teacher cache root (default: a temporary folder)")
    args = parser.parse_args()
    args.cache_folder = args.cache_folder or tempfile.mkdtemp(prefix="teacher-cache-")
    bf16 = not args.fp32

    from editing.data.corpus import CorpusDataModule

    # distinct blocks for each configuration's steps (the largest batch sets how many the cache holds)
    need = (args.steps + 2) * max(args.batch_size, args.cached_batch_size)
    plain, plain_what = build(args, cached=False, shape="today")
    dm = CorpusDataModule(block_size=args.block_size, batch_size=args.batch_size, max_tokens=need * args.block_size,
                          val_blocks=1)
    dm.attach(plain.tokenizer)
    dm.setup()
    blocks = dm.blocks[:need]
    print(f"threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f}; {'fp32' if args.fp32 else 'bf16'}"
          f" autocast; {args.steps} timed steps; blocks of {args.block_size} tokens", flush=True)

    # where today's step goes: the teacher's pass alone
    ids = blocks[: args.batch_size]
    with torch.no_grad(), autocast(bf16):
        plain._teacher_pass(ids, torch.ones_like(ids))
        start = time.perf_counter()
        for _ in range(2):
            plain._teacher_pass(ids, torch.ones_like(ids))
        teacher_s = (time.perf_counter() - start) / 2

    def batches_of(size: int, cached: bool) -> list:
        count = need // size
        if cached:
            return [{"input_ids": blocks[i * size:(i + 1) * size], "index": torch.arange(i * size, (i + 1) * size)}
                    for i in range(count)]
        return [blocks[i * size:(i + 1) * size] for i in range(count)]

    rows = []
    plain_s = train_steps(plain, batches_of(args.batch_size, False), args.steps, bf16)
    rows.append(("today's step", plain_what, args.batch_size, plain.kl_fraction, plain_s))
    del plain

    fill_line = None
    for shape, size in (("today", args.batch_size), ("chosen", args.cached_batch_size)):
        module, what = build(args, cached=True, shape=shape)
        module.cache = cache = module.teacher_cache_of(dm)
        if fill_line is None:
            start = time.perf_counter()
            module.fill_teacher_cache(dm, progress=False)
            fill_s = time.perf_counter() - start
            tokens = cache.num_blocks * args.block_size
            size_on_disk = sum(p.stat().st_size for p in cache.folder.glob("shard-*.pt"))
            fill_line = (f"teacher cache: {tokens} tokens in {fill_s:.1f} s ({tokens / fill_s:.0f} tokens/s, once), "
                         f"{size_on_disk / tokens:.0f} bytes/token on disk")
        seconds = train_steps(module, batches_of(size, True), args.steps, bf16)
        label = "cached, today's shape" if shape == "today" else "cached, chosen shape"
        rows.append((label, what, size, module.kl_fraction, seconds))
        del module

    print(fill_line)
    base = args.batch_size * args.block_size / plain_s
    print("| step | settings | batch | s/step | tokens/s | KL positions/s | tokens/s vs today |")
    print("|---|---|---|---|---|---|---|")
    for label, what, size, fraction, seconds in rows:
        rate = size * args.block_size / seconds
        print(f"| {label} | {what} | {size} | {seconds:.3f} | {rate:.0f} | {rate * fraction:.0f} | "
              f"{rate / base:.1f}x |")
    print(f"today's teacher pass alone: {teacher_s:.2f} s of its {plain_s:.2f} s step "
          f"({100 * teacher_s / plain_s:.0f}%)")
    chosen_rate = rows[-1][2] * args.block_size / rows[-1][4]
    print(f"ratio, chosen cached step to today's: {chosen_rate / base:.1f}x (goal: at least 10x)")


if __name__ == "__main__":
    main()
