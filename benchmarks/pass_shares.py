"""Where one evaluation pass of G spends its time: the blocks below an edit's first changed block, the blocks from it
upward, and the LM head with its fp32 NLL (issue 13: the bound on what exact incremental evaluation can save).

An exact incremental evaluation skips only the blocks below ``--start`` (their output is cached); everything from
block ``start`` up and the head over the whole vocabulary run every epoch. The share of the first part is therefore
the most any exact evaluation can save per epoch for an edit that starts at ``start``.

    OMP_NUM_THREADS=2 python benchmarks/pass_shares.py --start 7 --texts 8 --repeat 5

Prints each repetition's seconds and the median shares.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--start", type=int, default=7, help="the first block an edit changes (the main LoRA: 7)")
    parser.add_argument("--texts", type=int, default=8, help="texts of G in the batch (the longest of the first 40)")
    parser.add_argument("--max_tokens", type=int, default=256, help="tokens kept per text")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from editing.core.paths import resolve_data_root
    from editing.data.jsonl import read_jsonl
    from editing.evaluation.scorer import head_nll
    from editing.models.architecture import blocks
    from editing.models.loading import ModelConfig, load_model

    loaded = load_model(ModelConfig(name=args.model))
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    rows = read_jsonl(resolve_data_root() / "general" / "degradation.jsonl", "text", limit=40)
    ids = sorted((tokenizer(row.text)["input_ids"][: args.max_tokens] for row in rows), key=len)[-args.texts:]
    width = max(len(i) for i in ids)
    input_ids = torch.zeros(len(ids), width, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for r, row in enumerate(ids):
        input_ids[r, : len(row)] = torch.tensor(row)
        mask[r, : len(row)] = 1
    scored = mask[:, 1:].bool()
    targets = input_ids[:, 1:][scored]

    marks: dict[str, float] = {}
    def mark(module, inputs) -> None:
        marks["start"] = time.perf_counter()

    blocks(model)[args.start].register_forward_pre_hook(mark)
    body = model.get_decoder()
    times = []
    with torch.no_grad():
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            hidden = body(input_ids=input_ids, attention_mask=mask).last_hidden_state
            t1 = time.perf_counter()
            head_nll(model, hidden[:, :-1][scored].float(), targets)
            t2 = time.perf_counter()
            times.append((marks["start"] - t0, t1 - marks["start"], t2 - t1))
            print(f"below block {args.start}: {times[-1][0]:.3f} s   blocks {args.start}-: {times[-1][1]:.3f} s   "
                  f"head and NLL: {times[-1][2]:.3f} s")
    below, above, head = (statistics.median(t[i] for t in times) for i in range(3))
    total = below + above + head
    print(f"{int(mask.sum())} tokens ({int(scored.sum())} scored), {torch.get_num_threads()} threads; median shares: "
          f"embeddings and blocks below {args.start} {below / total:.3f}, blocks from {args.start} up "
          f"{above / total:.3f}, head and NLL {head / total:.3f}")


if __name__ == "__main__":
    main()
