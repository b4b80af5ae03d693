"""The target optimization's cost per request, full passes against the suffix pass (issues 37 and 38), in one run.

ROME: the canonical requests one after another, each computed twice on the model as edited by the earlier ones,
once with full forward passes in every Adam step (``suffix_only=False``, the path before the speed-up) and once with
the suffix pass (``editing.methods.memit.suffix``), alternating request by request so that both see the same load;
each path keeps its own sequence of edits. Prints per request the seconds of each (the value optimization and the
whole update: keys, values, solve) and how far its v* - v0 is from the full passes', and at the end the largest
relative difference of v* - v0 and of each update Delta W, and the seconds per request of each path. The requests
form a sequence (each on the model as edited by the earlier ones), so a difference made by one request reaches every
later one; ``--unbatched`` adds a third sequence, today's full passes with one row per forward pass (the same
algorithm, other fp32 rounding), to show how much rounding alone moves the sequence.

MEMIT (``--method memit``): the target vectors z of ``--requests`` requests (one batch of
``request_batch_size``), both ways, alternating batches, and the spread's Delta W per layer from each (covariance
statistics of ``--samples`` tokens of R, the same for both).

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/target_speed.py --method rome --requests 8 [--unbatched]
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
    from editing.methods.memit import compute as memit_compute
    from editing.methods.memit.compute import subject_activations
    from editing.methods.memit.requests import RowBuilder, context_templates
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
    # path name -> (suffix_only, rows per forward pass of the full passes); "unbatched" is today's full passes with
    # one row per pass (no padding): the same algorithm with other rounding, the yardstick of what fp32 allows
    paths = {"full": (False, memit_compute.GROUP_ROWS), "suffix": (True, memit_compute.GROUP_ROWS)}
    if args.unbatched:
        paths["unbatched"] = (False, 1)
    state = {name: ([], [], [], []) for name in paths}  # columns, rows, targets, v0 per path
    seconds = {name: [] for name in paths}
    optimize_seconds = {name: [] for name in paths}
    print(f"ROME on {args.model}, {args.task}, layer {layer}, {len(requests)} requests, "
          f"{len(templates)} templates, threads {torch.get_num_threads()}")
    for i, request in enumerate(requests):
        for name, (suffix_only, group_rows) in paths.items():
            columns, rows, targets, values = state[name]
            if columns:
                module._set_factors(torch.cat(columns, dim=1), torch.cat(rows, dim=0))
            else:
                module.clear_edit()

            def timed(*a, suffix_only=suffix_only, name=name, **kw):
                start = time.perf_counter()
                out = original(*a, **kw, suffix_only=suffix_only)
                optimize_seconds[name].append(time.perf_counter() - start)
                return out

            rome_module.optimize_targets = timed
            memit_compute.GROUP_ROWS = group_rows
            try:
                start = time.perf_counter()
                with torch.enable_grad():
                    column, row, target, _trace = next(module.rank_one_updates([request], templates))
                seconds[name].append(time.perf_counter() - start)
            finally:
                rome_module.optimize_targets = original
                memit_compute.GROUP_ROWS = paths["full"][1]
            bare = [r for r in RowBuilder(module.tokenizer, module.max_length).rows([request], templates, False)
                    if r.template == 0]
            values.append(subject_activations(module.model, bare, layer, "value", module._pad_id))  # v0 as edited
            columns.append(column)
            rows.append(row)
            targets.append(target)
        line = ", ".join(f"{n} {seconds[n][-1]:.2f} s (values {optimize_seconds[n][-1]:.2f} s)" for n in paths)
        change = state["full"][2][-1] - state["full"][3][-1]
        diffs = ", ".join(f"{n} {rel(state[n][2][-1] - state[n][3][-1], change):.1e}" for n in paths if n != "full")
        print(f"request {i + 1}: {line}; v* - v0 against full: {diffs}", flush=True)
    old = state["full"]
    for name in paths:
        if name == "full":
            continue
        new = state[name]
        worst_target = max(rel(b - bv, a - av) for a, av, b, bv in zip(old[2], old[3], new[2], new[3], strict=True))
        worst_update = max(rel(nc @ nr, oc @ orow)
                           for oc, orow, nc, nr in zip(old[0], old[1], new[0], new[1], strict=True))
        total = rel(torch.cat(new[0], 1) @ torch.cat(new[1]), torch.cat(old[0], 1) @ torch.cat(old[1]))
        print(f"{name} against full, max relative difference: v* - v0 {worst_target:.2e}, each request's Delta W "
              f"{worst_update:.2e}, the whole edit's Delta W {total:.2e}")
    for name in paths:
        s, o = seconds[name], optimize_seconds[name]
        print(f"{name}: {sum(s) / len(s):.2f} s per request (value optimization {sum(o) / len(o):.2f} s)")
    print(f"ratio full/suffix: {sum(seconds['full']) / sum(seconds['suffix']):.2f}x per request, "
          f"{sum(optimize_seconds['full']) / sum(optimize_seconds['suffix']):.2f}x for the value optimization")


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
    parser.add_argument("--unbatched", action="store_true",
                        help="ROME: also today's full passes with one row per pass (other rounding, same algorithm)")
    args = parser.parse_args()
    torch.manual_seed(0)
    (rome if args.method == "rome" else memit)(args)


if __name__ == "__main__":
    main()
