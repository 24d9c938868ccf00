"""The default engine on the CPU (embedded SmolLM2, max_model_len 8192) completes a prompt of
max_model_len - 1 tokens, and its memory stays within what the planner
(pagedjax.planning.memory_report) accounts for: the activation reserve covers the largest step's buffers, and the process's peak
RSS stays under the runtime + the planner's figure (weights, activation reserve, KV pool) + the
host copy of the model the loader builds from + a stated margin. The attention that gathered
[tokens, context, heads, dim] needed 26 GB for this prompt."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.reliability.conftest import FIGURES

MiB = 1 << 20
# Compiling the step shapes (LLVM), XLA's thread pools and allocator slack, the tokenizer.
MARGIN = 512 * MiB


def test_a_max_model_len_prompt_completes_within_the_planned_memory(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "long_prompt.py")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}  # one CPU device
    proc = subprocess.run([sys.executable, script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fig = json.loads(proc.stdout.strip().splitlines()[-1])
    rep = fig["report"]
    planned = rep["weights"] + rep["profile_peak"] + rep["kv_pool"]
    temp = fig["largest_step_temp"]
    # + the loader's host copy of the model
    bound = fig["base_rss"] + planned + rep["weights"] + MARGIN
    FIGURES.append(
        f"8191-token prompt, default config (CPU): {fig['seconds']:.0f} s; peak RSS "
        f"{fig['peak_rss'] / MiB:.0f} MiB, bound {bound / MiB:.0f} MiB (runtime "
        f"{fig['base_rss'] / MiB:.0f} + planner {planned / MiB:.0f} + model "
        f"{rep['weights'] / MiB:.0f} + margin {MARGIN / MiB:.0f}); largest step's buffers "
        f"{temp / MiB:.0f} MiB at 8192 tokens of context, {fig['short_context_step_temp'] / MiB:.0f}"
        f" MiB at 16; activation reserve {rep['profile_peak'] / MiB:.0f} MiB")
    assert fig["error"] is None and fig["output_tokens"] == 1, fig  # max_model_len leaves one
    assert fig["finish_reason"] == "length"
    assert fig["prompt_tokens"] == 8191
    assert fig["peak_rss"] < bound, (fig["peak_rss"] / MiB, bound / MiB)
    # Attention's memory does not grow with the context: the step over 8192 tokens of context
    # needs the buffers of one over 16, plus its wider block tables.
    assert temp - fig["short_context_step_temp"] < 16 * MiB
    # The activation reserve covers the largest step's buffers (XLA:CPU's among them: it copies
    # the fused gate/up weights into the layout its matmul wants, inside the step).
    assert temp <= rep["profile_peak"], (temp / MiB, rep["profile_peak"] / MiB)
