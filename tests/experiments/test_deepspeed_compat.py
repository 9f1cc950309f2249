"""DeepSpeed's private APIs stay in experiments/train/deepspeed_compat.py, behind a version check that says what to do."""

import os
import re
from pathlib import Path

import pytest

from llamoe.experiments.train import deepspeed_compat
from llamoe.experiments.train.deepspeed_compat import SUPPORTED, DeepSpeedVersionError, check_version

ROOT = Path(__file__).resolve().parents[2]
COMPAT = ROOT / "experiments" / "train" / "deepspeed_compat.py"
PRIVATE = re.compile(r"\bgroups\._\w|_configure_distributed_model|\bdeepspeed(?:\.\w+)*\._\w")


def test_installed_deepspeed_is_supported_and_has_every_private_name() -> None:
    deepspeed_compat.check_installed()
    deepspeed_compat.check_private_api()


@pytest.mark.parametrize("version", ["0.17.6", "0.18.0", "0.19.8", "0.19.8+cpu", "0.19"])
def test_versions_in_the_tested_range_pass(version: str) -> None:
    check_version(version)


@pytest.mark.parametrize("version", ["0.16.9", "0.17.5", "0.17", "0.20.0", "0.20.0rc1", "1.0.0", "unknown"])
def test_version_outside_the_range_names_it_the_range_and_the_fix(version: str) -> None:
    with pytest.raises(DeepSpeedVersionError) as error:
        check_version(version)
    message = str(error.value)
    assert f"deepspeed {version} is installed" in message
    assert f"deepspeed{SUPPORTED}" in message
    assert f"pip install 'deepspeed{SUPPORTED}'" in message


def test_pyproject_pins_the_range_the_check_accepts() -> None:
    assert f'"deepspeed{SUPPORTED}"' in (ROOT / "pyproject.toml").read_text()


def _project_python_files() -> list[Path]:
    files = []
    for top, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("runs", "build", "dist", "__pycache__")]
        files += [Path(top) / n for n in names if n.endswith(".py")]
    return files


def test_no_deepspeed_private_name_outside_the_compat_module() -> None:
    files = _project_python_files()
    assert COMPAT in files and Path(__file__).resolve() in files
    assert PRIVATE.search(COMPAT.read_text())  # the pattern does find the private names where they are
    offenders = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in files
        if path not in (COMPAT, Path(__file__).resolve())
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if PRIVATE.search(line)
    ]
    assert not offenders, "DeepSpeed private API outside experiments/train/deepspeed_compat.py:\n" + "\n".join(
        offenders
    )
