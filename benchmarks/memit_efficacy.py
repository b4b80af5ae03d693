"""MEMIT's efficacy on its own requests, with no ball: does the edit make the model say what it was asked to?

Computes one MEMIT edit for a set of requests and prints, on the requests themselves (their bare prompts, as the
canonical examples are scored):
- the suffix NLL before and after the edit (the SUM over the suffix tokens, which is the task's score for a
  ``good`` task, and the mean per token) and the success rate under the task's threshold;
- the same with the target vector z injected directly at the last edited layer (p0 plus z - h at the subject's
  last token, the edit MEMIT aims at) and the task loss of z at its last optimization step (over all templates);
- how much of the change z - h the layer updates realise at the last edited layer (the projection of the edited
  output's change on z - h, as a fraction of |z - h|^2), and per layer the fraction of its residual that its
  update realises at the requests' own keys;
- |z - h| / |h| beside the clamp factor, and how many targets sit at the clamp;
- optionally (``--evaluation FILE``) the same before/after scores on paraphrased evaluation prompts.

The requests are a task's canonical examples (``--task``) or a JSONL file of ``{"prefix", "suffix"}`` lines
(``--examples``; loss ``good``, threshold ``--threshold``). The covariance statistics are cached after the first
computation (``--samples`` tokens of R). Several lambdas and sample counts (comma-separated) are each spread from the
same targets.

    OMP_NUM_THREADS=1 python benchmarks/memit_efficacy.py --examples benchmarks/data/invented_facts.jsonl \
        --evaluation benchmarks/data/invented_facts_eval.jsonl [--requests 16] [--layers 3-8] [--clamp 0.75] \
        [--steps 20] [--lr 0.5] [--covariance-weight 15000] [--templates 5] [--samples 20000[,5000]] [--json OUT]
    OMP_NUM_THREADS=1 python benchmarks/memit_efficacy.py --task country_capital --requests 32
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch


def parse_layers(text: str | None) -> list[int] | None:
    """``"3-8"`` or ``"3,4,5"`` (or None: the model's default)."""
    if text is None:
        return None
    out: list[int] = []
    for part in text.split(","):
        if "-" in part:
            low, high = part.split("-")
            out += list(range(int(low), int(high) + 1))
        else:
            out.append(int(part))
    return out


def write_requests(args, tokenizer, folder: Path) -> Path:
    """A task YAML in ``folder`` whose canonical file holds the chosen requests (first ``--requests`` lines,
    suffixes cut to their first token with ``--first-token``); the task keeps its name (for oracle defaults)."""
    from editing.data.jsonl import read_jsonl
    from editing.rules.tasks import get_task

    if args.examples:
        name, loss, threshold, source = args.name, "good", args.threshold, Path(args.examples)
    else:
        from editing.data.datamodule import TaskDataModule

        dm = TaskDataModule(task=args.task, split=args.split)
        task = get_task(args.task)
        name, loss, threshold, source = task.name, task.loss, task.threshold, dm.path("canonical")
    lines = [json.loads(line) for line in source.read_text().splitlines() if line.strip()][: args.requests]
    read_jsonl(source, "single" if loss in ("good", "bad") else "pair")  # validates the file (clear errors)
    if args.first_token:
        for line in lines:
            for key in ("suffix", "suffix1", "suffix2"):
                if key in line:
                    first = tokenizer(line[key], add_special_tokens=False)["input_ids"][:1]
                    line[key] = tokenizer.decode(first)
    canonical = folder / "requests.jsonl"
    canonical.write_text("".join(json.dumps(line) + "\n" for line in lines))
    evaluation = Path(args.evaluation).resolve() if args.evaluation else canonical
    task_yaml = folder / f"{name}.yaml"
    task_yaml.write_text(json.dumps({"name": name, "loss": loss, "threshold": threshold,
                                     "canonical": str(canonical), "evaluation": str(evaluation)}))
    return task_yaml


def suffix_nll(model, examples, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example (first suffix): the suffix NLL sum and its token count."""
    from editing.data.batching import collate
    from editing.evaluation.scorer import example_nll

    sums, counts = [], []
    with torch.no_grad():
        for start in range(0, len(examples), 32):
            s, c = example_nll(model, collate(examples[start: start + 32], pad_id=pad_id))
            sums.append(s[:, 0].double())
            counts.append(c[:, 0].double())
    return torch.cat(sums), torch.cat(counts)


def scores(model, examples, loss: str, pad_id: int) -> torch.Tensor:
    """The task's score per example (SPEC section 5)."""
    from editing.data.batching import collate
    from editing.evaluation.scorer import example_nll
    from editing.rules.losses import example_score

    out = []
    with torch.no_grad():
        for start in range(0, len(examples), 32):
            s, _ = example_nll(model, collate(examples[start: start + 32], pad_id=pad_id))
            out.append(example_score(s, loss).double())
    return torch.cat(out)


def token_nlls(module, requests, delta: torch.Tensor | None = None, edited: bool = False) -> list[torch.Tensor]:
    """Per request, the NLL of each suffix token on its bare prompt: of p0 (``edited=False``) or of the edited
    model, optionally with ``delta[i]`` added to the output of the last edited layer at request i's subject token."""
    from contextlib import nullcontext

    from editing.methods.memit.layers import add_to_block_output, hooks
    from editing.methods.memit.requests import RowBuilder, pad_rows
    from editing.models.architecture import capture_final_hidden, head_logits

    rows = RowBuilder(module.tokenizer, module.max_length).rows(requests, [""], with_suffixes=True)
    rows = [r for r in rows if r.slot == 0]
    ids, mask = pad_rows(rows, module._pad_id, module.device)
    handles = []
    if delta is not None:
        pos = torch.tensor([r.subject_pos for r in rows])
        index = torch.arange(len(rows))
        add = delta[[r.request for r in rows]].float()

        def inject(hidden: torch.Tensor) -> torch.Tensor:
            return hidden.index_put((index, pos), add.to(hidden.dtype), accumulate=True)

        handles.append(add_to_block_output(module.model, module.memit_layers[-1], inject))
    with torch.no_grad(), nullcontext() if edited else module.deltas_off(), hooks(handles):
        with capture_final_hidden(module.model) as store:
            module.model(input_ids=ids, attention_mask=mask, use_cache=False)
    out = []
    for i, row in enumerate(rows):
        logits = head_logits(module.model, store["hidden"][i, row.score_from - 1: len(row.ids) - 1])
        targets = torch.tensor(row.ids[row.score_from:])[:, None]
        out.append((torch.logsumexp(logits, -1) - logits.gather(1, targets)[:, 0]).double())
    return out


def injected_nll(module, requests, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Suffix NLL sum and mean per request on the bare prompts of p0 with ``delta[i]`` added to the output of the
    last edited layer at request i's subject token: what the edit would do if the layers realised z exactly."""
    nlls = token_nlls(module, requests, delta)
    return torch.stack([n.sum() for n in nlls]), torch.stack([n.mean() for n in nlls])


def first_and_rest(nlls: list[torch.Tensor]) -> dict[str, float]:
    """Mean over requests of the first target token's NLL and of the sum over the later ones."""
    return {"first_token": torch.stack([n[0] for n in nlls]).mean().item(),
            "later_tokens_sum": torch.stack([n[1:].sum() for n in nlls]).mean().item()}


def general_nll(model, texts, pad_id: int) -> float:
    """Token-mean NLL over the texts of the general set G (SPEC section 5's degradation measure)."""
    from editing.data.batching import collate
    from editing.evaluation.scorer import example_nll

    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(texts), 16):
            s, c = example_nll(model, collate(texts[start: start + 16], pad_id=pad_id))
            total += s.sum().item()
            tokens += int(c.sum())
    return total / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--task", default="country_capital", help="a built-in task or task YAML (its canonical "
                                                                  "examples are the requests)")
    source.add_argument("--examples", help="a JSONL file of {prefix, suffix} requests (loss good)")
    parser.add_argument("--name", default="invented_facts", help="task name for --examples")
    parser.add_argument("--threshold", type=float, default=-math.log(0.2), help="success threshold for --examples")
    parser.add_argument("--evaluation", help="also score these paraphrased prompts before and after")
    parser.add_argument("--split", default="val")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--requests", type=int, default=16, help="first N lines are the requests")
    parser.add_argument("--first-token", action="store_true", help="cut every target to its first token")
    parser.add_argument("--layers", help="edited layers, e.g. 3-8 or 2,4,6 (default: the model's)")
    parser.add_argument("--clamp", type=float, default=0.75, help="clamp_norm_factor")
    parser.add_argument("--steps", type=int, default=20, help="target optimization steps")
    parser.add_argument("--lr", type=float, default=0.5, help="target optimization learning rate")
    parser.add_argument("--covariance-weight", default="15000",
                        help="lambda, or several comma-separated (the targets are computed once)")
    parser.add_argument("--kl-factor", type=float, default=0.0625)
    parser.add_argument("--weight-decay", type=float, default=0.5)
    parser.add_argument("--templates", type=int, default=5, help="generated context templates (besides the bare one)")
    parser.add_argument("--samples", default="20000",
                        help="tokens of R for the covariance statistics, or several comma-separated (each with every "
                             "lambda; the targets are computed once)")
    parser.add_argument("--supervision", default="standard", choices=["standard", "oracle"])
    parser.add_argument("--oracle-field", help="oracle supervision: the field naming the subject (e.g. subject)")
    parser.add_argument("--general", type=int, default=0,
                        help="also measure the degradation on the first N texts of G (0: skip)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()

    from editing.data.datamodule import TaskDataModule
    from editing.methods import MEMITConfig, MEMITEditor
    from editing.methods.memit.compute import subject_activations
    from editing.methods.memit.requests import RowBuilder
    from editing.models.loading import ModelConfig

    weights = [float(w) for w in args.covariance_weight.split(",")]
    sample_counts = [int(n) for n in args.samples.split(",")]
    cfg = MEMITConfig(layers=parse_layers(args.layers), clamp_norm_factor=args.clamp, covariance_weight=weights[0],
                      kl_factor=args.kl_factor, steps=args.steps, lr=args.lr, weight_decay=args.weight_decay,
                      supervision=args.supervision, oracle_field=args.oracle_field, covariance_samples=sample_counts[0],
                      context_templates=args.templates, request_batch_size=max(1, args.requests))
    module = MEMITEditor(ModelConfig(name=args.model), cfg)
    module.model.eval()
    with tempfile.TemporaryDirectory(prefix="memit-efficacy-") as tmp:
        dm = TaskDataModule(task=str(write_requests(args, module.tokenizer, Path(tmp))), split=args.split,
                            general_limit=args.general or None)
        dm.attach(module.tokenizer, module.max_length)
        examples = dm.load("canonical").examples
        evaluation = dm.load("evaluation").examples if args.evaluation else None
        requests = module.canonical_requests(dm)
        loss, threshold = dm.task.loss, dm.task.threshold
        if loss != "good":
            print(f"note: task loss {loss!r}: NLL columns are of the first suffix; score/success use the task's rule")
        sum_before, count = suffix_nll(module.model, examples, dm.pad_id)
        score_before = scores(module.model, examples, loss, dm.pad_id)
        eval_before = scores(module.model, evaluation, loss, dm.pad_id) if evaluation else None
        general = dm.load("general").examples if args.general else None
        general_before = general_nll(module.model, general, dm.pad_id) if general else None

        start = time.perf_counter()
        module.compute_edit(dm, requests, progress=False)  # targets z, then the layer updates for the first lambda
        seconds = time.perf_counter() - start
        diag = module.edit_diagnostics
        z = diag["targets"].double()
        bare = RowBuilder(module.tokenizer, module.max_length).rows(requests, [""], with_suffixes=False)
        last = module.memit_layers[-1]
        with torch.no_grad(), module.deltas_off():
            h = subject_activations(module.model, bare, last, "output", module._pad_id).cpu()
        aim = z - h
        ratio = aim.norm(dim=1) / h.norm(dim=1)
        inj_sum, inj_mean = injected_nll(module, requests, aim)
        split_before = first_and_rest(token_nlls(module, requests))
        split_injected = first_and_rest(token_nlls(module, requests, aim))
        results = []
        for i, (samples, weight) in enumerate((n, w) for n in sample_counts for w in weights):
            if i:  # the targets depend on neither C nor lambda: only the layer updates are recomputed
                module.memit_config.covariance_weight = weight
                if samples != module.memit_config.covariance_samples:
                    module.memit_config.covariance_samples = samples
                    module.covariance_stats = module.statistics(dm, progress=False)
                with torch.no_grad():
                    module.spread_targets(requests, diag["templates"], z)
            sum_after, _ = suffix_nll(module.model, examples, dm.pad_id)
            score_after = scores(module.model, examples, loss, dm.pad_id)
            eval_after = scores(module.model, evaluation, loss, dm.pad_id) if evaluation else None
            with torch.no_grad():
                edited_out = subject_activations(module.model, bare, last, "output", module._pad_id).cpu()
            reached = edited_out - h
            realised = (reached * aim).sum(1) / aim.pow(2).sum(1).clamp(min=1e-30)
            missed = (z - edited_out).norm(dim=1) / aim.norm(dim=1).clamp(min=1e-30)
            degradation = general_nll(module.model, general, dm.pad_id) / general_before - 1 if general else None
            results.append((samples, weight, sum_after, score_after, eval_after, degradation, realised, missed,
                            list(module.edit_diagnostics["layers"]), first_and_rest(token_nlls(module, requests,
                                                                                               edited=True))))

    def rate(s: torch.Tensor) -> float:
        return (s <= threshold).double().mean().item()

    final_loss = diag["target_loss"][-1].double()
    common = {
        "model": args.model, "source": args.examples or args.task, "requests": len(requests),
        "suffix_tokens_mean": count.mean().item(), "first_token": args.first_token,
        "layers": module.memit_layers, "clamp_norm_factor": args.clamp, "steps": args.steps, "lr": args.lr,
        "kl_factor": args.kl_factor, "weight_decay": args.weight_decay, "templates": len(diag["templates"]),
        "supervision": args.supervision, "statistics_tokens": sample_counts, "threads": torch.get_num_threads(),
        "edit_s": round(seconds, 1),
        "before": {"nll_sum": sum_before.mean().item(), "nll_per_token": (sum_before / count).mean().item(),
                   "success": rate(score_before), "score": score_before.mean().item(), **split_before},
        "z_injected": {"nll_sum": inj_sum.mean().item(), "nll_per_token": inj_mean.mean().item(),
                       "success": rate(inj_sum) if loss == "good" else None, **split_injected},
        "target_loss": {"first_step": diag["target_loss"][0].double().mean().item(),
                        "last_step": final_loss.mean().item(), "per_request_last": final_loss.tolist(),
                        "mean_by_step": diag["target_loss"].double().mean(1).tolist()},
        "delta_over_h": {"mean": ratio.mean().item(), "max": ratio.max().item(),
                         "at_clamp": int((ratio >= args.clamp * 0.999).sum())},
    }
    if general:
        common["general_before"] = {"texts": len(general), "nll": general_before}
    if evaluation:
        common["evaluation_before"] = {"examples": len(evaluation), "score": eval_before.mean().item(),
                                       "success": rate(eval_before)}
    common["edits"] = []
    for samples, weight, sum_after, score_after, eval_after, degradation, realised, missed, layers, split in results:
        edit = {"covariance_weight": weight, "statistics_tokens": samples,
                "nll_sum": sum_after.mean().item(), "nll_per_token": (sum_after / count).mean().item(),
                "success": rate(score_after), "score": score_after.mean().item(), **split,
                "degradation": degradation,
                "realised_at_last_layer": {"mean": realised.mean().item(), "min": realised.min().item(),
                                           "max": realised.max().item(), "missed_fraction_mean": missed.mean().item()},
                "per_layer": layers}
        if evaluation:
            edit["evaluation"] = {"score": eval_after.mean().item(), "success": rate(eval_after)}
        common["edits"].append(edit)

    print(f"MEMIT on {common['requests']} requests of {common['source']} (mean {common['suffix_tokens_mean']:.2f} "
          f"target tokens), layers {common['layers']}, clamp {args.clamp}, {args.steps} steps at lr {args.lr}, "
          f"{common['templates']} templates, {args.supervision}; first edit {common['edit_s']} s")
    print("| | NLL sum | NLL per token | first token | later tokens (sum) | success | realised at last layer |"
          + (" eval score | eval success |" if evaluation else "") + (" degradation |" if general else ""))
    print("|---|---|---|---|---|---|---|" + ("---|---|" if evaluation else "") + ("---|" if general else ""))
    b, zi = common["before"], common["z_injected"]
    ev = common.get("evaluation_before")
    print(f"| p0 | {b['nll_sum']:.3f} | {b['nll_per_token']:.3f} | {b['first_token']:.3f} | "
          f"{b['later_tokens_sum']:.3f} | {b['success']:.3f} | - |"
          + (f" {ev['score']:.3f} | {ev['success']:.3f} |" if ev else "") + (" 0 |" if general else ""))
    print(f"| z injected at layer {last} | {zi['nll_sum']:.3f} | {zi['nll_per_token']:.3f} | "
          f"{zi['first_token']:.3f} | {zi['later_tokens_sum']:.3f} | "
          f"{'-' if zi['success'] is None else format(zi['success'], '.3f')} | 1 |" + (" - | - |" if ev else "")
          + (" - |" if general else ""))
    for edit in common["edits"]:
        e = edit.get("evaluation")
        print(f"| MEMIT, lambda {edit['covariance_weight']:g}, C from {edit['statistics_tokens']} tokens | "
              f"{edit['nll_sum']:.3f} | {edit['nll_per_token']:.3f} | "
              f"{edit['first_token']:.3f} | {edit['later_tokens_sum']:.3f} | "
              f"{edit['success']:.3f} | {edit['realised_at_last_layer']['mean']:.3f} |"
              + (f" {e['score']:.3f} | {e['success']:.3f} |" if e else "")
              + (f" {edit['degradation']:+.2e} |" if general else ""))
    tl, dh = common["target_loss"], common["delta_over_h"]
    print(f"target loss (task loss of z over the templates): {tl['first_step']:.3f} -> {tl['last_step']:.3f}")
    print(f"|z - h| / |h|: mean {dh['mean']:.3f}, max {dh['max']:.3f} (clamp {args.clamp}; {dh['at_clamp']} of "
          f"{common['requests']} at the clamp)")
    for edit in common["edits"]:
        per_layer = ", ".join(f"{d['layer']}: {d['residual_norm']:.2f} {d['realised_fraction']:.3f} "
                              f"{d['key_mahalanobis']:.0f} {d['key_cosine_c']:.2f}" for d in edit["per_layer"])
        print(f"lambda {edit['covariance_weight']:g}, C from {edit['statistics_tokens']} tokens, per layer "
              f"(residual norm, fraction realised at the requests' keys, mean k^T C^-1 k, mean cosine of two "
              f"requests' keys in C's metric): {per_layer}")
    if args.json:
        Path(args.json).write_text(json.dumps(common, indent=2) + "\n")


if __name__ == "__main__":
    main()
