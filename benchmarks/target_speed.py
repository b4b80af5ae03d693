"""The target optimization's cost per request, full passes against the suffix pass (issues 37 and 38), in one run.

ROME: the canonical requests one after another, each computed twice on the model as edited by the earlier ones,
once with full forward passes in every Adam step (``suffix_only=False``, the path before the speed-up) and once with
the suffix pass (``editing.methods.memit.suffix``), alternating request by request so that both see the same load;
each path keeps its own sequence of edits. Prints per request the seconds of each (the value optimization and the
whole update: keys, values, solve), and at the end the largest relative difference of v* - v0, of v* and of each
update Delta W, and the seconds per request of each path.

MEMIT (``--method memit``): the target vectors z of ``--requests`` requests (one batch of
``request_batch_size``), both ways, alternating batches, and the spread's Delta W per layer from each (covariance
statistics of ``--samples`` tokens of R, the same for both).

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/target_speed.py --method rome --requests 6
    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/target_speed.py --method memit --requests 32 --samples 5000

The settings are the fit configs' (``lightning_configs/fit/{rome,memit}.yaml``); ROME's C is the identity unless
``--samples`` is given (the statistics do not enter v*, and each update's formula sees the same C either way).
"""

from __future__ import annotations

import argparse
import functools
import time

import torch


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-300)).item()


def rome(args) -> None:
    import editing.methods.rome.module as rome_module
    from editing.data.datamodule import TaskDataModule
    from editing.methods.memit.requests import context_templates
    from editing.methods.rome import ROMEConfig, ROMEEditor
    from editing.models.loading import ModelConfig

    cfg = ROMEConfig(layer=args.layer, clamp_norm_factor=4.0, kl_factor=0.0625, steps=20, lr=0.5, v_weight_decay=0.5,
                     use_statistics=args.samples > 0, covariance_samples=max(args.samples, 1), context_templates=5,
                     context_template_length=10)
    module = ROMEEditor(ModelConfig(name=args.model, precision="fp32"), cfg)
    dm = TaskDataModule(task=args.task, split="val")
    dm.attach(module.tokenizer, module.max_length)
    module.bind_task(dm.task)
    module.model.eval()
    requests = module.canonical_requests(dm)[: args.requests]
    module.covariance_stats = module.statistics(dm, progress=False)
    with module.deltas_off():
        templates = context_templates(module.model, module.tokenizer, cfg.context_templates,
                                      cfg.context_template_length)
    original = rome_module.optimize_targets
    layer = module.memit_layers[0]
    state = {False: ([], [], []), True: ([], [], [])}  # columns, rows, targets per path
    seconds = {False: [], True: []}
    optimize_seconds = {False: [], True: []}
    print(f"ROME on {args.model}, {args.task}, layer {layer}, {len(requests)} requests, "
          f"{len(templates)} templates, threads {torch.get_num_threads()}")
    for i, request in enumerate(requests):
        for suffix_only in (False, True):
            columns, rows, targets = state[suffix_only]
            if columns:
                module._set_factors(torch.cat(columns, dim=1), torch.cat(rows, dim=0))
            else:
                module.clear_edit()

            def timed(*a, suffix_only=suffix_only, **kw):
                start = time.perf_counter()
                out = original(*a, **kw, suffix_only=suffix_only)
                optimize_seconds[suffix_only].append(time.perf_counter() - start)
                return out

            rome_module.optimize_targets = timed
            try:
                start = time.perf_counter()
                with torch.enable_grad():
                    column, row, target, _trace = next(module.rank_one_updates([request], templates))
                seconds[suffix_only].append(time.perf_counter() - start)
            finally:
                rome_module.optimize_targets = original
            columns.append(column)
            rows.append(row)
            targets.append(target)
        print(f"request {i + 1}: full passes {seconds[False][-1]:.2f} s (values {optimize_seconds[False][-1]:.2f} s), "
              f"suffix pass {seconds[True][-1]:.2f} s (values {optimize_seconds[True][-1]:.2f} s)", flush=True)
    old, new = state[False], state[True]
    worst_target = max(rel(b, a) for a, b in zip(old[2], new[2], strict=True))
    worst_update = max(rel(nc @ nr, oc @ orow)
                       for oc, orow, nc, nr in zip(old[0], old[1], new[0], new[1], strict=True))
    total = rel(torch.cat(new[0], 1) @ torch.cat(new[1]), torch.cat(old[0], 1) @ torch.cat(old[1]))
    print(f"max relative difference: v* {worst_target:.2e}, each request's Delta W {worst_update:.2e}, "
          f"the whole edit's Delta W {total:.2e}")
    for name, key in (("full passes", False), ("suffix pass", True)):
        s, o = seconds[key], optimize_seconds[key]
        print(f"{name}: {sum(s) / len(s):.2f} s per request (value optimization {sum(o) / len(o):.2f} s)")
    print(f"ratio: {sum(seconds[False]) / sum(seconds[True]):.2f}x per request, "
          f"{sum(optimize_seconds[False]) / sum(optimize_seconds[True]):.2f}x for the value optimization")


