"""The README's two commands are the project's contract with newcomers and CI; keep them honest."""

import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [line.strip() for line in re.findall(r"```bash\n(.*?)```", text, flags=re.S)[:2]]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    main_job, tests = _readme_commands()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert tests in ci_lines
    assert "pytest" in tests and "torch==2.13.0" in tests
    assert "ruff check ." in tests and "ruff format --check ." in tests  # the tree stays lint- and format-clean


def test_main_job_is_the_quickstart_ablation() -> None:
    main_job, _ = _readme_commands()
    assert main_job.endswith("llamoe ablate quickstart")
    assert "torch==2.13.0" in main_job


def _resolve(dotted: str) -> object:
    """The object a dotted name in the README names: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for k in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:k]))
        except ModuleNotFoundError:
            continue
        for attr in parts[k:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def test_every_llamoe_name_the_readme_mentions_exists() -> None:
    names = set(
        re.findall(
            r"\bllamoe\.(?:models|moe|attention|experiments|config_error)(?:\.[A-Za-z_][A-Za-z_0-9]*)*",
            (ROOT / "README.md").read_text(),
        )
    )
    assert "llamoe.models.presets.get" in names  # the pattern finds them
    missing = []
    for name in sorted(names):
        try:
            _resolve(name)
        except (ModuleNotFoundError, AttributeError) as e:
            missing.append(f"{name}: {e}")
    assert not missing, missing


def test_every_python_block_of_the_readme_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
