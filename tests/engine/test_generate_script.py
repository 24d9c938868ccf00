"""The main job, run exactly as a user runs it."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "What is the capital of France?"


def generate(*argv: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/generate.py", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_generate_script_answers_paris_quietly():
    out = generate(PROMPT, "--max-tokens", "24")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Paris" in out.stdout, out.stdout
    # no INFO noise: not JAX's backend probing, not the engine's start-up lines
    assert "INFO" not in out.stderr and "Unable to initialize backend" not in out.stderr, (
        out.stderr[-3000:])


def test_generate_script_samples_with_logprobs_and_stop():
    out = generate(PROMPT, "-v", "--n", "2", "--temperature", "0.8", "--logprobs", "1",
                   "--stop", ".", "--max-tokens", "8")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[sample 1/2]" in out.stdout and "[sample 2/2]" in out.stdout, out.stdout
    # one line per token: the token, its logprob, the top alternative
    assert re.search(r"^  '.*' +-?\d+\.\d{3}", out.stdout, re.M), out.stdout
    assert "." not in "".join(line for line in out.stdout.splitlines()
                              if not line.startswith(("  ", "[")))  # cut at the stop string
    # -v: the engine's capacity lines, without "GPU" on a CPU
    assert "KV cache size:" in out.stderr and "Maximum concurrency" in out.stderr
    assert "GPU KV cache" not in out.stderr


def test_generate_script_beam_search_prints_scores():
    out = generate(PROMPT, "--beam-width", "2", "--max-tokens", "6")
    assert out.returncode == 0, out.stderr[-3000:]
    heads = re.findall(r"^\[beam (\d)/2\] score (-?\d+\.\d+), logprob (-?\d+\.\d+)$", out.stdout,
                       re.M)
    assert [h[0] for h in heads] == ["1", "2"], out.stdout
    assert float(heads[0][1]) >= float(heads[1][1])  # best first


@pytest.mark.parametrize("argv, says", [
    (["--top-p", "2"], "--top-p must be in (0, 1], got 2.0"),
    (["--n", "0"], "--n must be an integer >= 1"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--logprobs", "50"], "--logprobs 50 exceeds the maximum 20"),
    (["--beam-width", "11"], "--beam-width must be an integer in [1, 10]"),
    (["--beam-width", "2", "--temperature", "0.5", "--stop", "x"],
     "cannot honour --temperature, --stop"),
    (["--block-size", "7"], "--block-size 7 must be one of"),
    (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization 1.5 must be in (0, 1]"),
])
def test_bad_flags_fail_before_the_model_loads(argv, says):
    out = generate("hi", *argv, timeout=60)
    assert out.returncode == 2 and says in out.stderr, out.stderr[-3000:]
    assert "Dequantising" not in out.stderr  # the model was never loaded
