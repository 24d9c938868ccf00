"""vLLM's own client in the serve scenario (issue 25): it runs against the same `pagedjax serve`
(tiny random Qwen2, 127.0.0.1) and its figures land in the scenario's JSON; and the one-at-a-time
serving overhead against the latency scenario's batch-1 TPOT.

vLLM's client is not committed: the end-to-end test runs when $PAGEDJAX_VLLM_BENCH_DIR (or the
git-ignored .vllm-bench/ at the repository root) holds vLLM v0.7.3's benchmark_serving.py,
backend_request_func.py and benchmark_utils.py, and aiohttp is installed; it is skipped, saying
so, otherwise."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import peer_client, serve
from benchmarks.__main__ import main
from benchmarks.common import device_name

N, IN, OUT = 4, 8, 4
TINY = ["--tiny", "--max-num-seqs", "4", "--max-num-batched-tokens", "16",
        "--kv-cache-memory-bytes", "65536"]
REPO = Path(__file__).resolve().parents[2]


def _client_dir() -> Path | None:
    for d in (os.environ.get(peer_client.ENV), REPO / ".vllm-bench"):
        if d and all((Path(d) / f).is_file() for f in peer_client.FILES):
            return Path(d)
    return None


def _latency_json(path: Path, tpot_ms: float, device: str | None = None, batch: int = 1):
    row = {"batch": batch, "input_len": IN, "output_len": OUT, "tpot_p50_ms": tpot_ms}
    path.write_text(json.dumps({"scenario": "latency", "device": device or device_name(),
                                "git_commit": None, "command": "python -m benchmarks latency",
                                "figures": {"rows": [row]}}))
    return path


@pytest.mark.skipif(_client_dir() is None, reason=f"vLLM's client files are not here (set "
                    f"${peer_client.ENV} to a folder with {', '.join(peer_client.FILES)})")
def test_vllm_client_against_the_serve_scenario(tmp_path, monkeypatch):
    pytest.importorskip("aiohttp", reason="vLLM's client needs aiohttp (the test extra has it)")
    monkeypatch.delenv(peer_client.ENV, raising=False)
    latency = _latency_json(tmp_path / "latency.json", tpot_ms=2.0)
    summary = main(["serve", "--out", str(tmp_path), *TINY, "--num-prompts", str(N),
                    "--input-len", str(IN), "--output-len", str(OUT), "--max-concurrency", "1",
                    "--request-rate", "inf", "--num-warmup-prompts", "2",
                    "--server-timeout", "120", "--peer-client-dir", str(_client_dir()),
                    "--compare-latency", str(latency)])
    record = json.loads((tmp_path / "serve.json").read_text())
    peer = record["figures"]["rows"][0]["peer"]
    assert "error" not in peer, peer.get("error")
    assert peer["completed"] == N and peer["failed"] == 0 and peer["all_full_length"]
    assert peer["total_input_tokens"] == N * IN and peer["total_output_tokens"] == N * OUT
    assert peer["max_concurrency"] == 1 and peer["request_rate"] == "inf"
    assert peer["backend"] == "openai" and not peer["errors"]
    # the server saw vLLM's prompts at their stated length: its N + its one test request
    assert peer["server"]["prompt_tokens"] == (N + 1) * IN
    assert peer["server"]["generation_tokens"] == (N + 1) * OUT
    assert peer["compilations"] == 0
    assert 0 < peer["median_ttft_ms"] <= peer["p99_ttft_ms"] and peer["median_tpot_ms"] > 0
    assert set(peer["client"]) >= set(peer_client.FILES)
    s = record["summary"]
    assert s == json.loads(json.dumps(summary, default=float))
    assert s["peer_completed"] == N
    assert s["peer_output_tok_s"] == peer["output_throughput"]
    assert s["peer_median_tpot_ms"] == peer["median_tpot_ms"]
    assert s["peer_median_ttft_ms"] == peer["median_ttft_ms"]
    assert "peer_output_tok_s_c64" not in s  # concurrency 1 here
    assert s["offline_tpot_ms_c1"] == 2.0
    assert s["serving_overhead_pct_c1"] == pytest.approx((s["median_tpot_ms"] / 2.0 - 1) * 100)
    assert s["peer_serving_overhead_pct_c1"] == pytest.approx(
        (peer["median_tpot_ms"] / 2.0 - 1) * 100)


def test_peer_summary_keys_at_c64():
    class Args:
        max_concurrency = 64

    row = {k: 1.0 for k in ("completed", "failed", "duration", "request_throughput",
                            "output_throughput", "total_token_throughput", "mean_ttft_ms",
                            "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms",
                            "p99_tpot_ms", "mean_itl_ms", "median_itl_ms", "p99_itl_ms")}
    rows = [row | {"request_rate": "inf", "compilations": 0, "compilations_before_warmup": 0,
                   "steps": None, "peer": {"completed": 8, "output_throughput": 5000.0,
                                           "median_tpot_ms": 11.0, "median_ttft_ms": 90.0}},
            row | {"request_rate": "8", "compilations": 0, "compilations_before_warmup": 0,
                   "steps": None, "peer": {"error": "exit 1: boom"}},
            row | {"request_rate": "16", "compilations": 0, "compilations_before_warmup": 0,
                   "steps": None, "peer": {"completed": 5, "failed": 3,
                                           "output_throughput": 9000.0}}]
    for r in rows:
        r |= {c: r.get(c) for c in serve.COLUMNS}
    args = Args()
    args.tiny, args.model, args.num_prompts, args.input_len, args.output_len = True, "x", 8, 8, 4
    args.burstiness, args.base_url, args.request_rate = 1.0, None, [float("inf"), 8.0, 16.0]
    args.fake_device = False
    summary, _ = serve._summarise(args, "http://127.0.0.1:1", rows, [[], [], []], 0, None)
    assert summary["peer_output_tok_s_c64"] == 5000.0 and summary["peer_median_tpot_ms_c64"] == 11.0
    assert summary["peer_median_ttft_ms"] == 90.0 and summary["peer_completed"] == 8
    # a failed peer run leaves its keys null, never drops ours
    assert summary["rate8_peer_output_tok_s"] is None and summary["rate8_output_throughput"] == 1.0
    # a peer run that lost requests (e.g. 503s) gives no figures, and says how many it lost
    assert summary["rate16_peer_output_tok_s"] is None and summary["rate16_peer_failed"] == 3
    assert summary["peer_failed"] is None
    assert "serving_overhead_pct_c1" not in summary


def test_compare_latency_refuses_what_it_cannot_compare(tmp_path):
    class Args:
        max_concurrency, input_len, output_len = 1, IN, OUT

    good = _latency_json(tmp_path / "good.json", tpot_ms=3.0)
    assert serve._offline_tpot(str(good), Args())["tpot_ms"] == 3.0
    assert serve._overhead_pct(3.3, 3.0) == pytest.approx(10.0)
    with pytest.raises(ValueError, match="--batch-sizes 1 --input-lens 8 --output-len 4"):
        serve._offline_tpot(str(_latency_json(tmp_path / "b8.json", 3.0, batch=8)), Args())
    with pytest.raises(ValueError, match="one device"):
        serve._offline_tpot(str(_latency_json(tmp_path / "gpu.json", 3.0, "gpu-h100")), Args())
    Args.max_concurrency = 4
    with pytest.raises(ValueError, match="--max-concurrency 1"):
        serve._offline_tpot(str(good), Args())


def test_peer_client_dir_and_shims(tmp_path, monkeypatch):
    monkeypatch.delenv(peer_client.ENV, raising=False)
    assert peer_client.client_dir(None) is None
    (tmp_path / "benchmark_serving.py").write_text("")
    with pytest.raises(ValueError, match="lacks backend_request_func.py, benchmark_utils.py"):
        peer_client.client_dir(str(tmp_path))
    monkeypatch.setenv(peer_client.ENV, str(tmp_path))
    with pytest.raises(ValueError, match="lacks"):
        peer_client.client_dir(None)
    for name in peer_client.FILES:  # a relative folder comes back absolute (the client runs
        (tmp_path / name).write_text("")  # in a scratch folder)
    monkeypatch.chdir(tmp_path.parent)
    assert peer_client.client_dir(tmp_path.name) == tmp_path.resolve()
    # the stand-ins import, and using one says which package is missing
    monkeypatch.setattr(peer_client.importlib.util, "find_spec", lambda name: None)
    shims = tmp_path / "shims"
    assert peer_client.write_shims(shims) == ["pandas", "datasets", "PIL"]
    code = ("import pandas as pd; from datasets import load_dataset; from PIL.Image import Image\n"
            "try:\n    load_dataset('x')\nexcept ImportError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(shims)),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "install datasets" in out.stdout
