"""One contract for every registered editing method, parametrized over the registry itself (``METHODS``), so that a
method registered tomorrow is checked with no test edited.

What a method provides for it: ``lightning_configs/tiny/<method>.yaml``, a seconds-long ``editing fit`` config on a
tiny model naming the method's class (a method without one fails here, saying what to add). Per method, one tiny fit
runs in this process (module-scoped, ``fitted``) and the tests below read it:

- ``reference()`` computes the base model as freshly loaded (logits equal bit for bit), before and after the edit, and
  before the edit the model is p0 too;
- the fit changes only the deltas the method declares (``trainable_parameters()``): every other entry of the state
  dict is bit-identical, and the declared ones changed;
- the in-memory edit, exported and applied by ``load_edited``, computes the same logits, and its ``reference()`` is
  the base model;
- each saved ball edit, measured by ``editing apply``, gives the fit's numbers for that ball;
- a fit killed with kill -9 after its first epoch and resumed from ``last.ckpt`` ends with the uninterrupted fit's
  results, redoing no epoch (a closed-form method's one epoch is that first epoch);
- a type-invalid value of each of the method's own settings is refused by ``editing fit`` with a message naming the
  setting and no traceback;
- the fit's ``setup`` and its first step's task loss, regularization term and gradients run on the module's device,
  and so does the applied edit (the fake accelerator of ``tests/fake_device.py``: no floating-point operation left on
  the CPU, the CPU's numbers); and (``gpu``-marked, skipped without CUDA) the tiny fit on a GPU keeps every tensor
  there, gives the CPU fit's epoch 0 and an edit that loads there.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import signal
import subprocess
import sys
import time
import types
import typing
from pathlib import Path

import pytest
import torch
import yaml
from contract_callbacks import CAPTURED, probe_logits
from fake_device import FAKE, FakeDevice, on_fake_device

import editing.methods  # noqa: F401  (registers every method package)
from editing.cli import main
from editing.edits.load import load_edited
from editing.methods.registry import METHODS, method_spec
from editing.models.loading import ModelConfig, load_model

REPO = Path(__file__).resolve().parents[2]
TINY_DIR = REPO / "lightning_configs" / "tiny"
TESTS_DIR = REPO / "tests"
# the base model's own settings and the shared training settings are checked elsewhere (tests/commands)
SHARED_ARGUMENTS = {"self", "base", "optimizer", "regularization"}


def registered() -> list[str]:
    """The registered methods' names, sorted (what every contract test runs over)."""
    return sorted(m.value for m in METHODS)


def pytest_generate_tests(metafunc) -> None:
    if "method" in metafunc.fixturenames:
        names = registered()
        metafunc.parametrize("method", names, ids=names, scope="module")


# ---- what a method provides --------------------------------------------------------------------------------------
def tiny_config(method: str) -> tuple[Path, dict]:
    """The method's tiny fit config and its contents; fails, saying what to add, when the method has none."""
    path = TINY_DIR / f"{method}.yaml"
    cls = method_spec(method).module
    if not path.is_file():
        pytest.fail(f"method {method!r} has no tiny fit config: add lightning_configs/tiny/{method}.yaml, a "
                    f"seconds-long `editing fit` config on a tiny model (model.class_path: "
                    f"{cls.__module__}.{cls.__name__}, trainer.max_epochs 2 for a method that takes steps, "
                    f"budget.balls [0.5, 0.001]); copy lightning_configs/tiny/lora.yaml", pytrace=False)
    config = yaml.safe_load(path.read_text())
    named = str(config.get("model", {}).get("class_path", ""))
    if named.rsplit(".", 1)[-1] != cls.__name__:
        pytest.fail(f"{path.relative_to(REPO)}: model.class_path is {named!r}; the tiny fit of method {method!r} "
                    f"must name its class {cls.__module__}.{cls.__name__}", pytrace=False)
    return path, config


def fit_args(path: Path, out: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(path), "--budget.output_dir", str(out), *extra]


def callback_arg(class_name: str, **init_args) -> str:
    return "--trainer.callbacks+=" + json.dumps({"class_path": f"contract_callbacks.{class_name}",
                                                 "init_args": init_args})


def results_without_paths(run: Path) -> dict:
    """results.json without what differs between two equal runs (when, the command line, where the edits are)."""
    record = json.loads((run / "results.json").read_text())
    for key in ("created", "config", "edits"):
        record.pop(key)
    return record


def data_limits(config: dict) -> dict:
    data = config.get("data", {})
    return {"task": data.get("task", "country_capital"), "eval_limit": data.get("eval_limit"),
            "general_limit": data.get("general_limit")}