def memit(args) -> None:
    import editing.methods.memit.module as memit_module
    from editing.data.datamodule import TaskDataModule
    from editing.methods.memit import MEMITConfig, MEMITEditor
    from editing.methods.memit.requests import context_templates
    from editing.models.loading import ModelConfig

    cfg = MEMITConfig(covariance_samples=args.samples or 5000, request_batch_size=args.requests)
    module = MEMITEditor(ModelConfig(name=args.model, precision="fp32"), cfg)
    module.reuse_base_numbers = False  # no cached targets: both paths compute theirs
    dm = TaskDataModule(task=args.task, split="val")
    dm.attach(module.tokenizer, module.max_length)
    module.bind_task(dm.task)
    module.model.eval()
    requests = module.canonical_requests(dm)[: args.requests * args.batches]
    module.covariance_stats = module.statistics(dm, progress=False)
    with module.deltas_off():
        templates = context_templates(module.model, module.tokenizer, cfg.context_templates,
                                      cfg.context_template_length)
    original = memit_module.optimize_targets
    z = {False: [], True: []}
    seconds = {False: 0.0, True: 0.0}
    print(f"MEMIT on {args.model}, {args.task}, layers {module.memit_layers}, {len(requests)} requests in batches of "
          f"{args.requests}, threads {torch.get_num_threads()}")
    for start in range(0, len(requests), args.requests):
        chunk = requests[start: start + args.requests]
        for suffix_only in (False, True):
            memit_module.optimize_targets = functools.partial(original, suffix_only=suffix_only)
            try:
                begin = time.perf_counter()
                with torch.enable_grad():
                    z[suffix_only].append(module.target_vectors(chunk, templates))
                seconds[suffix_only] += time.perf_counter() - begin
            finally:
                memit_module.optimize_targets = original
            print(f"requests {start + 1}-{start + len(chunk)}: {'suffix pass' if suffix_only else 'full passes'} "
                  f"{seconds[suffix_only]:.1f} s so far", flush=True)
    z_old, z_new = torch.cat(z[False]), torch.cat(z[True])
    deltas = {}
    for key, zz in ((False, z_old), (True, z_new)):
        module.spread_targets(requests, templates, zz)
        deltas[key] = module.weight_deltas()
    with module.deltas_off():
        from editing.methods.memit.compute import subject_activations
        from editing.methods.memit.requests import RowBuilder

        builder = RowBuilder(module.tokenizer, module.max_length)
        bare = [r for r in builder.rows(requests, templates, with_suffixes=True) if r.template == 0 and r.slot == 0]
        h = subject_activations(module.model, bare, module.memit_layers[-1], "output", module._pad_id)
    print(f"max relative difference: z {rel(z_new, z_old):.2e}, z - h {rel(z_new - h, z_old - h):.2e}, Delta W "
          + ", ".join(f"layer {k} {rel(deltas[True][k], deltas[False][k]):.2e}" for k in deltas[False]))
    n = len(requests)
    print(f"full passes {seconds[False] / n:.2f} s per request, suffix pass {seconds[True] / n:.2f} s per request, "
          f"ratio {seconds[False] / seconds[True]:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=("rome", "memit"), default="rome")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="country_capital")
    parser.add_argument("--requests", type=int, default=6, help="ROME: requests; MEMIT: requests per batch")
    parser.add_argument("--batches", type=int, default=1, help="MEMIT: batches of --requests")
    parser.add_argument("--layer", type=int, default=None, help="ROME's layer (default: the model's)")
    parser.add_argument("--samples", type=int, default=0, help="tokens of R for C (ROME 0: C = I)")
    args = parser.parse_args()
    torch.manual_seed(0)
    (rome if args.method == "rome" else memit)(args)


if __name__ == "__main__":
    main()
