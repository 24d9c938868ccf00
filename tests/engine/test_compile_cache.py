"""The persistent compilation cache: a first engine stores its programs, a second process with the
same directory loads them instead of compiling (the counts come from JAX's own cache events)."""
from __future__ import annotations

import json
import subprocess
import sys

from pathlib import Path

import pytest

from pagedjax.config import EngineArgs

ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import json, sys
from pagedjax import LLM
from pagedjax.worker import compile_cache
from tests.conftest import TINY_QWEN, TinyModel, random_params
llm = LLM(loaded=TinyModel(TINY_QWEN, random_params(TINY_QWEN, seed=0)), precompile=True, compilation_cache=True,
          compilation_cache_dir=sys.argv[1], max_model_len=64, max_num_seqs=2, max_num_batched_tokens=16,
          kv_cache_memory_bytes=1 << 20)
print(json.dumps(compile_cache.counts()))
"""


def _start(cache_dir) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", CHILD, str(cache_dir)], capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return tuple(json.loads(out.stdout.strip().splitlines()[-1]))


def test_a_second_start_loads_what_the_first_compiled(tmp_path):
    hits, stored = _start(tmp_path)
    assert stored > 0  # (a program compiled twice in one run is a hit the second time)
    assert len(list(tmp_path.iterdir())) >= stored
    hits2, stored2 = _start(tmp_path)
    assert hits2 >= stored and stored2 == 0


def test_a_directory_that_cannot_be_made_is_refused(tmp_path):
    from pagedjax.worker import compile_cache

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="--compilation-cache-dir"):
        compile_cache.setup(True, str(blocker / "sub"))
    assert compile_cache.setup(None, str(tmp_path)) is None  # the CPU: off unless asked
    assert EngineArgs().compilation_cache is None
