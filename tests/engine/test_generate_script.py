"""The main job, run exactly as a user runs it."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generate_script_answers_paris():
    out = subprocess.run([sys.executable, "scripts/generate.py", "What is the capital of France?",
                          "--max-tokens", "24"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Paris" in out.stdout, out.stdout
    assert "GPU KV cache size:" in out.stderr and "Maximum concurrency" in out.stderr


def test_generate_script_bad_flag_says_what_to_change():
    out = subprocess.run([sys.executable, "scripts/generate.py", "hi", "--block-size", "7"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "--block-size 7 must be one of" in out.stderr
