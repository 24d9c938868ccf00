"""A fuzz pass over the HTTP API from its OpenAPI schema (schemathesis: valid and invalid bodies
for every operation, 30 examples each) against the in-process app: never a 500, every error in
OpenAI's shape, and the engine still alive and leak-free afterwards.

schemathesis runs every operation inside the one test below, so its ``fuzz_log`` fixture is set
up once around the whole pass: its teardown checks the server after the last request and records
the figures, and the test needs no other test to run first."""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.reliability.conftest import FIGURES, on_engine_thread
from tests.server.conftest import API_KEY


@pytest.fixture(scope="session")
def api_schema(rel_server):
    """The app's own OpenAPI document (it does not serve one: openapi_url=None)."""
    return schemathesis.openapi.from_dict(rel_server.app.openapi())


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture
def fuzz_log(rel_server):
    """{"METHOD /path": [status, ...]} of the pass; afterwards, the server healthy and leak-free."""
    statuses: dict[str, list[int]] = {}
    yield statuses
    codes = [c for op, cs in statuses.items() if op.startswith("POST /v1/") for c in cs]
    assert codes, f"the fuzz sent no generation request: {statuses}"
    assert rel_server.aengine.is_alive
    rel_server.wait_metric("pagedjax:num_requests_running", lambda v: v == 0, timeout=30)
    rel_server.wait_metric("pagedjax:kv_cache_usage_perc", lambda v: v == 0.0, timeout=30)
    free, total = on_engine_thread(rel_server.aengine, lambda e: (
        e.block_manager.num_free, e.block_manager.num_blocks))
    assert free == total
    counts = {c: codes.count(c) for c in sorted(set(codes))}
    FIGURES.append(f"fuzz (schemathesis): {sum(map(len, statuses.values()))} requests over "
                   f"{len(statuses)} method x path pairs, 0 x 500; the two generation endpoints "
                   f"answered {counts}")


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_500s_and_the_server_stays_healthy(case, rel_server, fuzz_log):
    r = case.call(app=rel_server.app, headers={"Authorization": f"Bearer {API_KEY}"})
    fuzz_log.setdefault(f"{case.method} {case.path}", []).append(r.status_code)
    assert r.status_code != 500, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
    if r.status_code == 503:  # the fuzzer can fill the short waiting queue
        assert err["code"] == "overloaded", err
