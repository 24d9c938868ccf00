"""Prometheus metrics with vLLM's names, label names and meanings, under the prefix
``--metrics-prefix`` (``pagedjax`` by default; ``vllm`` serves them exactly as vLLM does, so a
dashboard or alert written for vLLM works unchanged).

Each server owns its registry (no global state, so tests and several engines in one process do
not collide). Gauges are set by the engine thread after every step; histograms are observed there
from the engine's per-request timestamps (arrival, first scheduled, first token, finished).
``prefix_cache_queries`` and ``prefix_cache_hits`` count tokens looked up and found with
--enable-prefix-caching (0 without it). Two of vLLM's older names are served beside their current
ones because dashboards still query them: ``gpu_cache_usage_perc`` (= ``kv_cache_usage_perc``)
and ``time_per_output_token_seconds`` (= ``inter_token_latency_seconds``). ``step_compilations``
counts the step shapes the engine compiled, so a benchmark can tell that nothing compiled while it
measured (there is no vLLM counterpart). The host KV tier (--kv-offloading-size): its lookups and
hits in tokens under vLLM's names for a KV connector's (``external_prefix_cache_*``), and per
direction (``store`` to the host, ``load`` back) the blocks, bytes and transfer seconds it moved:
``rate(kv_offload_bytes) / rate(kv_offload_seconds)`` is its GB/s.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# vLLM's buckets, so dashboards built for it read the same
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
PHASE_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
FINISH_REASONS = ("stop", "length", "abort", "error")


def buckets_1_2_5(limit: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to ``limit``: vLLM's buckets for token counts."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > limit:
                return out
            out.append(m * scale)
        scale *= 10


def check_prefix(prefix: str) -> str:
    if not prefix.isidentifier():
        raise ValueError(f"--metrics-prefix {prefix!r} must be a name of letters, digits and "
                         "underscores, e.g. vllm")
    return prefix


class EngineMetrics:
    def __init__(self, model_name: str, registry: CollectorRegistry | None = None,
                 prefix: str = "pagedjax", max_model_len: int = 1 << 20):
        check_prefix(prefix)
        self.registry = registry or CollectorRegistry()
        r, labels = self.registry, ["model_name"]

        def gauge(name, doc):
            return Gauge(f"{prefix}:{name}", doc, labels, registry=r).labels(model_name)

        def counter(name, doc):
            return Counter(f"{prefix}:{name}", doc, labels, registry=r).labels(model_name)

        def histogram(name, doc, buckets):
            return Histogram(f"{prefix}:{name}", doc, labels, buckets=buckets,
                             registry=r).labels(model_name)

        self.running = gauge("num_requests_running", "Sequences running on the device.")
        self.waiting = gauge("num_requests_waiting", "Sequences waiting to be scheduled.")
        self.swapped = gauge("num_requests_swapped", "Sequences swapped out to host memory.")
        self.kv_usage = gauge("kv_cache_usage_perc", "KV-cache usage; 1 means 100 percent.")
        self.gpu_usage = gauge("gpu_cache_usage_perc", "kv_cache_usage_perc's older name.")
        self.cpu_usage = gauge("cpu_cache_usage_perc", "Host swap usage; 1 means 100 percent.")
        self.preemptions = counter("num_preemptions", "Cumulative number of preemptions.")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of admitted requests.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        self.prefix_queries = counter("prefix_cache_queries", "Prefix-cache queries, in tokens.")
        self.prefix_hits = counter("prefix_cache_hits", "Prefix-cache hits, in tokens.")
        self.compilations = counter("step_compilations", "Engine programs (step shapes, sampler "
                                    "variants, copies) compiled so far, --precompile's at start "
                                    "included; none after warm-up is the target.")
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between a request's tokens.",
                             ITL_BUCKETS)
        self.tpot = histogram("time_per_output_token_seconds",
                              "inter_token_latency_seconds's older name.", ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to last token.", E2E_BUCKETS)
        self.queue = histogram("request_queue_time_seconds", "Arrival to first scheduled.",
                               PHASE_BUCKETS)
        self.prefill = histogram("request_prefill_time_seconds",
                                 "First scheduled to first token.", PHASE_BUCKETS)
        self.decode = histogram("request_decode_time_seconds", "First token to last token.",
                                PHASE_BUCKETS)
        self.inference = histogram("request_inference_time_seconds",
                                   "First scheduled to last token.", PHASE_BUCKETS)
        tokens = buckets_1_2_5(max_model_len)
        self.request_prompt_tokens = histogram("request_prompt_tokens",
                                               "Prompt tokens of a finished request.", tokens)
        self.request_generation_tokens = histogram(
            "request_generation_tokens", "Tokens generated by a finished request (all its "
            "sequences).", tokens)
        self.request_max_generation_tokens = histogram(
            "request_max_num_generation_tokens", "The most tokens one sequence of a finished "
            "request generated.", tokens)
        self.request_n = histogram("request_params_n", "The n of a finished request.",
                                   (1, 2, 5, 10, 20))
        self.request_max_tokens = histogram("request_params_max_tokens",
                                            "The max_tokens of a finished request.", tokens)
        self.offload_usage = gauge("kv_offload_usage_perc", "Share of the host KV tier holding "
                                   "cached prefix blocks; 1 means 100 percent.")
        self.offload_queries = counter("external_prefix_cache_queries",
                                       "Host KV tier lookups (GPU prefix-cache misses), in tokens.")
        self.offload_hits = counter("external_prefix_cache_hits",
                                    "Host KV tier hits (loaded, not recomputed), in tokens.")
        self.offload = {what: {d: c.labels(model_name, d) for d in ("store", "load")}
                        for what, c in (
            ("blocks", Counter(f"{prefix}:kv_offload_blocks", "Blocks the host KV tier moved.",
                               ["model_name", "direction"], registry=r)),
            ("payload_bytes", Counter(f"{prefix}:kv_offload_bytes", "Bytes the host KV tier "
                                      "moved.", ["model_name", "direction"], registry=r)),
            ("seconds", Counter(f"{prefix}:kv_offload_seconds", "Seconds the host KV tier's "
                                "transfers took.", ["model_name", "direction"], registry=r)))}
        self.startup = Gauge(f"{prefix}:startup_phase_seconds", "Seconds each start-up phase "
                             "took (device init, load, size pool, allocate pool, precompile, "
                             "...).",
                             ["model_name", "phase"], registry=r)
        self.precompile = Gauge(f"{prefix}:precompile_seconds", "Seconds the start-up precompile "
                                "spent on each kind of program (steps, sampler, copies); the "
                                "sampler and copies compile on threads beside the steps, so "
                                "the kinds overlap.",
                                ["model_name", "programs"], registry=r)
        success = Counter(f"{prefix}:request_success", "Finished requests by finish reason.",
                          ["model_name", "finished_reason"], registry=r)
        self.finished = {reason: success.labels(model_name, reason) for reason in FINISH_REASONS}
