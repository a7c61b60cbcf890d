"""The README's megatron-core example runs as written."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_gpt_example_runs_in_under_20_lines():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "GPTModel(" in b)
    assert len([line for line in example.splitlines() if line.strip()]) < 20
    result = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
