"""A fuzz pass over the HTTP API from its OpenAPI schema (schemathesis: valid and invalid bodies
for every operation, 30 examples each) against the in-process app: never a 500, every error in
OpenAI's shape, and the engine still alive and leak-free afterwards."""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.reliability.conftest import FIGURES, on_engine_thread
from tests.server.conftest import API_KEY

STATUSES: dict[str, list[int]] = {}


@pytest.fixture(scope="session")
def api_schema(rel_server):
    """The app's own OpenAPI document (it does not serve one: openapi_url=None)."""
    return schemathesis.openapi.from_dict(rel_server.app.openapi())


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_500s(case, rel_server):
    r = case.call(app=rel_server.app, headers={"Authorization": f"Bearer {API_KEY}"})
    STATUSES.setdefault(f"{case.method} {case.path}", []).append(r.status_code)
    assert r.status_code != 500, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
    if r.status_code == 503:  # the fuzzer can fill the short waiting queue
        assert err["code"] == "overloaded", err


def test_the_fuzzed_server_is_healthy_and_leak_free(rel_server):
    assert STATUSES, "run with test_no_500s"
    assert rel_server.aengine.is_alive
    rel_server.wait_metric("pagedjax:num_requests_running", lambda v: v == 0, timeout=30)
    rel_server.wait_metric("pagedjax:kv_cache_usage_perc", lambda v: v == 0.0, timeout=30)
    free, total = on_engine_thread(rel_server.aengine, lambda e: (
        e.block_manager.num_free, e.block_manager.num_blocks))
    assert free == total
    codes = [c for op, cs in STATUSES.items() if op.startswith("POST /v1/") for c in cs]
    counts = {c: codes.count(c) for c in sorted(set(codes))}
    FIGURES.append(f"fuzz (schemathesis): {sum(map(len, STATUSES.values()))} requests over "
                   f"{len(STATUSES)} method x path pairs, 0 x 500; the two generation endpoints "
                   f"answered {counts}")
