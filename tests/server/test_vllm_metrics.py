"""With ``--metrics-prefix vllm`` every metric a vLLM Grafana dashboard queries resolves on
/metrics: the names below are the ones vLLM's own dashboard (examples/online_serving/
prometheus_grafana/grafana.json) and its v1 metrics use, with their label names."""
from __future__ import annotations

import argparse

import pytest
from tests.server.conftest import MODEL, Server, server_argv, start_uvicorn

from pagedjax.entrypoints.server import add_arguments, build_server

# PromQL series of vLLM's Grafana dashboard, and the label each panel selects or groups by
DASHBOARD = [
    "vllm:e2e_request_latency_seconds_bucket", "vllm:e2e_request_latency_seconds_sum",
    "vllm:e2e_request_latency_seconds_count", "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total", "vllm:time_per_output_token_seconds_bucket",
    "vllm:time_per_output_token_seconds_sum", "vllm:time_per_output_token_seconds_count",
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:num_requests_swapped",
    "vllm:time_to_first_token_seconds_bucket", "vllm:time_to_first_token_seconds_sum",
    "vllm:time_to_first_token_seconds_count", "vllm:gpu_cache_usage_perc",
    "vllm:request_prompt_tokens_bucket", "vllm:request_generation_tokens_bucket",
    "vllm:request_success_total", "vllm:request_queue_time_seconds_sum",
    "vllm:request_prefill_time_seconds_sum", "vllm:request_decode_time_seconds_sum",
    "vllm:request_max_num_generation_tokens_sum",
]
# vLLM v1's names beside them (its docs' metrics list)
V1 = ["vllm:kv_cache_usage_perc", "vllm:inter_token_latency_seconds_count",
      "vllm:num_preemptions_total", "vllm:prefix_cache_queries_total",
      "vllm:prefix_cache_hits_total", "vllm:request_inference_time_seconds_count",
      "vllm:request_params_n_count", "vllm:request_params_max_tokens_count"]


@pytest.fixture(scope="module")
def vllm_named(tok_model):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    uv, aengine = build_server(parser.parse_args(server_argv() + ["--metrics-prefix", "vllm"]),
                               loaded=tok_model)
    running = start_uvicorn(uv)
    yield Server(running.url, aengine, uv.config.app)
    running.stop()
    aengine.shutdown()


def test_a_vllm_dashboard_resolves_with_the_vllm_prefix(vllm_named):
    vllm_named.client().completions.create(model=MODEL, prompt="one two three", max_tokens=4,
                                           n=2, extra_body={"ignore_eos": True})
    vllm_named.wait_metric("vllm:request_success_total", lambda v: v >= 1, label="length")
    text = vllm_named.http().get("/metrics").text
    series = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
              if line and not line.startswith("#")}
    missing = [name for name in DASHBOARD + V1 if name not in series]
    assert not missing, missing
    assert f'model_name="{MODEL}"' in text and 'finished_reason="length"' in text
    assert not any(name.startswith("pagedjax:") for name in series)
    m = vllm_named.metrics()
    # one request of n=2 x 4 tokens, 3 prompt tokens at most a few more with the template
    assert m[("vllm:request_params_n_sum", "")] == 2
    assert m[("vllm:request_max_num_generation_tokens_sum", "")] == 4
    assert m[("vllm:request_generation_tokens_sum", "")] == 8
    assert m[("vllm:request_params_max_tokens_sum", "")] == 4
    assert m[("vllm:request_queue_time_seconds_count", "")] == 1
    assert m[("vllm:request_prefill_time_seconds_sum", "")] > 0
    assert m[("vllm:gpu_cache_usage_perc", "")] == m[("vllm:kv_cache_usage_perc", "")]


def test_a_bad_metrics_prefix_is_refused_before_loading(tok_model):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(ValueError, match="--metrics-prefix 'vllm:x'"):
        build_server(parser.parse_args(server_argv() + ["--metrics-prefix", "vllm:x"]),
                     loaded=tok_model)
