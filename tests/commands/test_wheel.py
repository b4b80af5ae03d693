"""The package installed from its wheel (issue 36, item 1): built offline, installed without its dependencies into a
temporary venv that reads torch and the rest from this project's ``.venv``, and run from a folder outside the
checkout. The commands and the API must read the very configs the checkout ships, never class defaults."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml
from conftest import REPO_DIR, SHARED_DATA

pytestmark = pytest.mark.slow

SOURCES = ("setup.py", "setup.cfg", "pyproject.toml", "README.md", "editing", "callbacks", "lightning_configs")


def _run(args: list[str], cwd: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """The wheel built from a copy of the checkout (so concurrent runs share no build folder) and installed into a
    fresh venv; returns its interpreter, console script, a working folder outside the checkout and the env."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    for name in SOURCES:
        src = REPO_DIR / name
        if not src.exists():
            continue
        if src.is_dir():
            shutil.copytree(src, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(src, source / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", OMP_NUM_THREADS="1",
               EDITING_DATA_ROOT=str(SHARED_DATA), EDITING_CACHE=str(root / "cache"), HF_HUB_OFFLINE="1")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(root / "dist"), str(source)], root, env)
    wheel = next((root / "dist").glob("canonical_editing-*.whl"))
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], root, env)
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root,
                     env).stdout.strip())
    # a venv made from a venv sees the base interpreter's packages, not .venv's: a path line (not a site dir, so the
    # checkout's editable-install hook in .venv stays off) hands it torch, transformers and pip from .venv
    (site / "from_project_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q", str(wheel)],
         root, env)
    work = root / "elsewhere"
    work.mkdir()
    return {"python": python, "editing": venv / "bin" / "editing", "venv": venv, "work": work, "env": env,
            "wheel": wheel}


def test_the_installed_package_is_the_wheels_and_finds_its_configs(installed):
    probe = ("import json, editing, editing.core.paths as p; "
             "print(json.dumps({'file': editing.__file__, 'configs': str(p.configs_dir())}))")
    out = json.loads(_run([str(installed["python"]), "-c", probe], installed["work"], installed["env"]).stdout)
    venv = installed["venv"].resolve()
    assert Path(out["file"]).resolve().is_relative_to(venv), f"editing imported from {out['file']}, not the wheel"
    # every module of the checkout is in the wheel (setup.cfg's `find:` once left editing/runs/ out)
    installed_package = Path(out["file"]).parent
    modules = sorted(p.relative_to(REPO_DIR / "editing") for p in (REPO_DIR / "editing").rglob("*.py"))
    assert [m for m in modules if not (installed_package / m).is_file()] == []
    configs = Path(out["configs"]).resolve()
    assert configs.is_relative_to(venv) and configs.name == "lightning_configs"
    shipped = sorted(p.relative_to(REPO_DIR / "lightning_configs") for p in (REPO_DIR / "lightning_configs").rglob("*")
                     if p.is_file() and p.suffix in (".yaml", ".md"))
    assert shipped and sorted(p.relative_to(configs) for p in configs.rglob("*") if p.is_file()) == shipped
    for rel in shipped:
        assert (configs / rel).read_bytes() == (REPO_DIR / "lightning_configs" / rel).read_bytes(), rel


def test_help_from_the_wheel(installed):
    proc = _run([str(installed["editing"]), "--help"], installed["work"], installed["env"])
    assert "commands:" in proc.stdout and "fit " in proc.stdout


def test_tiny_fit_with_a_shipped_preset_from_another_folder(installed):
    # written as the README writes it: the relative path is read from the installed configs
    _run([str(installed["editing"]), "fit", "--config", "lightning_configs/tiny/fit_memit_tiny_gpt2.yaml"],
         installed["work"], installed["env"])
    # the preset's logger folder, under the current folder
    results = json.loads((installed["work"] / "runs/tiny/memit_fit/version_0/results.json").read_text())
    preset = yaml.safe_load((REPO_DIR / "lightning_configs/tiny/fit_memit_tiny_gpt2.yaml").read_text())
    assert results["hyperparameters"]["memit"]["layers"] == preset["model"]["init_args"]["memit"]["layers"]
    assert results["method"] == "memit" and len(results["epochs"]) == 2  # p0 and the edit's one epoch


def test_edit_reads_the_shipped_fit_config(installed):
    script = f"""
import json
from editing.api import edit
result = edit("tiny-llama", [{{"prefix": "The capital of Peru is", "suffix": " Lima"}}], method="lora", ball=0.5,
              epochs=1, output_dir={str(installed["work"] / "api_run")!r},
              settings={{"data.general_limit": 4, "trainer.accumulate_grad_batches": 1}})
print(json.dumps(result.run.hyperparameters))
"""
    proc = _run([str(installed["python"]), "-c", script], installed["work"], installed["env"])
    hparams = json.loads(proc.stdout.strip().splitlines()[-1])
    config = yaml.safe_load((REPO_DIR / "lightning_configs/fit/lora.yaml").read_text())["model"]["init_args"]
    # the config's learning rate and rank, not LoRAEditor's class defaults
    assert hparams["optimizer"]["lr"] == config["optimizer"]["lr"]
    assert hparams["lora"]["rank"] == config["lora"]["rank"]
