"""What the engine scenarios share: the model (a shipped config with dummy weights, or ``--tiny``),
synthetic prompts (fixed lengths or the ShareGPT-like distribution), and a measured
``LLM.generate`` that counts compilations and records the engine step by step.

Nothing here touches the accelerator at import time: ``native-vs-paged`` must set
``XLA_PYTHON_CLIENT_MEM_FRACTION`` in its children before JAX starts a backend.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import sys
import time

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "Qwen2.5-7B-Instruct"
GiB = 1 << 30

# A tiny Qwen2 in Hugging Face config.json form, so that transformers and pagedjax can build the
# same shape from the same dict. One layer and small dims keep CPU compiles to a second or two.
TINY_HF_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 512,
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32768,
    "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "eos_token_id": 1, "bos_token_id": 0,
    "tie_word_embeddings": False, "hidden_act": "silu", "initializer_range": 0.02,
    "_name_or_path": "tiny-qwen2",
}


# ---- arguments -------------------------------------------------------------------------------
def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """The engine's vLLM flags (``--max-model-len``, ``--max-num-seqs``, ...) plus ``--tiny``;
    the model defaults to Qwen2.5-7B-Instruct with dummy weights."""
    from pagedjax.config import add_engine_arguments as engine_flags

    engine_flags(p)
    p.set_defaults(model=DEFAULT_MODEL, load_format="dummy")
    p.add_argument("--tiny", action="store_true",
                   help="a tiny random Qwen2 (1 layer, hidden 64) instead of --model (CPU runs)")


def engine_args(args: argparse.Namespace, **overrides):
    from pagedjax.config import EngineArgs

    return dataclasses.replace(EngineArgs.from_namespace(args), **overrides)


def preset(args: argparse.Namespace, full: dict, small: dict, use_small: bool) -> None:
    """Fill every size flag left at None from the full-size or the small (``--quick``,
    ``--tiny``) table."""
    table = small if use_small else full
    for name, value in full.items():
        if getattr(args, name, None) is None:
            setattr(args, name, table.get(name, value))


# ---- model -----------------------------------------------------------------------------------
def hf_config_dict(args: argparse.Namespace) -> dict:
    """The Hugging Face config.json dict of the benchmarked shape (shared with transformers)."""
    import json

    from pagedjax.models import dummy

    if args.tiny:
        return dict(TINY_HF_CONFIG)
    path = dummy.shipped_config_path(args.model)
    if path is None:
        from pathlib import Path

        path = Path(args.model)
        path = path / "config.json" if path.is_dir() else path
    return json.loads(path.read_text())


def load(args: argparse.Namespace):
    """The model once per process: ``--tiny``, or ``--model`` with ``--load-format``."""
    from pagedjax.models import ModelConfig
    from pagedjax.models.dummy import dummy_params
    from pagedjax.models.fused import fuse_projections
    from pagedjax.models.loader import LoadedModel, load_model, resolve_dtype

    if args.tiny:
        cfg = ModelConfig.from_hf(TINY_HF_CONFIG, source="--tiny")
        dtype = resolve_dtype(args.dtype)
        return LoadedModel(cfg, dummy_params(cfg, dtype, args.seed, args.quantization), None,
                           dtype, "tiny", args.quantization)
    loaded = load_model(args.model, load_format=args.load_format, dtype=args.dtype,
                        tokenizer=args.tokenizer, seed=args.seed, quantization=args.quantization)
    # Fused once for the process's engines (they take a fused tree as it is): an engine given
    # unfused weights fuses a copy of its own, and a scenario's engines would each hold one.
    params = fuse_projections(loaded.cfg, loaded.params, args.tensor_parallel_size, consume=True)
    return dataclasses.replace(loaded, params=params)


def char_tokenizer(vocab_size: int):
    """For ``--tiny`` runs that need text: one token per printable ASCII character, padded with
    word tokens to the model's vocabulary so that every id the random model samples decodes."""
    import string

    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "</s>"]
    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    vocab = {t: i for i, t in enumerate(
        special + chars + [f"w{i}" for i in range(vocab_size - len(special) - len(chars))])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(special)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


def make_llm(loaded, ea):
    from pagedjax import LLM

    return LLM(loaded=loaded, **dataclasses.asdict(ea))


def precompile_figures(engine) -> dict:
    """What the engine compiled at start (``--precompile``: every step shape, sampler variant
    and copy program), so that a measured run's ``compilations`` of 0 is by construction, not
    because the warm-up pass happened to produce every shape the run needs."""
    return {"precompile": engine.precompile, "precompile_s": engine.precompile_s,
            "precompile_compilations": engine.precompile_compilations,
            "precompile_parts_s": engine.precompile_parts}


def release(llm) -> None:
    """Free an LLM's (or an engine's) KV pool before the next engine sizes itself from free
    memory: the caller still holds the object. (pagedjax has no ``close()`` to call yet.)"""
    getattr(llm, "engine", llm).runner.pool = None
    gc.collect()


# ---- prompts ---------------------------------------------------------------------------------
def random_prompts(lengths, vocab_size: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    # ids 2.. avoid the usual bos/eos ids; the content does not matter to the speed
    return [rng.integers(2, vocab_size, size=int(n)).tolist() for n in lengths]


def sharegpt_like_lengths(n: int, seed: int, max_model_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(prompt lengths, output lengths) of ``n`` requests: log-normal prompts (median 120 tokens,
    sigma 1.2) and outputs (median 130, sigma 1.0), filtered as vLLM filters ShareGPT: every length
    >= 4, prompt <= 1024, prompt + output <= 2048 (and <= max_model_len). See throughput.py."""
    rng = np.random.default_rng(seed)
    total = min(2048, max_model_len)
    p = np.clip(np.round(rng.lognormal(np.log(120), 1.2, n)), 4, min(1024, total // 2))
    o = np.clip(np.round(rng.lognormal(np.log(130), 1.0, n)), 4, 1024)
    o = np.maximum(np.minimum(o, total - p), 1)
    return p.astype(int), o.astype(int)


# ---- measuring -------------------------------------------------------------------------------
def device_memory() -> dict | None:
    """The default device's allocator figures (bytes), or None on the CPU."""
    import jax

    d = jax.devices()[0]
    stats = d.memory_stats() if d.platform != "cpu" else None
    if not stats:
        return None
    return {k: int(stats.get(k, 0)) for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")}


class StepRecorder:
    """Samples the engine after each step of a ``with`` block (through the engine's
    ``step_observers`` seam): time, running / waiting sequences, KV-pool use, tokens generated so
    far, and (at most every ``memory_every_s``) device bytes in use."""

    def __init__(self, engine, memory_every_s: float = 0.05):
        self.engine = engine
        self.memory_every_s = memory_every_s
        self.samples: list[dict] = []
        self._last_mem = -1e9

    def __enter__(self):
        self._t0 = time.perf_counter()
        self._gen0 = self.engine.stats.generation_tokens
        self.engine.step_observers.append(self._sample)
        return self

    def __exit__(self, *exc):
        self.engine.step_observers.remove(self._sample)

    def _sample(self, e) -> None:
        now = time.perf_counter()
        s = {"t": now - self._t0, "running": len(e.scheduler.running),
             "waiting": len(e.scheduler.waiting), "kv_usage": e.block_manager.usage,
             "generated": e.stats.generation_tokens - self._gen0}
        if now - self._last_mem >= self.memory_every_s:
            mem = device_memory()
            if mem is not None:
                s["bytes_in_use"] = mem["bytes_in_use"]
            self._last_mem = now
        self.samples.append(s)

    @property
    def max_running(self) -> int:
        return max((s["running"] for s in self.samples), default=0)


@dataclasses.dataclass
class Run:
    outputs: list
    elapsed_s: float
    compilations: int  # new step shapes compiled during this run
    prompt_tokens: int
    output_tokens: int
    steps: int
    host_s: float
    device_s: float
    preemptions: int
    timeline: list[dict]
    max_running: int

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.elapsed_s

    @property
    def total_tok_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.elapsed_s

    @property
    def requests_s(self) -> float:
        return len(self.outputs) / self.elapsed_s

    def figures(self) -> dict:
        return {"elapsed_s": self.elapsed_s, "requests": len(self.outputs),
                "prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens,
                "requests_per_s": self.requests_s, "total_tok_s": self.total_tok_s,
                "output_tok_s": self.output_tok_s, "compilations": self.compilations,
                "steps": self.steps, "host_s": self.host_s, "device_s": self.device_s,
                "preemptions": self.preemptions, "max_running": self.max_running}


def generate(llm, prompts, params) -> Run:
    """One timed ``LLM.generate``, with the compilations, engine time split and a step timeline."""
    e = llm.engine
    before = e.make_stats()
    with StepRecorder(e) as rec:
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=sys.stderr.isatty())
        elapsed = time.perf_counter() - t0
    d = e.make_stats().delta(before)
    return Run(outs, elapsed, d["num_compilations"],
               prompt_tokens=sum(len(o.prompt_token_ids) for o in outs),
               output_tokens=sum(len(c.token_ids) for o in outs for c in o.outputs),
               steps=d["steps"], host_s=d["host_seconds"], device_s=d["device_seconds"],
               preemptions=d["num_preemptions"], timeline=rec.samples,
               max_running=rec.max_running)


def thin(timeline: list[dict], max_points: int = 400) -> list[dict]:
    """At most ``max_points`` evenly spaced samples (keeps JSON small), the last one kept."""
    if len(timeline) <= max_points:
        return timeline
    idx = np.linspace(0, len(timeline) - 1, max_points).round().astype(int)
    return [timeline[i] for i in sorted(set(idx))]


def rate_series(timeline: list[dict], key: str = "generated", bins: int = 60):
    """(times, per-second rate of ``key``) over ``bins`` equal time windows of a timeline."""
    if len(timeline) < 2:
        return [], []
    t = np.array([s["t"] for s in timeline])
    v = np.array([s[key] for s in timeline], dtype=float)
    edges = np.linspace(0.0, t[-1], bins + 1)
    at = np.interp(edges, np.concatenate([[0.0], t]), np.concatenate([[0.0], v]))
    return edges[1:].tolist(), (np.diff(at) / np.diff(edges)).tolist()
