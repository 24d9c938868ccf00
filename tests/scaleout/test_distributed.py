"""Two processes on 127.0.0.1 (jax.distributed, Gloo CPU collectives, 2 CPU devices each) run one
tensor-parallel-4 engine between them and generate what one process generates."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.scaleout.test_tensor_parallel import run

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 150


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_generate_what_one_does():
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.scaleout.two_process_worker",
                               str(port), str(i), "4"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    results = [json.loads(next(line for line in log.splitlines()
                               if line.startswith("RESULT "))[7:]) for log in logs]
    _, one = run("tiny_qwen", 1)
    assert results[0] == results[1] == [o["token_ids"] for o in one]
