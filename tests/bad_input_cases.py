"""Bad inputs a user can give the ``editing`` command, each with the clear error it must end in.

One table shared by ``tests/commands/test_bad_inputs.py`` (one test per case) and ``benchmarks/bad_inputs.py``
(prints the counts). Every case runs the real command in a subprocess (``python -m editing.cli ...``) in its own
folder and must end in a non-zero exit, with no Python traceback on stderr, and a message that names the file, line
or setting at fault (``expect``: every fragment must appear) and says how to fix it (``fix``: at least one must appear).

Cases share a few artifacts built once (``build_artifacts``): the checkpoint and LoRA edits of a real tiny fit, a
full-finetuning edit, and LoRA adapters of other architectures.

Two ways to run a case: ``subprocess`` (``python -m editing.cli``, exactly what a user runs) and ``fork``: a child
forked from a multiprocessing fork server that has already imported torch, Lightning and transformers runs
``editing.cli.main()`` with the case's ``sys.argv``, working folder and stdout/stderr files, and reports an
uncaught exception as the interpreter would (a traceback on stderr, exit 1). The command's code is the same; only
the seconds of imports per case are saved, which makes the 70 cases a test rather than a coffee break.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parents[1]
CASE_TIMEOUT = 240  # seconds; a case that hangs (e.g. retrying a database for minutes) is a failure, not a wait

# a validate/apply run small enough to finish in seconds if a bad input were silently accepted
TINY_VALIDATE = ["validate", "--model.base.name", "tiny-gpt2", "--data.eval_limit", "2", "--data.general_limit", "2",
                 "--report.output_dir", "out"]
TINY_FIT = ["fit", "--model", "LoRAEditor", "--model.base.name", "tiny-gpt2", "--model.lora.rank", "2",
            "--data.task", "country_capital", "--data.eval_limit", "4", "--data.general_limit", "4",
            "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.enable_progress_bar",
            "false", "--trainer.enable_model_summary", "false", "--budget.output_dir", "out"]
TINY_APPLY = ["apply", "--task", "country_capital", "--eval_limit", "2", "--general_limit", "2", "--output_dir",
              "out"]
SWEEP = ["sweep", "--task", "country_capital", "--method", "lora", "--model", "tiny-gpt2", "--n_trials", "1",
         "--root", "sweeps", "--args", "--data.eval_limit 2 --data.general_limit 2 --trainer.max_epochs 1"]
GOOD_LINE = b'{"prefix": "The capital of France is", "suffix": " Paris"}\n'
LATIN1_LINE = b'{"prefix": "The capital of Cura\xe7ao is", "suffix": " Willemstad"}\n'  # 0xe7: latin-1, not UTF-8


@dataclass
class Artifacts:
    """Files several cases start from (never modified by a case: cases copy them)."""

    root: Path
    checkpoint: Path
    """``last.ckpt`` of a tiny LoRA fit."""
    lora_edit: Path
    """A LoRA edit folder of that fit."""
    full_edit: Path
    """A full-finetuning edit (``edit.safetensors``) of tiny-gpt2."""
    backpack_adapter: Path
    """A LoRA adapter made on tiny-backpack (same module names as GPT-2, other parameter paths)."""
    llama_adapter: Path
    """A LoRA adapter made on tiny-llama."""


@dataclass(frozen=True)
class Case:
    """One bad input and the error it must give."""

    name: str
    make: Callable[[Path, Artifacts], list[str]]
    """Writes the case's files into its folder and returns the command's arguments (after ``editing``)."""
    expect: tuple[str, ...]
    """Fragments the message must contain: the file, line or setting at fault."""
    fix: tuple[str, ...]
    """At least one must appear: the way out."""
    env: dict[str, str] = field(default_factory=dict)
    absent: tuple[str, ...] = ()
    """Paths (relative to the case folder) the command must not create."""
    max_seconds: float | None = None
    """The error must come this fast (seconds, process start included)."""
    depends: str | None = None
    """Another helper's branch this case needs (its validation is theirs)."""
    succeeds: bool = False
    """Damage the command must survive rather than refuse (a damaged or unwritable cache): it must exit 0 with no
    traceback, say on stderr what it found (``expect``) and pass ``check``."""
    check: Callable[[Path], list[str]] | None = None
    """For a case that succeeds: what is wrong with its results in the case folder (empty: they are correct)."""


