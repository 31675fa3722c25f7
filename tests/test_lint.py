"""The repository passes its linter (ruff with pyproject.toml's rules: syntax errors and pyflakes'
checks). An undefined name in a rarely run script, or a test silently replaced by a later one of
the same name, fails here instead of on the GPU machine or never."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    from ruff import find_ruff_bin  # the test extra installs it

    r = subprocess.run([find_ruff_bin(), "check", "--no-cache", "--output-format", "concise", str(ROOT)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, f"ruff check found problems:\n{r.stdout}{r.stderr}"


def test_ruff_reports_an_undefined_name(tmp_path):
    # The rules are on: the same command fails on a file with the mistake it exists to catch.
    from ruff import find_ruff_bin

    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    return undefined_name\n")
    r = subprocess.run([find_ruff_bin(), "check", "--no-cache", "--config", str(ROOT / "pyproject.toml"), str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "F821" in r.stdout, r.stdout + r.stderr
