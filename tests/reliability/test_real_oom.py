"""A step that really runs out of memory (an XLA allocation refused by the operating system, not
an injected exception) fails only its request, with a clear error; the server then serves ten
ordinary requests exactly as before the failure, under the same memory limit, and /health is 200."""
from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import time

import httpx
import pytest

from tests.reliability.conftest import FIGURES
from tests.server.conftest import API_KEY, MODEL

HEADROOM = 32 << 20  # a short step takes ~0.4 MiB of buffers, the 2048-token one ~240 MiB


def vm_size(pid: int) -> int:
    status = open(f"/proc/{pid}/status").read()
    return int(re.search(r"VmSize:\s+(\d+) kB", status).group(1)) << 10


@pytest.fixture
def oom_server():
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "tests.reliability.oom_server"], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), f"the server did not start ({url!r})"
        yield proc, url
    finally:
        proc.kill()
        proc.wait(30)


def complete(http: httpx.Client, prompt: str, max_tokens: int = 8):
    r = http.post("/v1/completions", json=dict(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                               temperature=0, ignore_eos=True))
    return r.status_code, r.json()


def test_a_real_out_of_memory_step_fails_its_request_and_the_server_recovers(oom_server):
    proc, url = oom_server
    long_prompt = "x" * 2000  # one 2048-token step
    prompts = [f"ordinary {i}: " + "abc" * i for i in range(10)]
    with httpx.Client(base_url=url, timeout=120,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        status, _ = complete(http, long_prompt, 1)  # compiled and run once without a limit
        assert status == 200
        fresh = [complete(http, p) for p in prompts]
        assert all(s == 200 for s, _ in fresh), fresh
        soft, hard = resource.prlimit(proc.pid, resource.RLIMIT_AS)
        resource.prlimit(proc.pid, resource.RLIMIT_AS, (vm_size(proc.pid) + HEADROOM, hard))
        status, body = complete(http, long_prompt, 1)
        assert status == 500, body
        error = body["error"]
        assert error["code"] == "engine_step_failed", error
        assert "Out of memory" in error["message"] or "RESOURCE_EXHAUSTED" in error["message"]
        assert "--gpu-memory-utilization" in error["message"], "the error says what to change"
        again = [complete(http, p) for p in prompts]  # still under the limit
        for (s, want), (s2, got) in zip(fresh, again):
            assert s2 == 200, got
            assert got["choices"][0]["text"] == want["choices"][0]["text"]
        deadline = time.monotonic() + 10
        while (health := http.get("/health").status_code) != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health == 200
        resource.prlimit(proc.pid, resource.RLIMIT_AS, (soft, hard))
    FIGURES.append("real out-of-memory step (server, RLIMIT_AS): its request 500 with the flags "
                   "to change; 10 ordinary requests then identical to before; /health 200")
