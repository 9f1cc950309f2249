"""The README's two commands are the project's contract with newcomers and CI; keep them honest."""

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