@dataclass
class Outcome:
    """What a case's command did."""

    case: Case
    kind: str
    """``clear``, ``traceback``, ``accepted`` (exit 0), ``unclear`` (message lacks a fragment) or ``timeout``; for a
    case that must succeed, ``correct`` or ``failed`` (a non-zero exit, wrong results or an unsaid warning)."""
    returncode: int | None
    stderr: str
    seconds: float
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: the case, what went wrong, and the end of its stderr."""
        tail = " | ".join(line for line in self.stderr.strip().splitlines()[-3:])
        return f"{self.case.name}: {self.kind} (exit {self.returncode}, {self.seconds:.0f}s) " \
               f"{'; '.join(self.problems)} :: {tail[-600:]}"


# ---------------------------------------------------------------------------------------------------------------
# shared artifacts
# ---------------------------------------------------------------------------------------------------------------
COMMAND_ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}


def command_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a case's command: this checkout on the path, one thread, no network."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_DIR), *filter(None, [env.get("PYTHONPATH")])])
    env.update(COMMAND_ENV)
    env.update(extra or {})
    return env


def build_artifacts(root: Path) -> Artifacts:
    """Run one tiny fit (a subprocess, as a user would) and export a few edits; seconds."""
    import torch

    from editing.methods import FullEditor, LoRAConfig, LoRAEditor
    from editing.models.loading import ModelConfig

    root.mkdir(parents=True, exist_ok=True)
    fit = root / "fit"
    fit.mkdir(exist_ok=True)
    args = [*TINY_FIT[:-1], str(fit / "run"), "--trainer.logger", "false", "--checkpoint.dirpath", str(fit / "ckpt")]
    proc = subprocess.run([sys.executable, "-m", "editing.cli", *args], cwd=fit, env=command_env(),
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"the tiny fit that bad-input cases start from failed:\n{proc.stderr[-3000:]}")

    def lora(name: str, model: str) -> Path:
        module = LoRAEditor(ModelConfig(name=model), lora=LoRAConfig(rank=2, layer_fraction=1.0))
        with torch.no_grad():  # a non-zero update, so that an adapter that loaded would change the model
            for n, p in module.model.named_parameters():
                if "lora_B" in n:
                    p.fill_(0.01)
        return module.export_edit(root / name)

    full = FullEditor(ModelConfig(name="tiny-gpt2"), gradient_checkpointing=False)
    state = full.delta_state()
    key = next(n for n in state if n.endswith("mlp.c_proj.weight"))
    state[key] = state[key] + 0.01
    return Artifacts(root=root, checkpoint=fit / "ckpt" / "last.ckpt", lora_edit=fit / "run" / "edits" / "ball_1e-03",
                     full_edit=full.export_edit(root / "full_edit", state),
                     backpack_adapter=lora("backpack_adapter", "tiny-backpack"),
                     llama_adapter=lora("llama_adapter", "tiny-llama"))


# ---------------------------------------------------------------------------------------------------------------
# helpers of the cases
# ---------------------------------------------------------------------------------------------------------------
def _task_yaml(folder: Path, body: bytes | None = None, data: bytes | None = None) -> str:
    (folder / "data-val.jsonl").write_bytes(data if data is not None else GOOD_LINE * 3)
    (folder / "task.yaml").write_bytes(body if body is not None else
                                       b"loss: good\nthreshold: 1.6\ncanonical: data-{split}.jsonl\n"
                                       b"evaluation: data-{split}.jsonl\n")
    return "task.yaml"


def _copy(src: Path, dst: Path) -> Path:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy(src, dst)
    return dst


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _flip_bits(path: Path, count: int = 8, seed: int = 0) -> None:
    """Flip one bit in each of ``count`` bytes inside the tensor data (the file stays a readable zip)."""
    data = bytearray(path.read_bytes())
    rng = random.Random(seed)
    for offset in rng.sample(range(len(data) // 4, 3 * len(data) // 4), count):
        data[offset] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


def crafted_checkpoint(path: Path, marker: Path) -> None:
    """A checkpoint whose unpickling would create ``marker`` (what a malicious file would do instead)."""
    import pathlib

    import torch

    class Payload:
        def __reduce__(self):
            return pathlib.Path.write_text, (pathlib.Path(marker), "code from a checkpoint ran")

    torch.save({"state_dict": {}, "hyper_parameters": {"teacher": {}, "shape": {}}, "payload": Payload()}, path)


def _edit_tensors(folder: Path, change: Callable[[dict], dict], manifest: bool = False) -> None:
    """Rewrite ``edit.safetensors`` through ``change``; with ``manifest`` the manifest is rewritten to match (a
    consistent edit whose content is wrong), else the old manifest stays (a file changed after saving)."""
    from safetensors.torch import load_file, save_file

    path = folder / "edit.safetensors"
    save_file(change(load_file(str(path))), str(path))
    if manifest:
        try:
            from editing.runs.manifest import write_edit_manifest
        except ImportError:  # a version without edit manifests (the suite also runs on older commits)
            return
        write_edit_manifest(folder)


def _scale(tensors: dict) -> dict:
    return {k: v * 1000 for k, v in tensors.items()}


def _nan(tensors: dict) -> dict:
    out = dict(tensors)
    key = sorted(out)[0]
    out[key] = out[key].clone()
    out[key].view(-1)[0] = float("nan")
    return out


def _wrong_shape(tensors: dict) -> dict:
    return {k: v[:, :-1].contiguous() for k, v in tensors.items()}


def _set_json(path: Path, **values) -> None:
    data = json.loads(path.read_text())
    data.update(values)
    path.write_text(json.dumps(data, indent=2))


def _space(folder: Path, text: bytes) -> str:
    (folder / "space.yaml").write_bytes(text)
    return "space.yaml"


def _study(folder: Path, name: str = "known") -> None:
    """A sweep root holding one study (so that messages can list it)."""
    from editing.protocol.storage import default_storage, make_storage

    make_storage(default_storage(folder / "sweeps", name), None)
    import optuna

    optuna.create_study(study_name=name, storage=default_storage(folder / "sweeps", name))


# ---------------------------------------------------------------------------------------------------------------
# the cases
# ---------------------------------------------------------------------------------------------------------------
def _c(name: str, make, expect: Sequence[str], fix: Sequence[str], **kw) -> Case:
    return Case(name, make, tuple(expect), tuple(fix), **kw)


def _ckpt_cases(label: str, command: Callable[[str], list[str]], fix: Sequence[str]) -> list[Case]:
    def empty(d: Path, a: Artifacts) -> list[str]:
        (d / "empty.ckpt").write_bytes(b"")
        return command("empty.ckpt")

    def truncated(d: Path, a: Artifacts) -> list[str]:
        _truncate(_copy(a.checkpoint, d / "truncated.ckpt"))
        return command("truncated.ckpt")

    def rand(d: Path, a: Artifacts) -> list[str]:
        (d / "random.ckpt").write_bytes(random.Random(1).randbytes(50_000))
        return command("random.ckpt")

    def flipped(d: Path, a: Artifacts) -> list[str]:
        _flip_bits(_copy(a.checkpoint, d / "flipped.ckpt"))
        return command("flipped.ckpt")

    def crafted(d: Path, a: Artifacts) -> list[str]:
        crafted_checkpoint(d / "crafted.ckpt", d / "MARKER")
        return command("crafted.ckpt")

    def missing(d: Path, a: Artifacts) -> list[str]:
        return command("no-such.ckpt")

    return [
        _c(f"{label}_empty_checkpoint", empty, ["empty.ckpt", "empty"], fix),
        _c(f"{label}_truncated_checkpoint", truncated, ["truncated.ckpt", "truncated"], fix),
        _c(f"{label}_random_checkpoint", rand, ["random.ckpt", "not a PyTorch checkpoint"], fix),
        _c(f"{label}_bit_flipped_checkpoint", flipped, ["flipped.ckpt", "corrupted"], fix),
        _c(f"{label}_code_in_checkpoint", crafted, ["crafted.ckpt", "code"], fix, absent=("MARKER",)),
        _c(f"{label}_missing_checkpoint", missing, ["no-such.ckpt", "not found"], fix),
    ]


def _cases() -> list[Case]:
    cases: list[Case] = []
    add = cases.append
    utf8 = ("save the file as UTF-8",)

    # --- data and tasks ------------------------------------------------------------------------------------------
    add(_c("jsonl_not_utf8", lambda d, a: [*TINY_VALIDATE, "--data.task", _task_yaml(d, data=GOOD_LINE + LATIN1_LINE)],
           ["data-val.jsonl", "line 2", "UTF-8"], utf8))
    add(_c("task_yaml_not_utf8", lambda d, a: [*TINY_VALIDATE, "--data.task", _task_yaml(
        d, body=b"loss: good\nthreshold: 1.6\n# Cura\xe7ao\ncanonical: data-{split}.jsonl\n"
                b"evaluation: data-{split}.jsonl\n")],
        ["task.yaml", "line 3", "UTF-8"], utf8))
    add(_c("task_yaml_bad_syntax", lambda d, a: [*TINY_VALIDATE, "--data.task", _task_yaml(
        d, body=b"loss: good\nthreshold: [1.6\ncanonical: data-{split}.jsonl\n")],
        ["task.yaml", "line", "not valid YAML"], ["fix the task YAML"]))
    add(_c("task_yaml_missing_key", lambda d, a: [*TINY_VALIDATE, "--data.task", _task_yaml(
        d, body=b"loss: good\nthreshold: 1.6\ncanonical: data-{split}.jsonl\n")],
        ["task.yaml", "missing key 'evaluation'"], ["a task needs"]))
    add(_c("task_yaml_unknown_loss", lambda d, a: [*TINY_VALIDATE, "--data.task", _task_yaml(
        d, body=b"loss: better\nthreshold: 1.6\ncanonical: data-{split}.jsonl\nevaluation: data-{split}.jsonl\n")],
        ["task.yaml", "better"], ["good"]))
    add(_c("task_yaml_not_found", lambda d, a: [*TINY_VALIDATE, "--data.task", "no-such-task.yaml"],
           ["no-such-task.yaml", "does not exist"], ["does not exist"]))
    add(_c("jsonl_bad_json", lambda d, a: [*TINY_VALIDATE, "--data.task", _task_yaml(
        d, data=GOOD_LINE + b'{"prefix": "x", "suffix": " y"\n')],
        ["data-val.jsonl", "line 2", "JSON"], ["one JSON object"]))
    add(_c("jsonl_missing_key", lambda d, a: [*TINY_VALIDATE, "--data.task", _task_yaml(
        d, data=GOOD_LINE + b'{"prefix": "x", "answer": " y"}\n')],
        ["data-val.jsonl", "line 2", "'suffix'"], ["expected keys"]))
    add(_c("unknown_task", lambda d, a: [*TINY_VALIDATE, "--data.task", "country_capitol"],
           ["country_capitol"], ["country_capital"]))
    add(_c("missing_data_root", lambda d, a: [*TINY_VALIDATE, "--data.task", "country_capital", "--data.data_root",
                                              "no-such-data"], ["no-such-data"], ["editing data download"]))
    add(_c("bad_split", lambda d, a: [*TINY_VALIDATE, "--data.task", "country_capital", "--data.split", "train"],
           ["data.split", "train"], ["'val' or 'test'"]))
    add(_c("eval_limit_zero", lambda d, a: [*TINY_VALIDATE, "--data.task", "country_capital", "--data.eval_limit",
                                            "0"], ["data.eval_limit=0"], ["positive number"]))

    def corpus_not_utf8(d: Path, a: Artifacts) -> list[str]:
        (d / "corpus").mkdir()
        (d / "corpus" / "part.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "Cura\xe7ao"}\n')
        return ["backpack", "distill", "--model.teacher.name", "tiny-llama", "--model.shape.num_senses", "4",
                "--data.corpus", "corpus", "--trainer.max_epochs", "1", "--trainer.logger", "false",
                "--trainer.enable_progress_bar", "false", "--checkpoint.dirpath", "ckpt"]

    add(_c("corpus_not_utf8", corpus_not_utf8, ["part.jsonl", "line 2", "UTF-8"], utf8))

    def distill_resume_truncated(d: Path, a: Artifacts) -> list[str]:
        _truncate(_copy(a.checkpoint, d / "last.ckpt"))
        return [*corpus_not_utf8(d, a), "--ckpt_path", "last.ckpt"]

    add(_c("distill_resume_from_truncated_checkpoint", distill_resume_truncated, ["last.ckpt", "truncated"],
           ["without --ckpt_path"]))

    def distill_validation_past_the_epoch(d: Path, a: Artifacts) -> list[str]:
        (d / "corpus").mkdir()
        (d / "corpus" / "part.jsonl").write_text("".join(f'{{"text": "line {i} of a small corpus."}}\n'
                                                         for i in range(200)))
        return ["backpack", "distill", "--config", str(REPO_DIR / "lightning_configs" / "distill" / "tiny.yaml"),
                "--model.output", "model", "--data.corpus", "corpus", "--trainer.val_check_interval", "400",
                "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--checkpoint.dirpath", "ckpt"]

    add(_c("distill_val_check_interval_past_the_epoch", distill_validation_past_the_epoch,
           ["--trainer.val_check_interval 400", "training batches"], ["--trainer.val_check_interval 10"],
           absent=("model", "ckpt", "interrupted.ckpt")))

    # --- models --------------------------------------------------------------------------------------------------
    def not_gguf(d: Path, a: Artifacts) -> list[str]:
        (d / "model.gguf").write_bytes(b"this is not a model\n" * 100)
        return [*TINY_VALIDATE[:1], "--model.base.name", "model.gguf", *TINY_VALIDATE[3:], "--data.task",
                "country_capital"]

    def truncated_gguf(d: Path, a: Artifacts) -> list[str]:
        from editing.models.tokenizers import smollm2_gguf_path

        with open(smollm2_gguf_path(), "rb") as handle:
            (d / "truncated.gguf").write_bytes(handle.read(2_000_000))
        return [*TINY_VALIDATE[:1], "--model.base.name", "truncated.gguf", *TINY_VALIDATE[3:], "--data.task",
                "country_capital"]

    def broken_folder(d: Path, a: Artifacts) -> list[str]:
        (d / "my-model").mkdir()
        (d / "my-model" / "config.json").write_text('{"model_type": "gpt2", ')
        return [*TINY_VALIDATE[:1], "--model.base.name", "my-model", *TINY_VALIDATE[3:], "--data.task",
                "country_capital"]

    add(_c("gguf_not_gguf", not_gguf, ["model.gguf", "not a GGUF file"], ["pass an intact .gguf"]))
    add(_c("gguf_truncated", truncated_gguf, ["truncated.gguf", "cannot be loaded"], ["pass an intact .gguf"]))
    add(_c("model_folder_broken", broken_folder, ["my-model", "not a loadable model"], ["save_pretrained"]))
    add(_c("unknown_model_name", lambda d, a: [*TINY_VALIDATE[:1], "--model.base.name", "no-such-org/no-such-model",
                                               *TINY_VALIDATE[3:], "--data.task", "country_capital"],
           ["no-such-org/no-such-model"], ["--model.base.name"]))
    add(_c("unknown_model_class", lambda d, a: [*TINY_FIT[:1], "--model", "NoSuchEditor", *TINY_FIT[3:]],
           ["NoSuchEditor"], ["LoRAEditor"]))
    add(_c("bad_precision", lambda d, a: [*TINY_VALIDATE, "--data.task", "country_capital", "--model.base.precision",
                                          "fp16"], ["model.base.precision", "fp16"], ["fp32", "--help"]))
    add(_c("senses_on_a_non_backpack", lambda d, a: [*TINY_FIT[:1], "--model", "SenseFinetune", *TINY_FIT[3:4],
                                                     "tiny-gpt2", *TINY_FIT[7:]],
           ["tiny-gpt2", "Backpack"], ["use a Backpack"]))

    # --- command line and settings ---------------------------------------------------------------------------------
    add(_c("negative_learning_rate", lambda d, a: [*TINY_FIT, "--model.optimizer.lr", "-1e-3"],
           ["model.optimizer.lr"], ["positive learning rate"]))

    def negative_lr_config(d: Path, a: Artifacts) -> list[str]:
        (d / "fit.yaml").write_text("model:\n  class_path: LoRAEditor\n  init_args:\n    optimizer:\n      lr: -0.01\n")
        return [TINY_FIT[0], "--config", "fit.yaml", *TINY_FIT[3:]]

    add(_c("negative_learning_rate_in_config", negative_lr_config, ["model.optimizer.lr"], ["positive learning rate"]))
    add(_c("lora_rank_zero", lambda d, a: [*TINY_FIT[:6], "0", *TINY_FIT[7:]], ["model.lora.rank=0"], [">= 1"]))
    def config(text: bytes):
        def make(d: Path, a: Artifacts) -> list[str]:
            (d / "fit.yaml").write_bytes(text)
            return [*TINY_FIT, "--config", "fit.yaml"]
        return make

    add(_c("config_not_utf8", config(b"trainer:\n  max_epochs: 1  # Cura\xe7ao\n"), ["fit.yaml", "line 2", "UTF-8"],
           utf8))
    add(_c("config_bad_yaml", config(b"trainer:\n  max_epochs: [1\n"), ["fit.yaml", "line", "not valid YAML"],
           ["fix the config file"]))
    add(_c("config_not_found", lambda d, a: [*TINY_FIT, "--config", "no-such.yaml"], ["no-such.yaml"],
           ["does not exist"]))
    add(_c("unknown_option", lambda d, a: [*TINY_FIT, "--trainer.max_epochz", "3"], ["--trainer.max_epochz"],
           ["--help"]))
    add(_c("not_an_integer", lambda d, a: [*TINY_FIT, "--trainer.max_epochs", "three"], ["trainer.max_epochs",
                                                                                           "three"], ["--help"]))
    add(_c("unknown_command", lambda d, a: ["evalute", "--tasks", "[country_capital]"], ["evalute"],
           ["did you mean 'evaluate'"]))
    add(_c("ball_eps_not_positive", lambda d, a: [*TINY_FIT, "--budget.balls", "[1e-3, 0.0]"], ["budget.balls"],
           ["0 < eps < 1"]))

    # --- checkpoints: fit --ckpt_path and backpack export ------------------------------------------------------------
    cases += _ckpt_cases("fit", lambda p: [*TINY_FIT, "--ckpt_path", p], ["--ckpt_path"])
    cases += _ckpt_cases("export", lambda p: ["backpack", "export", "--checkpoint", p, "--output_dir", "model"],
                         ["editing backpack distill"])
    add(_c("export_of_an_editing_checkpoint",
           lambda d, a: ["backpack", "export", "--checkpoint", str(_copy(a.checkpoint, d / "last.ckpt")),
                         "--output_dir", "model"],
           ["last.ckpt", "not a Backpack distillation checkpoint"], ["distillation run"], absent=("model",)))

    def corrupt_last(d: Path, a: Artifacts) -> list[str]:
        (d / "ckpt").mkdir()
        _truncate(_copy(a.checkpoint, d / "ckpt" / "last.ckpt"))
        return [*TINY_FIT, "--checkpoint.dirpath", "ckpt", "--trainer.logger", "false", "--ckpt_path", "last"]

    add(_c("fit_resume_from_corrupt_last", corrupt_last, ["last.ckpt", "truncated"], ["without --ckpt_path"]))

    def code_in_last(d: Path, a: Artifacts) -> list[str]:
        (d / "ckpt").mkdir()
        crafted_checkpoint(d / "ckpt" / "last.ckpt", d / "MARKER")
        # the trainer's own load (not the --ckpt_path pre-check), even when told weights_only=false
        return [*TINY_FIT, "--checkpoint.dirpath", "ckpt", "--trainer.logger", "false", "--ckpt_path", "last",
                "--weights_only", "false"]

    add(_c("fit_resume_last_with_code", code_in_last, ["last.ckpt", "code"], ["without --ckpt_path"],
           absent=("MARKER",)))

    def other_base(d: Path, a: Artifacts) -> list[str]:
        return [*TINY_FIT[:4], "tiny-llama", *TINY_FIT[5:], "--ckpt_path", str(_copy(a.checkpoint, d / "last.ckpt"))]

    add(_c("fit_resume_onto_another_base_model", other_base, ["tiny-gpt2", "tiny-llama"], ["same"]))

    # --- saved edits -------------------------------------------------------------------------------------------------
    def edit_case(change: Callable[[Path], object], source: str = "full_edit", base_of: str | None = None):
        """Copy an artifact edit, change it, apply it (``base_of``: take base_model.json from another edit)."""
        def make(d: Path, a: Artifacts) -> list[str]:
            folder = _copy(getattr(a, source), d / "edit")
            if base_of is not None:
                shutil.copy(getattr(a, base_of) / "base_model.json", folder / "base_model.json")
            change(folder)
            return [*TINY_APPLY, "--edit", "edit"]
        return make

    reexport = ["re-export"]
    add(_c("edit_scaled_1000x", edit_case(lambda f: _edit_tensors(f, _scale)),
           ["edit.safetensors", "do not match the hash"], reexport))
    add(_c("edit_with_nan", edit_case(lambda f: _edit_tensors(f, _nan, manifest=True)),
           ["edit.safetensors", "NaN"], ["rerun the fit"]))
    add(_c("edit_truncated", edit_case(lambda f: _truncate(f / "edit.safetensors")),
           ["edit.safetensors", "truncated"], reexport))
    add(_c("edit_wrong_shape", edit_case(lambda f: _edit_tensors(f, _wrong_shape, manifest=True)),
           ["edit.safetensors", "shape"], reexport))
    add(_c("edit_base_model_json_malformed",
           edit_case(lambda f: (f / "base_model.json").write_text('{"name": "tiny-gpt2", ')),
           ["base_model.json", "not valid JSON"], reexport))
    add(_c("edit_without_manifest", edit_case(lambda f: (f / "edit_manifest.json").unlink(missing_ok=True)),
           ["edit_manifest.json"], ["--allow_unverified true"]))
    add(_c("edit_adapter_rescaled", edit_case(lambda f: _set_json(f / "adapter_config.json", lora_alpha=8000.0),
                                              "lora_edit"), ["adapter_config.json", "changed"], reexport))
    add(_c("edit_adapter_of_a_backpack", edit_case(lambda f: None, "backpack_adapter", base_of="full_edit"),
           ["adapter_model.safetensors", "another model"], ["model it was trained on"]))
    add(_c("edit_adapter_of_a_llama", edit_case(lambda f: None, "llama_adapter", base_of="full_edit"),
           ["edit", "another model"], ["model it was trained on"]))
    add(_c("edit_folder_missing", lambda d, a: [*TINY_APPLY, "--edit", "no-such-edit"], ["no-such-edit"],
           ["pass an edit folder"]))
    add(_c("edit_folder_without_edit", edit_case(
        lambda f: [(f / n).unlink(missing_ok=True) for n in ("edit.safetensors", "edit_manifest.json")]),
           ["edit", "holds no edit"], ["edit.safetensors"]))
    add(_c("senses_inspect_of_a_lora_edit", lambda d, a: ["senses", "inspect", "--edit", str(a.lora_edit)],
           ["not a sense edit"], ["edits/ball_<eps>"]))

    # --- sweeps -----------------------------------------------------------------------------------------------------
    add(_c("storage_not_a_url", lambda d, a: ["sweep-status", "--study_name", "s", "--storage", "not a url"],
           ["--storage", "not a url"], ["sqlite:///"], max_seconds=60))
    add(_c("storage_unreachable", lambda d, a: [*SWEEP, "--storage", "postgresql+psycopg2://u:pw@127.0.0.1:9/db"],
           ["--storage", "127.0.0.1", "cannot connect"], ["check the host"], absent=("sweeps",), max_seconds=60))
    add(_c("storage_driver_missing", lambda d, a: ["select", "--study_name", "s", "--storage",
                                                   "mysql://u:pw@127.0.0.1/db"], ["--storage", "mysql"],
           ["install"], max_seconds=60))
    add(_c("storage_sqlite_file_missing", lambda d, a: ["select", "--study_name", "s", "--storage",
                                                        "sqlite:///no-such-dir/study.db"],
           ["no-such-dir/study.db", "does not exist"], ["check the path"], absent=("no-such-dir",)))
    add(_c("space_single_path_bad_yaml",
           lambda d, a: [*SWEEP, "--space", _space(d, b"parameters:\n  a.b: {uniform: [1, 2]\n")],
           ["space.yaml", "line", "not valid YAML"], ["fix the search space"], absent=("sweeps",)))
    add(_c("space_not_utf8", lambda d, a: [*SWEEP, "--space", _space(d, b"# Cura\xe7ao\nparameters: {}\n")],
           ["space.yaml", "line 1", "UTF-8"], utf8, absent=("sweeps",)))
    add(_c("space_bad_distribution", lambda d, a: [*SWEEP, "--space", _space(
        d, b"parameters:\n  model.init_args.optimizer.lr: {normal: [1, 2]}\n")],
        ["space.yaml", "model.init_args.optimizer.lr"], ["expected one of"], absent=("sweeps",)))
    add(_c("space_not_a_mapping", lambda d, a: [*SWEEP, "--space", _space(d, b"- just\n- a list\n")],
           ["space.yaml"], ["parameters:"], absent=("sweeps",)))
    add(_c("space_file_missing", lambda d, a: [*SWEEP, "--space", "no-such-space.yaml"], ["no-such-space.yaml"],
           ["write one"], absent=("sweeps",)))

    def unknown_study(command: str):
        def make(d: Path, a: Artifacts) -> list[str]:
            _study(d)
            return [command, "--study_name", "nosuch", "--root", "sweeps"]
        return make

    add(_c("select_unknown_study", unknown_study("select"), ["nosuch", "known"], ["editing sweep"],
           absent=("sweeps/nosuch",)))
    add(_c("sweep_status_unknown_study", unknown_study("sweep-status"), ["nosuch", "known"], ["editing sweep"],
           absent=("sweeps/nosuch",)))
    add(_c("select_without_any_sweep", lambda d, a: ["select", "--study_name", "nosuch", "--root", "sweeps"],
           ["nosuch"], ["editing sweep"], absent=("sweeps",)))
    add(_c("report_without_test_runs", lambda d, a: ["report", "--root", "sweeps"], ["no test runs"],
           ["editing test-runs"]))
    add(_c("test_runs_without_selection", lambda d, a: ["test-runs", "--root", "sweeps"], ["selection.json"],
           ["editing select"]))

    # --- issue 34 items 13 and 14: a copied edit combined with itself; a lone surrogate in data or a prompt ----------
    def same_edit_copied(d: Path, a: Artifacts) -> list[str]:
        _copy(a.full_edit, d / "edit")
        _copy(d / "edit", d / "edit_copy")  # what `cp -r edit edit_copy` makes: the same edit under another path
        return [*TINY_APPLY, "--edit", "edit", "--edit", "edit_copy"]

    add(_c("apply_an_edit_and_its_copy", same_edit_copied, ["edit", "edit_copy", "same edit"], ["give each edit once"],
           absent=("out",)))
    add(_c("jsonl_lone_surrogate", lambda d, a: [*TINY_VALIDATE, "--data.task", _task_yaml(
        d, data=GOOD_LINE + b'{"prefix": "The capital of \\ud800France is", "suffix": " Paris"}\n')],
        ["data-val.jsonl", "line 2", "'prefix'", "surrogate", "U+D800"], ["surrogate pair"]))

    def prompt_not_utf8(d: Path, a: Artifacts) -> list[str]:
        _copy(a.full_edit, d / "edit")
        # byte 0xe7 on the command line: Python hands it to the command as the lone surrogate U+DCE7
        return ["generate", "--edit", "edit", "--prompt", "fine", "--prompt", "Cura\udce7ao"]

    add(_c("generate_prompt_not_utf8", prompt_not_utf8, ["--prompt 2", "0xe7", "character 5"], ["UTF-8"]))

    # --- editing export (issue 36 item 3): an existing folder is kept, a run folder names its edits ------------------
    def export_over_a_folder(d: Path, a: Artifacts) -> list[str]:
        _copy(a.full_edit, d / "edit")
        (d / "shipped").mkdir()
        (d / "shipped" / "mine.txt").write_text("kept")
        return ["export", "--edit", "edit", "--merged", "shipped"]

    add(_c("export_into_an_existing_folder", export_over_a_folder, ["shipped", "already exists"],
           ["--overwrite true"]))
    add(_c("export_a_run_folder", lambda d, a: ["export", "--edit", str(a.lora_edit.parent.parent), "--merged", "out"],
           ["is a run folder", "ball_1e-03"], ["pass one of its edits"], absent=("out",)))

    # --- editing auto (issue 34 items 11 and 17) ------------------------------------------------------------------
    auto = ["auto", "--task", "country_capital", "--methods", "[lora]", "--trials", "1", "--model", "tiny-gpt2",
            "--output_dir", "out"]

    def interrupted_other_model(d: Path, a: Artifacts) -> list[str]:
        # the record an interrupted `editing auto --model tiny-llama` leaves; resumed with --model tiny-gpt2
        from editing.protocol.auto import PROGRESS_FILE, _search_settings

        settings = _search_settings("country_capital", ["lora"], "1e-03", "tiny-llama", 0.25, 1, None, None, None,
                                    "good", None, None, None, 0)
        (d / "out").mkdir()
        (d / "out" / PROGRESS_FILE).write_text(json.dumps({"settings": settings, "trials": []}))
        return auto

    add(_c("auto_resumed_with_other_settings", interrupted_other_model,
           ["out", "interrupted search", "--model", "tiny-llama", "tiny-gpt2"], ["--overwrite true", "same settings"],
           absent=("out/trial_0",), max_seconds=120))

    def finished_search(d: Path, a: Artifacts) -> list[str]:
        (d / "out").mkdir()
        (d / "out" / "auto.json").write_text("{}")
        return auto

    add(_c("auto_over_a_finished_search", finished_search, ["auto.json", "finished search"], ["--overwrite true"],
           absent=("out/trial_0",), max_seconds=120))

    def every_trial_fails(d: Path, a: Artifacts) -> list[str]:
        # the README's plain-examples form; each trial's fit refuses the misspelt option, so there is no edit
        (d / "facts.jsonl").write_text("".join(json.dumps({"prefix": f"Fact {i} is", "suffix": f" {i}"}) + "\n"
                                               for i in range(4)))
        return ["auto", "--task", "facts.jsonl", "--methods", "[lora]", "--trials", "1", "--model", "tiny-gpt2",
                "--args", "--trainer.max_epochz 3", "--output_dir", "out"]

    add(_c("auto_without_any_edit_exits_non_zero", every_trial_fails, ["no trial finished", "fit.log", "auto.json"],
           ["fix it and run the command again"]))

    # --- issue 34, items 9-12: runs that survive interruption -------------------------------------------------------
    # (the kills themselves, SIGTERM and Ctrl-C, and the resumes are in tests/core/test_interruption.py: a case here
    # runs one command and must end non-zero)
    def interrupted_evaluate(d: Path, a: Artifacts) -> list[str]:
        import socket

        # the claim an `editing evaluate --eval_limit 3` killed midway left (its process is of another boot: gone)
        settings = {"model": "tiny-gpt2", "precision": "fp32", "split": "val", "data_root": None, "eval_limit": 3,
                    "general_limit": 2, "max_tokens": 1024}
        (d / "out").mkdir()
        (d / "out" / "run.lock").write_text(json.dumps({
            "pid": 1, "host": socket.gethostname(), "boot_id": "another-boot", "started": "2026-01-01T00:00:00+00:00",
            "about": {"evaluate": settings}}))
        return ["evaluate", "--tasks", "[country_capital]", "--model", "tiny-gpt2", "--eval_limit", "2",
                "--general_limit", "2", "--output_dir", "out"]

    add(_c("evaluate_resumed_with_other_settings", interrupted_evaluate,
           ["out", "interrupted evaluate", "eval_limit: 3 there, 2 here"], ["--overwrite true", "same settings"],
           absent=("out/country_capital-val",), max_seconds=120))
    add(_c("sweep_whose_trials_all_fail",
           lambda d, a: ["sweep", "--task", "country_capital", "--method", "lora", "--model", "tiny-gpt2",
                         "--n_trials", "1", "--root", "sweeps", "--args",
                         "--data.eval_limit 2 --data.general_limit 2 --trainer.max_epochs 1 --budget.patience 0"],
           ["all 1 trials failed", "--budget.patience=0", "trial_0/fit.log"], ["give a number of epochs >= 1"]))
    # --- issue 34 items 6 and 7: a damaged or unwritable cache costs speed, never the run or a number -----------
    add(Case("p0_cache_entry_changed", _p0_entry_changed, ("p0 cache entry", "content hash"), (), succeeds=True,
             env={"EDITING_EVAL_CACHE_DIR": "evcache"}, check=_same_results_as_before))
    add(Case("evaluation_cache_unwritable", _blocked(TINY_FIT),
             ("could not write",), (), succeeds=True, env={"EDITING_EVAL_CACHE_DIR": "blocker/evaluation"},
             check=_has_results))
    add(Case("memit_caches_unwritable", _blocked(TINY_MEMIT_FIT),
             ("could not write",), (), succeeds=True,
             env={"EDITING_EVAL_CACHE_DIR": "blocker/evaluation", "EDITING_CACHE": "blocker/cache"},
             check=_has_results))
    return cases


TINY_MEMIT_FIT = ["fit", "--model", "MEMITEditor", "--model.base.name", "tiny-gpt2", "--model.memit.layers", "[1]",
                  "--model.memit.covariance_samples", "200", "--model.memit.steps", "2",
                  "--model.memit.context_templates", "1", "--data.task", "country_capital", "--data.eval_limit", "4",
                  "--data.general_limit", "4", "--data.max_examples", "2", "--trainer.enable_progress_bar", "false",
                  "--trainer.enable_model_summary", "false", "--budget.output_dir", "out"]


def _blocked(args: list[str]) -> Callable[[Path, Artifacts], list[str]]:
    """A case whose cache folders lie under ``blocker``, a file: nothing can be written there."""

    def make(folder: Path, artifacts: Artifacts) -> list[str]:
        (folder / "blocker").write_text("")
        return args

    return make


def _has_results(folder: Path) -> list[str]:
    return [] if (folder / "out" / "results.json").is_file() else ["no out/results.json"]


def _p0_entry_changed(folder: Path, artifacts: Artifacts) -> list[str]:
    """A first fit fills the case's evaluation cache; its p0 entry is then rewritten with its numbers x 0.9995 and
    its metadata kept (readable, of the right key): the second fit must recompute p0 and report the first's."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    first = [*TINY_FIT[:-1], "first"]
    proc = subprocess.run([sys.executable, "-m", "editing.cli", *first], cwd=folder,
                          env=command_env({"EDITING_EVAL_CACHE_DIR": "evcache"}), capture_output=True, text=True,
                          timeout=CASE_TIMEOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"the first fit of p0_cache_entry_changed failed:\n{proc.stderr[-2000:]}")
    (entry,) = (folder / "evcache" / "p0").glob("*.safetensors")
    with safe_open(str(entry), framework="pt") as handle:
        meta = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    save_file({k: v * 0.9995 if v.is_floating_point() else v for k, v in tensors.items()}, str(entry), metadata=meta)
    return TINY_FIT


