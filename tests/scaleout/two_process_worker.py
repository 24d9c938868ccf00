"""One of the processes of the two-process tensor-parallel test (tests/scaleout/test_distributed.py).

python -m tests.scaleout.two_process_worker PORT PROCESS_ID TP: joins a 2-process jax.distributed
cluster on 127.0.0.1:PORT (this process's CPU devices come from XLA_FLAGS), generates the test's
prompts at tensor parallel TP, and prints the token ids as one JSON line.
"""
import json
import sys

from pagedjax.worker.distributed import initialize


def main(port: int, process_id: int, tp: int) -> None:
    initialize(f"127.0.0.1:{port}", 2, process_id, timeout_s=60)
    from tests.scaleout.common import generate_tp, tiny

    _, outs = generate_tp(tiny("tiny_qwen"), tp)
    print("RESULT " + json.dumps([o["token_ids"] for o in outs]), flush=True)


if __name__ == "__main__":
    main(*map(int, sys.argv[1:4]))
