"""The README's megatron-core examples run as written (the HybridModel one continues the GPTModel one)."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_gpt_example_runs_in_under_20_lines():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "GPTModel(" in b)
    assert len([line for line in example.splitlines() if line.strip()]) < 20
    hybrid = next(b for b in blocks if "HybridModel(" in b)
    code = example + hybrid + "\nprint(sum(isinstance(m, GranularMoELayer) for m in model.modules()))\n"
    code = "from granular_moe import GranularMoELayer\n" + code
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == "1"  # the hybrid model's one MoE layer is granular
