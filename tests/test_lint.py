"""The Python sources pass ruff with the repository's .ruff.toml (pyflakes, pycodestyle, bugbear, 120 columns)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# the dev extra's ruff puts it next to the interpreter
RUFF = shutil.which("ruff", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


@pytest.mark.skipif(RUFF is None, reason="ruff is not installed (pip install -e '.[dev]' brings it)")
def test_python_sources_are_ruff_clean():
    result = subprocess.run([RUFF, "check", "--no-cache", "."], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
