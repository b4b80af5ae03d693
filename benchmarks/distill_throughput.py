"""Tokens per second of a Backpack distillation step: the teacher run every step (today's default) against the
step that reads the teacher cache, measured in one run on the same corpus blocks (issue 15).

Each step is the product's own: ``BackpackDistillation.kl_loss`` forward, backward and an AdamW step, under bf16
autocast as ``--trainer.precision bf16-mixed`` runs it. The cache is filled first (its time and tokens/s are printed
on their own line: a one-off cost), then each configuration trains ``--steps`` timed steps after two untimed ones.
A breakdown of the uncached step (the teacher's pass alone) says where its time goes.

    OMP_NUM_THREADS=2 python benchmarks/distill_throughput.py [--steps 6] [--batch_size 16] [--block_size 128]
        [--top_k 64] [--kl_fraction 0.25] [--cached_kl_fraction 0.25] [--num_senses 16] [--sense_scale 4]
        [--cached_num_senses N] [--cached_sense_scale N] [--cached_batch_size N]

``--cached_*`` options change only the cached configuration (by default it is today's shape, so the ratio is the
cache's alone); the line for each configuration says what it ran.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from contextlib import nullcontext

import torch


def build(args: argparse.Namespace, cached: bool):
    from editing.models.backpack.distill import BackpackDistillation, BackpackShape
    from editing.models.backpack.teacher_cache import TeacherCacheConfig
    from editing.models.loading import ModelConfig

    senses = args.cached_num_senses if cached and args.cached_num_senses else args.num_senses
    scale = args.cached_sense_scale if cached and args.cached_sense_scale else args.sense_scale
    cache = TeacherCacheConfig(enabled=True, top_k=args.top_k, folder=args.cache_folder) if cached else None
    fraction = args.cached_kl_fraction if cached else args.kl_fraction
    module = BackpackDistillation(teacher=ModelConfig(name=args.teacher), lr=1e-3, kl_fraction=fraction,
                                  shape=BackpackShape(num_senses=senses, sense_intermediate_scale=scale),
                                  teacher_cache=cache)
    return module, f"senses {senses}, sense scale {scale}, kl_fraction {fraction}" + (
        f", top_k {args.top_k}" if cached else ", full-vocabulary KL")


def autocast(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else nullcontext()


def train_steps(module, batches: list, steps: int, bf16: bool) -> float:
    """Seconds per step over ``steps`` timed steps (after two untimed ones)."""
    params = [p for p in module.student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    module.student.eval()
    times = []
    for step, batch in enumerate(batches[: steps + 2]):
        start = time.perf_counter()
        with autocast(bf16):
            kl, _ = module.kl_loss(batch, module.kl_fraction, step)
        kl.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= 2:
            times.append(time.perf_counter() - start)
    return sum(times) / len(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--cached_batch_size", type=int, default=None)
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--top_k", type=int, default=64)
    parser.add_argument("--kl_fraction", type=float, default=0.25, help="today's config (smollm2_backpack.yaml)")
    parser.add_argument("--cached_kl_fraction", type=float, default=0.25)
    parser.add_argument("--num_senses", type=int, default=16)
    parser.add_argument("--sense_scale", type=int, default=4)
    parser.add_argument("--cached_num_senses", type=int, default=None)
    parser.add_argument("--cached_sense_scale", type=int, default=None)
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast (slower; for comparison)")
    parser.add_argument("--cache_folder", default=None, help="teacher cache root (default: a temporary folder)")
    args = parser.parse_args()
    args.cache_folder = args.cache_folder or tempfile.mkdtemp(prefix="teacher-cache-")
    bf16 = not args.fp32

    from editing.data.corpus import CorpusDataModule

    cached_bs = args.cached_batch_size or args.batch_size
    need = (args.steps + 2) * max(args.batch_size, cached_bs)
    plain, plain_what = build(args, cached=False)
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

    plain_batches = [blocks[i * args.batch_size:(i + 1) * args.batch_size] for i in range(args.steps + 2)]
    plain_s = train_steps(plain, plain_batches, args.steps, bf16)
    plain_rate = args.batch_size * args.block_size / plain_s
    del plain

    cached, cached_what = build(args, cached=True)
    cached.cache = cache = cached.teacher_cache_of(dm)
    start = time.perf_counter()
    cached.fill_teacher_cache(dm, progress=False)
    fill_s = time.perf_counter() - start
    cached_batches = [{"input_ids": blocks[i * cached_bs:(i + 1) * cached_bs],
                       "index": torch.arange(i * cached_bs, (i + 1) * cached_bs)} for i in range(args.steps + 2)]
    cached_s = train_steps(cached, cached_batches, args.steps, bf16)
    cached_rate = cached_bs * args.block_size / cached_s
    tokens = cache.num_blocks * args.block_size

    print(f"teacher cache: {tokens} tokens in {fill_s:.1f} s ({tokens / fill_s:.0f} tokens/s, once), "
          f"{sum(p.stat().st_size for p in cache.folder.glob('shard-*.pt')) / tokens:.0f} bytes/token on disk")
    print(f"today's step ({plain_what}; batch {args.batch_size}): {plain_s:.2f} s/step, {plain_rate:.0f} tokens/s; "
          f"its teacher pass alone {teacher_s:.2f} s ({100 * teacher_s / plain_s:.0f}%)")
    print(f"cached step ({cached_what}; batch {cached_bs}): {cached_s:.2f} s/step, {cached_rate:.0f} tokens/s")
    print(f"ratio: {cached_rate / plain_rate:.1f}x (goal: at least 10x)")


if __name__ == "__main__":
    main()
