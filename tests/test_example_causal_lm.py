"""The causal-LM example (examples/causal_lm_lora.py) runs end to end in --quick mode."""
from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_causal_lm_lora_quick(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "causal_lm_lora.py"), "--quick",
                           "--out", str(tmp_path)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    line = re.search(r"top-10 flagged: (\d+)/10 corrupted; AUROC ([\d.]+|nan), AP ([\d.]+|nan)", output)
    assert line, output[-4000:]
    assert 0 <= int(line.group(1)) <= 10
    assert "Top 10 most harmful samples" in output  # the callback's summary (verbose=True)
    assert re.search(r"reverse [a-p]+= -> [a-p]+", output)  # describe= decoded the samples
