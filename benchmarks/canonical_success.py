"""Score a saved edit on the canonical examples it was made from (not the evaluation set): did it take hold where it
was asked to? Prints the mean suffix NLL sum and the success rate under the task's threshold, before and after.

    OMP_NUM_THREADS=1 python benchmarks/canonical_success.py runs/main/memit/version_0/edits/ball_1e-03 \
        [--task country_capital] [--split val]
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("edit", help="an edit folder (<run>/edits/ball_<eps>)")
    parser.add_argument("--task", default="country_capital")
    parser.add_argument("--split", default="val")
    args = parser.parse_args()

    from editing.data.batching import collate
    from editing.data.datamodule import TaskDataModule
    from editing.edits.load import load_edited
    from editing.evaluation.scorer import example_nll
    from editing.methods.base import EditingModule
    from editing.models.loading import ModelConfig
    from editing.rules.losses import example_score

    edited = load_edited(args.edit)
    base = EditingModule(ModelConfig(name=edited.identity["name"], precision="fp32"))
    dm = TaskDataModule(task=args.task, split=args.split)
    dm.attach(edited.tokenizer, edited.max_length)
    examples = dm.load("canonical").examples

    def scores(module) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for start in range(0, len(examples), 32):
                sums, _ = example_nll(module.model, collate(examples[start: start + 32], pad_id=dm.pad_id))
                out.append(example_score(sums, dm.task.loss))
        return torch.cat(out)

    before, after = scores(base), scores(edited)
    threshold = dm.task.threshold
    print(f"{len(examples)} canonical examples of {dm.task.name}-{args.split}: mean score {before.mean():.3f} -> "
          f"{after.mean():.3f}; success {(before <= threshold).float().mean():.3f} -> "
          f"{(after <= threshold).float().mean():.3f}")


if __name__ == "__main__":
    main()
