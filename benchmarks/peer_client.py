"""vLLM's own serving client against the serve scenario's server: a second opinion on its figures
from code nobody here wrote (issue 25).

The client is vLLM's ``benchmarks/benchmark_serving.py`` with its ``backend_request_func.py`` and
``benchmark_utils.py``, as of vLLM v0.7.3: the last release whose client runs without the
``vllm`` package (v0.8 moved the datasets into ``benchmark_dataset.py``, which imports ``vllm``
at module top; later releases moved the client into ``vllm bench serve``). It is not part of this
project: fetch those three files from vLLM's public repository (tag v0.7.3, folder
``benchmarks/``) into a folder and name it with ``--peer-client-dir DIR`` or the environment
variable ``PAGEDJAX_VLLM_BENCH_DIR``. It needs aiohttp, tqdm, numpy, transformers and
huggingface_hub.

It runs as a subprocess against the same server, with the same workload and settings as the
scenario's own client: ``--backend openai`` (``/v1/completions``, streaming),
``--dataset-name random`` with ``--random-input-len`` / ``--random-output-len`` at
``--random-range-ratio 1`` (every prompt exactly that long), ``--ignore-eos``, the same
``--num-prompts``, ``--request-rate``, ``--burstiness``, ``--max-concurrency`` and ``--seed``. Its
random prompts are text: token ids drawn from the tokenizer's vocabulary and decoded, so it loads
the server's tokenizer with ``AutoTokenizer`` (``--tokenizer DIR``). The synthetic word-level
tokenizer the scenario gives a dummy-weight server (``serving_client.synthetic_tokenizer``) is
such a folder, and its text re-encodes to exactly the ids it came from, so the prompts keep their
length. Unlike the scenario's client, which sends token ids, it makes the server tokenise text.
Before its measured run the client sends one request of the same shape (its own "initial test
run"); the scenario has warmed the server up already.

Shims: the client imports pandas, datasets and PIL at module top, for its BurstGPT, Hugging Face
and image datasets only; the random dataset uses none of them. Each one that this interpreter
cannot import gets a stand-in module in a temporary folder put first on the child's PYTHONPATH:
it imports, and any use of it raises ImportError naming the missing package. The client's own
code is run unchanged.

The figures are read from the JSON the client saves (``--save-result``) and kept under the
names it gives them (``output_throughput``, ``median_tpot_ms``, ...).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

FILES = ("benchmark_serving.py", "backend_request_func.py", "benchmark_utils.py")
ENV = "PAGEDJAX_VLLM_BENCH_DIR"
# Stand-ins for module-top imports the random dataset never uses: module -> its files.
_SHIMS = {
    "pandas": {"pandas/__init__.py": "def read_csv(*args, **kwargs):\n    {raise}\n"},
    "datasets": {"datasets/__init__.py": "def load_dataset(*args, **kwargs):\n    {raise}\n"},
    "PIL": {"PIL/__init__.py": "",
            "PIL/Image.py": "class Image:\n    def __init__(self, *args, **kwargs):\n"
                            "        {raise}\n\n\ndef open(*args, **kwargs):\n    {raise}\n"},
}


def client_dir(given: str | None) -> Path | None:
    """The folder holding vLLM's client files: ``given``, else $PAGEDJAX_VLLM_BENCH_DIR, else
    None (no peer run). A folder that lacks one of the files is an error."""
    path = given or os.environ.get(ENV)
    if not path:
        return None
    missing = [f for f in FILES if not (Path(path) / f).is_file()]
    if missing:
        raise ValueError(f"--peer-client-dir / ${ENV} {path} lacks {', '.join(missing)}: put "
                         "vLLM v0.7.3's benchmarks/ files there (" + ", ".join(FILES) + ")")
    return Path(path).resolve()  # the client runs in a scratch folder: a relative path breaks


def write_shims(folder: Path) -> list[str]:
    """Stand-in modules for the client's unused imports this interpreter lacks; their names."""
    made = []
    for name, files in _SHIMS.items():
        if importlib.util.find_spec(name) is not None:
            continue
        fail = (f"raise ImportError('{name} is a stand-in (benchmarks/peer_client.py): "
                f"install {name} to use this dataset')")
        for rel, text in files.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_text(text.replace("{raise}", fail))
        made.append(name)
    return made


