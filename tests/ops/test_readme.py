"""Every code block of README.md runs, so the README cannot drift."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
CI = Path(__file__).resolve().parents[2] / ".ci" / "run"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), re.S)


@pytest.mark.parametrize("code", blocks("python"), ids=lambda c: c.splitlines()[1][:40])
def test_python_block_runs(code: str) -> None:
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})


def test_ci_runs_the_readme_test_command() -> None:
    sh = blocks("sh")
    test_cmd = next(b.strip() for b in sh if "pytest" in b)
    assert test_cmd in CI.read_text().splitlines()


def test_readme_names_the_demo() -> None:
    first = blocks("sh")[0].strip()
    assert shlex.split(first)[-2:] == ["walstate", "demo"]