@pytest.fixture(scope="module")
def fitted(method, tmp_path_factory, data_root) -> dict:
    """One tiny fit of ``method`` in this process: its run folder, results, config, the fitted module and what the
    module computed before the edit."""
    path, config = tiny_config(method)
    work = tmp_path_factory.mktemp(f"contract-{method}")
    run = work / "run"
    cwd = os.getcwd()
    os.chdir(work)
    try:
        main(fit_args(path, run, callback_arg("Capture", key=method, task=data_limits(config)["task"])))
    finally:
        os.chdir(cwd)
    captured = CAPTURED.pop(method)
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "finished" and results["method"] == method
    return {"run": run, "results": results, "config": config, "path": path, "work": work, **captured}


def base_logits(module, probes) -> list[torch.Tensor]:
    """The probe logits of the base model loaded afresh with the module's base settings."""
    return probe_logits(load_model(ModelConfig(**dataclasses.asdict(module.base_config))).model, probes)


def assert_same(got: list[torch.Tensor], want: list[torch.Tensor], what: str) -> None:
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(a, b), f"{what}: probe {i} differs by up to {(a - b).abs().max().item():.3g}"


def assert_differs(got: list[torch.Tensor], want: list[torch.Tensor], what: str) -> None:
    assert any(not torch.equal(a, b) for a, b in zip(got, want, strict=True)), what


@pytest.fixture(scope="module")
def exported(fitted) -> Path:
    """The in-memory edit of the fit, exported (``export_edit``)."""
    return fitted["module"].export_edit(fitted["work"] / "exported")


# ---- the contract ------------------------------------------------------------------------------------------------
def test_method_ships_a_tiny_fit_config(method) -> None:
    tiny_config(method)


def test_reference_is_the_base_model_before_and_after_the_edit(fitted) -> None:
    module, probes = fitted["module"], fitted["probes"]
    base = base_logits(module, probes)
    assert_same(fitted["reference_before"], base, "reference() before the edit")
    assert_same(fitted["model_before"], base, "the model before the edit (p0)")
    with module.reference() as p0:
        assert_same(probe_logits(p0, probes), base, "reference() after the edit")
    assert_differs(probe_logits(module.model, probes), base, "the edit changed nothing on the probes")
    with module.reference() as p0:  # and the edit is back on once the context is left
        pass
    assert_differs(probe_logits(module.model, probes), base, "the edit stayed off after reference()")


def test_fit_changes_only_the_declared_deltas(fitted) -> None:
    module, before = fitted["module"], fitted["before"]
    after = module.state_dict()
    declared = set(module.trainable_parameters())
    assert declared, "the method declares no deltas (trainable_parameters() is empty)"
    assert set(after) == set(before), sorted(set(after) ^ set(before))[:5]
    undeclared = [k for k in after if k not in declared and not torch.equal(after[k].cpu(), before[k])]
    assert not undeclared, f"the fit changed state outside trainable_parameters(): {undeclared[:5]}"
    changed = [k for k in declared if after[k].shape != before[k].shape or not torch.equal(after[k].cpu(), before[k])]
    assert changed, f"none of the declared deltas changed ({sorted(declared)[:3]})"


def test_saved_edit_loads_to_the_in_memory_model(fitted, exported) -> None:
    module, probes = fitted["module"], fitted["probes"]
    applied = load_edited(exported)
    assert applied.edit_kind == method_spec(module.method).edit_kind
    # a closed-form edit may be applied as a merged weight (W + UV) where the module adds UV: equal to rounding
    for i, (a, b) in enumerate(zip(probe_logits(applied.model, probes), probe_logits(module.model, probes),
                                   strict=True)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=lambda m, i=i: f"probe {i}: {m}")
    with applied.reference() as p0:
        assert_same(probe_logits(p0, probes), base_logits(module, probes), "the loaded edit's reference()")


def test_saved_ball_edits_apply_to_the_fits_numbers(fitted, tmp_path) -> None:
    from editing.commands.apply import apply_edit

    results, limits = fitted["results"], data_limits(fitted["config"])
    assert results["edits"], "the fit saved no ball edit"
    seen = set()
    for key, folder in sorted(results["edits"].items()):
        ball = results["balls"][key]
        if ball["epoch"] in seen:  # the same epoch's edit: measured once
            continue
        seen.add(ball["epoch"])
        got = apply_edit(edit=folder, task=limits["task"], eval_limit=limits["eval_limit"],
                         general_limit=limits["general_limit"], output_dir=str(tmp_path / key))
        for name in ("success_rate", "general_nll", "targeted_nll", "hard_negative_nll"):
            want = ball["metrics"].get(name)
            if want is None:
                continue
            assert got[name] == pytest.approx(want, rel=1e-6, abs=1e-9), (key, name)
    assert max(seen) > 0, "every ball kept p0 (epoch 0): the apply check compared the base model with itself"