def _same_results_as_before(folder: Path) -> list[str]:
    import json

    problems = _has_results(folder)
    if problems:
        return problems
    first, second = (json.loads((folder / run / "results.json").read_text()) for run in ("first", "out"))

    def numbers(record: dict) -> list:
        return [(e.get("epoch"), e.get("general_nll"), e.get("success_rate")) for e in record.get("epochs", [])]

    if not numbers(first):
        return ["results.json lists no epochs (the check reads results['epochs'])"]
    return [] if numbers(first) == numbers(second) else [f"epochs differ: {numbers(first)} vs {numbers(second)}"]


CASES: list[Case] = _cases()


# ---------------------------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------------------------
def _classify(case: Case, folder: Path, returncode: int | None, stderr: str, seconds: float,
              timed_out: bool) -> Outcome:
    if timed_out:
        return Outcome(case, "timeout", None, stderr, seconds, [f"no answer in {CASE_TIMEOUT}s"])
    if case.succeeds:
        if "Traceback (most recent call last)" in stderr:
            return Outcome(case, "traceback", returncode, stderr, seconds, ["a Python traceback on stderr"])
        problems = [f"exit {returncode}: the command did not survive it"] if returncode != 0 else []
        problems += [f"stderr lacks {f!r}" for f in case.expect if f not in stderr]
        problems += case.check(folder) if case.check is not None and returncode == 0 else []
        return Outcome(case, "failed" if problems else "correct", returncode, stderr, seconds, problems)
    if returncode == 0:
        return Outcome(case, "accepted", 0, stderr, seconds, ["exit 0: the bad input was accepted"])
    if "Traceback (most recent call last)" in stderr:
        return Outcome(case, "traceback", returncode, stderr, seconds, ["a Python traceback on stderr"])
    problems = [f"message lacks {f!r}" for f in case.expect if f not in stderr]
    if not any(f in stderr for f in case.fix):
        problems.append(f"message gives no fix (none of {list(case.fix)})")
    problems += [f"{p} was created" for p in case.absent if (folder / p).exists()]
    if case.max_seconds is not None and seconds > case.max_seconds:
        problems.append(f"took {seconds:.0f}s (more than {case.max_seconds:.0f}s)")
    return Outcome(case, "unclear" if problems else "clear", returncode, stderr, seconds, problems)


