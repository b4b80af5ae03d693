"""``editing auto`` selects on the user's evaluation prompts when there are some (issue 36 item 4).

With evaluation prompts the trials train on every canonical example, are scored on a held-out part of the
prompts (per canonical example when every prompt shares the suffix of exactly one canonical example, else a seeded
fraction of all of them) and the final edit is reported on the rest. The expected splits are recomputed here with
plain loops from the rule as the README states it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from editing.protocol.auto import auto_edit, plan_data
from editing.rules.tasks import get_task

FACTS = [("The river Quellan flows into", " the Amber Sea"), ("The painter Orvid Tesk was born in", " Lower Maro"),
         ("The guild of Hesp trades in", " blue salt"), ("The Velk bridge is made of", " white stone"),
         ("The moon of Tarsis is called", " Little Ember")]
PARAPHRASES = [2, 3, 1, 2, 4]  # prompts per fact: fact 2 has one (it stays in the reported part)


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _task(folder: Path, unmatched: bool = False) -> tuple[Path, list[dict]]:
    folder.mkdir(parents=True, exist_ok=True)
    canonical = [{"prefix": p, "suffix": s} for p, s in FACTS]
    evaluation = [{"prefix": f"Asked another way ({k}): {p.lower()}", "suffix": s}
                  for (p, s), count in zip(FACTS, PARAPHRASES, strict=True) for k in range(count)]
    if unmatched:  # a prompt whose target is no canonical example's: no per-example mapping
        evaluation.append({"prefix": "The capital of Ostra is", "suffix": " Venn"})
    _write(folder / "canonical.jsonl", canonical)
    _write(folder / "evaluation.jsonl", evaluation)
    _write(folder / "hard.jsonl", [{"prefix": "The river Nile flows into", "suffix": " the Mediterranean"}])
    (folder / "task.yaml").write_text("name: invented\nloss: good\nthreshold: 1.6094379124341003\n"
                                      "canonical: canonical.jsonl\nevaluation: evaluation.jsonl\n"
                                      "hard_negatives: hard.jsonl\n", encoding="utf-8")
    return folder / "task.yaml", evaluation


def _read(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def _check_files(plan, task: Path, evaluation: list[dict], chosen: list[int]) -> None:
    search, final = get_task(plan.search_task), get_task(plan.final_task)
    # both train on every canonical example; the search is scored on the chosen prompts, the final on the rest
    assert search.file("canonical", "val") == final.file("canonical", "val") == (task.parent / "canonical.jsonl")
    assert _read(search.file("evaluation", "val")) == [evaluation[i] for i in chosen]
    assert _read(final.file("evaluation", "val")) == [e for i, e in enumerate(evaluation) if i not in chosen]
    assert search.file("hard_negatives", "val") == final.file("hard_negatives", "val") == task.parent / "hard.jsonl"
    assert plan.holdout == [] and plan.retrain and plan.train_examples == plan.final_examples == len(FACTS)
    assert plan.selection_prompts == chosen and plan.report_prompts == len(evaluation) - len(chosen)


@pytest.mark.parametrize("seed", [0, 5])
def test_prompts_are_held_out_per_canonical_example_when_each_shares_one_examples_suffix(tmp_path, seed) -> None:
    task, evaluation = _task(tmp_path / "task")
    plan = plan_data(str(task), tmp_path / "data", holdout=0.25, seed=seed)
    rng, chosen = random.Random(seed), []
    for _prefix, suffix in FACTS:
        group = []
        for j, e in enumerate(evaluation):
            if e["suffix"] == suffix:
                group.append(j)
        if len(group) >= 2:  # at least one prompt of the example is selected on, at least one reported
            count = max(1, min(len(group) - 1, round(0.25 * len(group))))
            chosen += sorted(rng.sample(group, count))
    assert plan.selection == "evaluation prompts per canonical example (by suffix)"
    _check_files(plan, task, evaluation, sorted(chosen))


def test_prompts_are_a_seeded_fraction_when_they_do_not_map_to_examples(tmp_path) -> None:
    task, evaluation = _task(tmp_path / "task", unmatched=True)
    plan = plan_data(str(task), tmp_path / "data", holdout=0.25, seed=3)
    m = len(evaluation)
    count = max(1, min(m - 1, round(0.25 * m)))
    chosen = sorted(random.Random(3).sample(range(m), count))
    assert plan.selection == "evaluation prompts, seeded fraction"
    _check_files(plan, task, evaluation, chosen)


def test_without_evaluation_prompts_whole_examples_are_held_out_as_before(tmp_path) -> None:
    task, _ = _task(tmp_path / "task")
    plan = plan_data(str(task.parent / "canonical.jsonl"), tmp_path / "data", holdout=0.25, seed=0)
    assert plan.selection == "canonical examples" and len(plan.holdout) == 1 and plan.selection_prompts == []
    examples = plan_data(str(task), tmp_path / "d2", holdout=0.25, seed=0, selection="examples")
    assert examples.selection == "canonical examples" and examples.holdout == plan.holdout


def test_autos_record_names_the_rule_and_the_split(tmp_path, monkeypatch) -> None:
    import editing.protocol.auto as auto_module

    tasks: list[tuple[str, str]] = []

    def fake_run(trial, args, runner, deadline, key, clock) -> None:
        tasks.append((trial.phase, args[args.index("--data.task") + 1]))
        trial.status, trial.seconds, trial.epoch, trial.last_epoch = "finished", 1.0, 2, 4
        trial.reliability = trial.generalization = 0.5
        trial.reliability_mean_score, trial.degradation, trial.objective = 1.0, 0.0, 1.0
        (Path(trial.folder) / "edits" / f"ball_{key}").mkdir(parents=True, exist_ok=True)

    monkeypatch.setattr(auto_module, "_run", fake_run)
    task, evaluation = _task(tmp_path / "task")
    auto_edit(str(task), methods=["lora"], ball=1e-3, trials=1, model="tiny-gpt2", output_dir=str(tmp_path / "a"))
    record = json.loads((tmp_path / "a" / "auto.json").read_text())
    plan = record["plan"]
    assert plan["selection"] == "evaluation prompts per canonical example (by suffix)"
    chosen = plan["selection_prompts"]
    # one prompt of each fact with two or more (facts 0, 1, 3 and 4; fact 2's one prompt is reported)
    assert len(chosen) == 4 and plan["report_prompts"] == len(evaluation) - 4
    assert [phase for phase, _ in tasks] == ["explore", "final"]
    assert tasks[0][1] == plan["search_task"] and tasks[1][1] == plan["final_task"] != plan["search_task"]
