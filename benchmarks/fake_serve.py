"""``python -m benchmarks.fake_serve <pagedjax serve flags> [--fake-weight-ms ...]``: ``pagedjax
serve`` with its device step modelled (benchmarks/modelled_device.py). Benchmark-only: the serve
scenario starts it for ``--fake-device``.

The server is built and run by ``pagedjax.entrypoints.server.run``, so the real engine,
scheduler, engine thread, FastAPI app, SSE streaming and detokeniser all run; only the device step
is replaced, through the engine's fake-device seam. ``--model`` is a config (``--load-format
dummy``: no weights are made, the host side does not read them) and ``--tokenizer`` is required:
without one the server has no text to stream until a request ends, and detokenisation is part of
what is measured.
"""
from __future__ import annotations

import argparse
import logging

from benchmarks import modelled_device

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    from pagedjax.config import EngineArgs
    from pagedjax.entrypoints import cli, server

    parser = argparse.ArgumentParser(prog="python -m benchmarks.fake_serve",
                                     description=__doc__.splitlines()[0])
    server.add_arguments(parser)
    modelled_device.add_arguments(parser)
    args = parser.parse_args(argv)
    cli.setup_logging(True)
    try:
        model = modelled_device.StepModel.from_args(args)
        if args.load_format != "dummy" or args.model is None:
            raise ValueError("give --model CONFIG --load-format dummy: the modelled device "
                             "needs the model's shape only")
        if args.tokenizer is None:
            raise ValueError("give --tokenizer DIR: without one nothing streams until a request "
                             "ends (the serve scenario makes a synthetic one)")
        EngineArgs.from_namespace(args)  # every engine flag checked before anything is built
        loaded = _shape_only(args)
    except ValueError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    device = modelled_device.ModelledDevice(model, loaded.cfg.vocab_size, seed=args.seed)
    logger.info("modelled device: a step takes max(%.2f ms, %.2f us x tokens) + %.2f us x rows, "
                "its dispatch %.2f ms of the engine thread", model.weight_ms, model.token_us,
                model.row_us, model.dispatch_ms)
    server.run(args, loaded=loaded, execute=device)


def _shape_only(args):
    """The model's config and the tokenizer, without weights."""
    from pagedjax.models.dummy import dummy_config
    from pagedjax.models.hf import load_tokenizer
    from pagedjax.models.loader import LoadedModel

    tokenizer = load_tokenizer(args.tokenizer)
    if tokenizer is None:
        raise ValueError(f"--tokenizer {args.tokenizer}: no tokenizer could be loaded from it")
    return LoadedModel(dummy_config(args.model), None, tokenizer, "float32")


if __name__ == "__main__":
    main()