def _run_subprocess(case: Case, folder: Path, args: list[str]) -> tuple[int | None, str, bool]:
    try:
        proc = subprocess.run([sys.executable, "-m", "editing.cli", *args], cwd=folder, env=command_env(case.env),
                              capture_output=True, text=True, timeout=CASE_TIMEOUT)
    except subprocess.TimeoutExpired as err:
        stderr = err.stderr.decode(errors="replace") if isinstance(err.stderr, bytes) else (err.stderr or "")
        return None, stderr, True
    return proc.returncode, proc.stderr, False


def _child(args: list[str], folder: str, out: str, err: str) -> None:
    """A forked case: the ``editing`` command's ``main()`` as the interpreter would run it."""
    os.chdir(folder)
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.argv = ["editing", *args]
    code = 0
    try:
        from editing.cli import main

        main()
    except SystemExit as exit_:
        if isinstance(exit_.code, int) or exit_.code is None:
            code = exit_.code or 0
        else:  # SystemExit("message"): the interpreter prints it and exits 1
            print(exit_.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


PRELOAD = ["editing.cli", "editing.methods", "editing.data.datamodule", "editing.protocol.sweep", "editing.edits.load",
           "editing.models.backpack.distill", "peft", "optuna", "safetensors.torch",
           "transformers.models.gpt2.modeling_gpt2", "transformers.models.llama.modeling_llama"]
_START = threading.Lock()
_CONTEXT: list = []


def _fork_context():
    """The fork server, started once with the command's environment and heavy modules imported."""
    with _START:
        if not _CONTEXT:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(PRELOAD)
            saved = {k: os.environ.get(k) for k in COMMAND_ENV}
            os.environ.update(COMMAND_ENV)  # read at import time (e.g. HF_HUB_OFFLINE): set before the server starts
            try:
                warm = ctx.Process(target=os.getpid)
                warm.start()
                warm.join()
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
            _CONTEXT.append(ctx)
    return _CONTEXT[0]


def _run_forked(case: Case, folder: Path, args: list[str]) -> tuple[int | None, str, bool]:
    if case.env:
        return _run_subprocess(case, folder, args)  # the fork server's environment is fixed
    ctx = _fork_context()
    out, err = folder / ".stdout", folder / ".stderr"
    with _START:
        proc = ctx.Process(target=_child, args=(args, str(folder), str(out), str(err)))
        proc.start()
    proc.join(CASE_TIMEOUT)
    timed_out = proc.is_alive()
    if timed_out:
        proc.kill()
        proc.join()
    stderr = err.read_text(errors="replace") if err.is_file() else ""
    for path in (out, err):
        path.unlink(missing_ok=True)  # the case's folder holds only what the command wrote
    return proc.exitcode, stderr, timed_out


def prepare_case(case: Case, root: Path, artifacts: Artifacts) -> tuple[Path, list[str]]:
    """Make a fresh ``root/<name>`` folder holding the case's inputs; returns it and the case's arguments.

    Inputs are made in the calling thread: setups import packages (sqlalchemy, optuna) that fail when two threads
    import them at once.
    """
    folder = root / case.name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder, case.make(folder, artifacts)


def run_prepared(case: Case, folder: Path, args: list[str], mode: str = "subprocess") -> Outcome:
    """Run a prepared case and classify what happened (``mode``: ``subprocess``, i.e. ``python -m editing.cli``,
    or ``fork``, see the module docstring)."""
    start = time.time()
    run = _run_forked if mode == "fork" else _run_subprocess
    returncode, stderr, timed_out = run(case, folder, args)
    return _classify(case, folder, returncode, stderr, time.time() - start, timed_out)


def run_case(case: Case, root: Path, artifacts: Artifacts, mode: str = "subprocess") -> Outcome:
    """Run one case in ``root/<name>`` and classify what happened (see ``run_prepared``)."""
    folder, args = prepare_case(case, root, artifacts)
    return run_prepared(case, folder, args, mode)


def run_cases(root: Path, cases: Sequence[Case] | None = None, workers: int = 2, mode: str = "subprocess",
              progress: Callable[[Outcome], None] | None = None, artifacts: Artifacts | None = None) -> list[Outcome]:
    """Build the shared artifacts under ``root/artifacts`` (unless given) and run the cases, ``workers`` at a time.

    Returns:
        The outcomes, in the order of ``cases``.
    """
    cases = list(CASES if cases is None else cases)
    artifacts = artifacts or build_artifacts(root / "artifacts")

    prepared = [prepare_case(case, root / f"cases-{mode}", artifacts) for case in cases]

    def one(item: tuple[Case, tuple[Path, list[str]]]) -> Outcome:
        case, (folder, args) = item
        outcome = run_prepared(case, folder, args, mode)
        if progress is not None:
            progress(outcome)
        return outcome

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, zip(cases, prepared, strict=True)))
