#!/usr/bin/env python
"""The main job: ``python scripts/generate.py "What is the capital of France?"``.

Same as ``pagedjax generate``; see ``--help`` for the engine flags (vLLM's names)."""
import sys

from pagedjax.entrypoints.cli import main

if __name__ == "__main__":
    main(["generate", *sys.argv[1:]])