def command(folder: Path, url: str, model: str, tokenizer: str, *, input_len: int,
            output_len: int, num_prompts: int, rate: float, burstiness: float,
            max_concurrency: int | None, seed: int, result: Path) -> list[str]:
    argv = [sys.executable, str(folder / "benchmark_serving.py"), "--backend", "openai",
            "--base-url", url, "--endpoint", "/v1/completions", "--model", model,
            "--tokenizer", tokenizer, "--dataset-name", "random",
            "--random-input-len", str(input_len), "--random-output-len", str(output_len),
            "--random-range-ratio", "1.0", "--num-prompts", str(num_prompts),
            "--request-rate", "inf" if math.isinf(rate) else str(rate),
            "--burstiness", str(burstiness), "--seed", str(seed), "--ignore-eos",
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
            "--disable-tqdm", "--save-result", "--result-dir", str(result.parent),
            "--result-filename", result.name]
    if max_concurrency:
        argv += ["--max-concurrency", str(max_concurrency)]
    return argv


def run(folder: Path, url: str, model: str, tokenizer: str, *, api_key: str | None = None,
        timeout: float = 3600.0, **workload) -> dict:
    """Run vLLM's client once; its figures, or ``{"error": ...}`` when it failed (the scenario's
    own figures stand either way)."""
    with tempfile.TemporaryDirectory(prefix="pagedjax-peer-") as tmp:
        shims = write_shims(Path(tmp) / "shims")
        result = Path(tmp) / "vllm-result.json"
        argv = command(folder, url, model, tokenizer, result=result, **workload)
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   PYTHONPATH=os.pathsep.join([str(Path(tmp) / "shims"),
                                               *filter(None, [os.environ.get("PYTHONPATH")])]))
        if api_key:
            env["OPENAI_API_KEY"] = api_key  # the client's Authorization header
        logger.info("vLLM's client: %s", " ".join(argv[1:]))
        out = {"client": describe(folder), "shims": shims,
               "command": " ".join(["python", "benchmark_serving.py", *argv[2:]])}
        try:
            proc = subprocess.run(argv, env=env, cwd=tmp, timeout=timeout, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        except subprocess.TimeoutExpired:
            return out | {"error": f"vLLM's client ran past {timeout:.0f} s"}
        print(proc.stdout[-4000:])  # its own table
        if proc.returncode != 0 or not result.exists():
            return out | {"error": f"exit {proc.returncode}: {proc.stdout[-2000:]}"}
        return out | figures(json.loads(result.read_text()), workload["num_prompts"],
                             workload["output_len"])


def figures(raw: dict, num_prompts: int, output_len: int) -> dict:
    """The scalar figures of vLLM's result JSON (its names), plus ``failed`` and whether every
    completed request got exactly ``output_len`` tokens; per-request lists are dropped."""
    out = {k: v for k, v in raw.items() if isinstance(v, (int, float, str)) or v is None}
    lens = raw.get("output_lens") or []
    out["failed"] = num_prompts - raw["completed"]
    out["all_full_length"] = bool(lens) and all(n == output_len for n in lens)
    out["errors"] = [e[-300:] for e in raw.get("errors", []) if e][:3]
    return out


def describe(folder: Path) -> dict:
    """Which client ran: the sha256 of each file (and the folder's SOURCE note, if it has one)."""
    d = {f: hashlib.sha256((folder / f).read_bytes()).hexdigest()[:16] for f in FILES}
    note = folder / "SOURCE"
    if note.is_file():
        d["source"] = note.read_text().strip()
    return d
