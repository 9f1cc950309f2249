"""llamoe installed from its wheel into a fresh venv, beside llama-models (which ships a top-level `models`)
and a user's own top-level `models` package: a training step runs and neither `models` is touched.

The wheel is built from a copy of the tracked files (no build/ in the checkout). The fresh venv sees this
environment's site-packages through a plain path entry (torch, deepspeed, llama-models... without
running its .pth files, so the editable llamoe of this checkout stays invisible there).
"""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
USER_MODELS = 'NAME = "the user\'s own models package"\n'


def _run(cmd: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the fresh venv's python, the wheel it was installed from)."""
    tmp = tmp_path_factory.mktemp("fresh_install")
    src = tmp / "src"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    for rel in filter(None, tracked.stdout.split("\0")):
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    wheels = tmp / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(wheels), str(src)], tmp)
    (wheel,) = wheels.glob("llamoe-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp)
    python = venv / "bin" / "python"
    purelib = Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp).stdout.strip()
    )
    (purelib / "outer.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run([*pip, "install", "--no-deps", "--no-index", "--target", str(purelib), str(wheel)], tmp)
    return python, wheel


def test_the_wheel_installs_one_top_level_package(fresh_venv: tuple[Path, Path]) -> None:
    _, wheel = fresh_venv
    with zipfile.ZipFile(wheel) as z:
        tops = {name.split("/")[0] for name in z.namelist() if not name.split("/")[0].endswith(".dist-info")}
        entry = next(n for n in z.namelist() if n.endswith("entry_points.txt"))
        scripts = z.read(entry).decode()
        configs = [n for n in z.namelist() if n.startswith("llamoe/experiments/configs/") and n.endswith(".yaml")]
    assert tops == {"llamoe"}
    assert "llamoe = llamoe.experiments.cli:main" in scripts
    assert "llamoe/experiments/configs/base.yaml" in configs and len(configs) > 5  # base, quickstart, ablations


@pytest.mark.slow
def test_a_training_step_beside_llama_models_and_a_user_models_package(
    fresh_venv: tuple[Path, Path], tmp_path: Path
) -> None:
    python, _ = fresh_venv
    project = tmp_path / "project"  # a user's project: its own top-level `models`, first on sys.path
    (project / "models").mkdir(parents=True)
    (project / "models" / "__init__.py").write_text(USER_MODELS)
    (project / "corpus.txt").write_text("def f(x):\n    return x + 1\n" * 400)
    script = f"""
import importlib.util, sys
import models
assert models.NAME == "the user's own models package", models.__file__
spec = importlib.util.find_spec("llama_models")
assert spec is not None, "llama-models (the dev extra) is not installed"
import llamoe.experiments.commands.plan  # the import that broke beside a top-level `models`
from llamoe.experiments.cli import main
import llamoe
assert "site-packages" in llamoe.__path__[0] and {str(ROOT)!r} not in llamoe.__path__[0], llamoe.__path__
status = main(["train", "/dev/null", "model=llama3.1-tiny", "train.max_steps=1", "train.batch_size=2",
               "train.seq_len=32", "train.log_every=1", "data.source=corpus.txt", "data.cache_dir=cache",
               "run_dir=run"])
assert status == 0, status
assert sys.modules["models"].NAME == "the user's own models package"
stray = sorted(m for m in sys.modules if m.split(".")[0] in ("attention", "moe", "experiments", "config_error"))
assert not stray, stray
print("ok")
"""
    done = _run([str(python), "-c", script], project)
    assert done.stdout.strip().endswith("ok")
    assert (project / "run" / "checkpoints" / "latest").exists()


@pytest.mark.slow
def test_the_module_command_beside_llama_models(fresh_venv: tuple[Path, Path], tmp_path: Path) -> None:
    """`python -m llamoe.experiments.cli`, where the top-level `models` on the path is llama-models'."""
    python, _ = fresh_venv
    check = "import models, sys; print(models.__file__)"
    owner = _run([str(python), "-c", check], tmp_path).stdout.strip()
    assert "site-packages" in owner and Path(owner).parent != ROOT / "models"  # llama-models' package, not ours
    done = _run(
        [str(python), "-m", "llamoe.experiments.cli", "plan", "llama4-scout", "--gpus", "16", "--json"], tmp_path
    )
    assert '"fits"' in done.stdout