def test_kill_9_after_the_first_epoch_resumes_to_the_uninterrupted_results(fitted, tmp_path) -> None:
    marker, go = tmp_path / "paused", tmp_path / "go"
    run = tmp_path / "run"
    args = fit_args(fitted["path"], run)
    pause = callback_arg("PauseAfterFirstEpoch", marker=str(marker), go=str(go))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.Popen([sys.executable, "-m", "editing.cli", *args, pause], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 400
        while not marker.exists():
            assert proc.poll() is None, f"the fit ended before its first epoch: {proc.communicate()[1][-3000:]}"
            assert time.time() < deadline, "the fit never finished its first epoch"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        go.write_text("go")
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    finished = int(marker.read_text())
    assert not (run / "results.json").exists()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    again = subprocess.run([sys.executable, "-m", "editing.cli", *args, "--ckpt_path", "last"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    # resumed, not started over: no epoch finished before the kill is trained or evaluated again
    evaluated = [int(line.split()[1].split("/")[0]) for line in again.stdout.splitlines() if line.startswith("epoch ")]
    assert all(e > finished for e in evaluated), (finished, again.stdout[-3000:])
    assert results_without_paths(run) == results_without_paths(fitted["run"])


# ---- bad settings ------------------------------------------------------------------------------------------------
def _invalid_value(annotation) -> str | None:
    """A command-line value of the wrong type for ``annotation`` (None when every string is valid, e.g. ``str``)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        choices = [_invalid_value(a) for a in args if a is not type(None)]
        return next((c for c in choices if c is not None and c != "null"), None)
    if origin is typing.Literal:
        return "no-such-choice"
    if annotation is bool:
        return "maybe"
    if annotation is int:
        return "1.5"
    if annotation is float:
        return "not-a-number"
    if origin in (list, tuple) or annotation in (list, tuple):
        return "not-a-list"
    return None


def method_settings(method: str) -> list[tuple[str, str, str]]:
    """(option, field, type-invalid value) of each setting of the method's own: the fields of its registered config
    dataclass under the constructor argument that takes it, or its other constructor arguments."""
    spec = method_spec(method)
    hints = typing.get_type_hints(spec.module.__init__)
    settings = []
    for name in inspect.signature(spec.module.__init__).parameters:
        if name in SHARED_ARGUMENTS:
            continue
        hint = hints.get(name)
        group = spec.config is not None and spec.config in typing.get_args(hint) + (hint,)
        if group:
            field_hints = typing.get_type_hints(spec.config)
            for field in dataclasses.fields(spec.config):
                bad = _invalid_value(field_hints[field.name])
                if bad is not None:
                    settings.append((f"--model.{name}.{field.name}", field.name, bad))
        else:
            bad = _invalid_value(hint)
            if bad is not None:
                settings.append((f"--model.{name}", name, bad))
    return settings


def test_a_type_invalid_setting_is_refused_naming_it(method, tmp_path, capsys, monkeypatch) -> None:
    path, _ = tiny_config(method)
    settings = method_settings(method)
    if not settings:
        pytest.skip(f"method {method!r} has no setting of its own whose type a command-line value can break")
    monkeypatch.chdir(tmp_path)
    unclear = []
    for option, field, bad in settings:
        with pytest.raises(SystemExit) as info:
            main(fit_args(path, tmp_path / "run", option, bad))
        err = capsys.readouterr().err
        if info.value.code != 2 or field not in err or "Traceback" in err:
            unclear.append(f"{option} {bad}: exit {info.value.code}, {err.strip().splitlines()[-1:]}")
    assert not unclear, unclear
    assert not (tmp_path / "run").exists()


# ---- devices -----------------------------------------------------------------------------------------------------
def test_the_applied_edit_runs_on_the_modules_device(fitted, exported) -> None:
    probes = fitted["probes"]
    on_cpu = load_edited(exported)
    want = probe_logits(on_cpu.model, probes)
    with on_cpu.reference() as p0:
        want_p0 = probe_logits(p0, probes)
    applied = load_edited(exported)
    with FakeDevice() as device:
        # the module's own move (a Backpack carries its installed sense edit outside its submodules)
        applied.to(FAKE)
        got = probe_logits(applied.model, probes)
        with applied.reference() as p0:
            got_p0 = probe_logits(p0, probes)
    assert device.cpu_ops == [], device.cpu_ops[:5]
    assert all(on_fake_device(p) for p in applied.model.parameters())
    # fp32 forward passes: another device type may take another (equivalent) attention path, so equal to rounding
    for a, b in zip(got + got_p0, want + want_p0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_the_tiny_fit_runs_on_the_gpu(fitted, tmp_path, gpu_device, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    accelerator = "gpu" if gpu_device.type == "cuda" else "cpu"
    run = tmp_path / "run"
    key = f"gpu-{fitted['results']['method']}"
    main(fit_args(fitted["path"], run, "--trainer.accelerator", accelerator, callback_arg("DevicesSeen", key=key)))
    assert CAPTURED.pop(key)["devices"] == {gpu_device.type}
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "finished"
    assert [e["epoch"] for e in results["epochs"]] == [e["epoch"] for e in fitted["results"]["epochs"]]
    # epoch 0 is the base model: the GPU's evaluation equals the CPU's
    cpu = fitted["results"]["epochs"][0]
    assert results["epochs"][0]["general_nll"] == pytest.approx(cpu["general_nll"], rel=1e-5)
    assert results["epochs"][0]["success_rate"] == cpu["success_rate"]
    applied = load_edited(next(iter(results["edits"].values())))
    applied.model.to(gpu_device)
    logits = probe_logits(applied.model, fitted["probes"])
    assert all(torch.isfinite(t).all() for t in logits)


def fresh_module(config: dict):
    """The method's module as the tiny config builds it, before any fit (jsonargparse, as ``editing fit`` does)."""
    from jsonargparse import ArgumentParser
    from lightning import LightningModule

    torch.manual_seed(int(config.get("seed_everything", 0)))  # random delta initialisations (LoRA's A) match
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--model", type=LightningModule)
    return parser.instantiate_classes(parser.parse_object({"model": config["model"]})).model


def _setup_and_training_loss(module, device_run: bool) -> dict[str, torch.Tensor]:
    """What a fit computes before and in its first step, outside Lightning: ``setup("fit")`` (a Trainer whose
    strategy puts the module on the fake device, or on the CPU), the task loss of one canonical batch, the
    regularization term, and their gradients."""
    from types import SimpleNamespace

    from editing.data.datamodule import TaskDataModule
    from editing.evaluation.scorer import example_nll
    from editing.rules.losses import training_loss

    dm = TaskDataModule(task="country_capital", eval_limit=4, general_limit=5)
    dm.attach(module.tokenizer, module.max_length)
    dm.setup("fit")
    root = FAKE if device_run else torch.device("cpu")
    module.trainer = SimpleNamespace(datamodule=dm, strategy=SimpleNamespace(root_device=root), world_size=1,
                                     global_step=0, accumulate_grad_batches=1)
    module.setup("fit")
    module.on_train_batch_start({}, 0)
    batch = module._to_device(next(iter(dm.train_dataloader())))
    sums, counts = example_nll(module.model, batch)
    out = {"task_loss": training_loss(sums / counts.clamp(min=1), module.task.loss).mean().float()}
    if module.reg_config.kind == "kl":
        out["regularization"] = module.regularization_loss().float()
    params = module.trainable_parameters()
    if any(p.requires_grad for p in params.values()):
        sum(out.values()).backward()
        out.update({f"grad {n}": p.grad for n, p in params.items() if p.grad is not None})
    return {k: v.detach().cpu() if on_fake_device(v) else v.detach() for k, v in out.items()}


def test_setup_and_the_first_steps_loss_run_on_the_modules_device(method, data_root, tmp_path, monkeypatch) -> None:
    _, config = tiny_config(method)
    monkeypatch.setenv("EDITING_CACHE", str(tmp_path / "cache"))  # a cached background would skip the computation
    module = fresh_module(config)
    module.trainer = None
    from fake_device import to_fake_device

    to_fake_device(module)  # where Lightning's strategy moves a module before the fit (setup runs before the move)
    with FakeDevice() as device:
        got = _setup_and_training_loss(module, device_run=True)
    assert device.cpu_ops == [], device.cpu_ops[:5]
    monkeypatch.setenv("EDITING_CACHE", str(tmp_path / "cpu-cache"))
    want = _setup_and_training_loss(fresh_module(config), device_run=False)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
