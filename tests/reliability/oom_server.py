"""A server of the tiny Qwen (char tokenizer) in its own process, for the real out-of-memory test:
the test caps this process's address space (RLIMIT_AS, through prlimit) so that a long prompt's
step cannot get its memory while short ones can. Prints the server's URL, then serves until
killed.

A buffer of a few tens of MiB can come from memory this process already maps (freed by an
earlier step), out of the limit's reach; one of 64 MiB or more is a fresh mapping (the test
starts this with MALLOC_MMAP_THRESHOLD_ set so that glibc does not keep big blocks either). So the
reference attention's scratch bound is raised here: the 2048-token step then needs ~240 MiB of
buffers, a short step still ~0.4 MiB.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import threading

from pagedjax.kernels import reference
from pagedjax.entrypoints.server import add_arguments, build_server
from tests.conftest import TINY_QWEN, TinyModel, random_params
from tests.server.conftest import char_tokenizer, server_argv

LONG_ENGINE_ARGS = dict(max_model_len=2048, max_num_batched_tokens=2048,
                        num_gpu_blocks_override=160)


def main() -> None:
    reference.SCRATCH_BYTES = 512 << 20
    model = TinyModel(TINY_QWEN, random_params(TINY_QWEN, seed=0))
    model = dataclasses.replace(model, tokenizer=char_tokenizer(TINY_QWEN.vocab_size))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    uv, aengine = build_server(parser.parse_args(server_argv(**LONG_ENGINE_ARGS)), loaded=model)
    threading.Thread(target=uv.run, daemon=True).start()
    while not uv.started:
        threading.Event().wait(0.02)
    host, port = uv.servers[0].sockets[0].getsockname()[:2]
    print(f"http://{host}:{port}", flush=True)
    sys.stdin.read()  # until the test closes our stdin (or kills us)
    uv.should_exit = True
    aengine.shutdown()


if __name__ == "__main__":
    main()
