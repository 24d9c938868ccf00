"""Tensor parallelism with JAX's own SPMD: a one-axis ``Mesh``, parameters named by logical axes,
ONE rules table from logical axes to mesh axes, and ``shard_map`` only around attention.

Megatron's layout, written as data: q/k/v and gate/up are split by their output (heads, MLP
columns), o_proj and down_proj by their input, embedding and LM head by vocabulary rows; norms are
replicated. q/k/v and gate/up run fused (``qkv_proj``, ``gate_up_proj``: pagedjax/models/fused.py),
one block of rows per device on a leading axis, which is the axis split. The KV pool is split by KV
head, so each device's attention reads only its own pages.
jit propagates these shardings through the step and XLA inserts the collectives (an all-reduce
after o_proj and after down_proj, an all-gather of the logits); nothing here calls one by hand.

When tp exceeds the KV heads (Qwen2.5-7B has 4), the k/v projections are expanded by repeating
each head so that every device holds one: query head i still reads the copy of its own KV head.

Letters: T tokens, N query heads, K KV heads, H head dim, D model dim, F MLP dim, V vocab.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from pagedjax.planning.memory_report import kv_heads_per_device, per_device_config
from pagedjax.models import ModelConfig, StepMeta
from pagedjax.models.fused import fuse_projections, qkv_parts

logger = logging.getLogger(__name__)

TP = "tp"

# The one rules table: logical axis -> mesh axis (None: replicated on every device).
RULES: tuple[tuple[str, str | None], ...] = (
    ("vocab", TP),
    ("heads", TP),  # query heads (the flattened N*H rows of q_proj, columns of o_proj)
    ("kv_heads", TP),
    ("mlp", TP),
    ("shards", TP),  # the leading axis of a fused projection: one block of rows per device
    ("fused", None),  # the rows of one block of a fused projection (its heads / MLP columns)
    ("embed", None),
    ("head_dim", None),
    ("tokens", None),
    ("blocks", None),
    ("block", None),
)

# Parameters by their last two Hugging Face path names; weights are [out, in].
PARAM_AXES: dict[tuple[str, str], tuple[str, ...]] = {
    ("embed_tokens", "weight"): ("vocab", "embed"),
    ("lm_head", "weight"): ("vocab", "embed"),
    ("q_proj", "weight"): ("heads", "embed"),
    ("q_proj", "bias"): ("heads",),
    ("k_proj", "weight"): ("kv_heads", "embed"),
    ("k_proj", "bias"): ("kv_heads",),
    ("v_proj", "weight"): ("kv_heads", "embed"),
    ("v_proj", "bias"): ("kv_heads",),
    ("qkv_proj", "weight"): ("shards", "fused", "embed"),  # pagedjax/models/fused.py
    ("qkv_proj", "bias"): ("shards", "fused"),
    ("self_attn", "k_scale"): ("kv_heads",),  # fp8 KV cache scales (pagedjax/models/kv_scales.py)
    ("self_attn", "v_scale"): ("kv_heads",),
    ("o_proj", "weight"): ("embed", "heads"),
    ("o_proj", "bias"): ("embed",),
    ("gate_proj", "weight"): ("mlp", "embed"),
    ("up_proj", "weight"): ("mlp", "embed"),
    ("gate_up_proj", "weight"): ("shards", "fused", "embed"),
    ("down_proj", "weight"): ("embed", "mlp"),
    # fp8 weights' per-output-channel scales (pagedjax/models/fp8.py) split with their rows
    ("q_proj", "weight_scale"): ("heads",),
    ("k_proj", "weight_scale"): ("kv_heads",),
    ("v_proj", "weight_scale"): ("kv_heads",),
    ("qkv_proj", "weight_scale"): ("shards", "fused"),
    ("o_proj", "weight_scale"): ("embed",),
    ("gate_proj", "weight_scale"): ("mlp",),
    ("up_proj", "weight_scale"): ("mlp",),
    ("gate_up_proj", "weight_scale"): ("shards", "fused"),
    ("down_proj", "weight_scale"): ("embed",),
    ("lm_head", "weight_scale"): ("vocab",),
    ("input_layernorm", "weight"): ("embed",),
    ("post_attention_layernorm", "weight"): ("embed",),
    ("norm", "weight"): ("embed",),
}

# Activations and the pool around the attention shard_map.
Q_AXES = ("tokens", "heads", "head_dim")  # q, out: [T, N, H]
KV_AXES = ("tokens", "kv_heads", "head_dim")  # k, v: [T, K, H]
POOL_AXES = ("blocks", "block", "kv_heads", "head_dim")  # pages: [num_blocks, block_size, K, H]


def logical_to_spec(axes: Sequence[str], rules=RULES) -> P:
    """PartitionSpec of an array whose dims carry ``axes``. Raises ValueError on a logical axis
    without a rule, or when two dims would map to the same mesh axis (a collision: XLA cannot
    shard one array twice over one axis)."""
    table = dict(rules)
    out, used = [], {}
    for name in axes:
        if name not in table:
            raise ValueError(f"logical axis {name!r} has no rule in the sharding rules table; "
                             f"known: {sorted(table)}")
        mesh_axis = table[name]
        if mesh_axis is not None:
            if mesh_axis in used:
                raise ValueError(f"logical axes {used[mesh_axis]!r} and {name!r} both map to mesh "
                                 f"axis {mesh_axis!r} in one array {tuple(axes)}: fix the rules")
            used[mesh_axis] = name
        out.append(mesh_axis)
    return P(*out)


def make_mesh(tp: int, devices=None) -> Mesh:
    """A 1-D mesh over the first ``tp`` devices, axis ``"tp"``, in Auto mode (shardings are hints
    that jit propagates, not part of the types)."""
    devices = list(jax.devices() if devices is None else devices)[:tp]
    return Mesh(np.array(devices), (TP,), axis_types=(AxisType.Auto,))


def check_tp(cfg: ModelConfig, tp: int) -> None:
    """ValueError that says what to change unless ``tp`` devices can split this model."""
    n_dev = jax.device_count()
    if tp > n_dev:
        raise ValueError(
            f"--tensor-parallel-size {tp} needs {tp} devices but JAX sees {n_dev} "
            f"({jax.devices()[0].platform}): lower --tensor-parallel-size to at most {n_dev}, or "
            f"add devices (--distributed for more hosts; on the CPU, "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={tp})")
    per_device_config(cfg, tp)  # heads divisible by tp; KV heads split or replicate evenly


def param_logical_axes(params) -> Any:
    """The pytree of logical-axis tuples, one per parameter (ValueError on an unknown one)."""
    def axes(path, x):
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        names = [n for n in names if isinstance(n, str)]
        key = tuple(names[-2:])
        if key not in PARAM_AXES:
            raise ValueError(f"no logical axes for parameter {'.'.join(names)}: add it to "
                             f"pagedjax.worker.sharding.PARAM_AXES")
        if len(PARAM_AXES[key]) != np.ndim(x):
            raise ValueError(f"parameter {'.'.join(names)} has shape {np.shape(x)}, but its "
                             f"logical axes are {PARAM_AXES[key]}")
        return PARAM_AXES[key]

    return jax.tree_util.tree_map_with_path(axes, params)


def param_shardings(cfg: ModelConfig, params, mesh: Mesh) -> Any:
    """NamedSharding per parameter (``params`` may be arrays or ShapeDtypeStructs, so a loader
    can materialise each shard in place). A dim that the mesh axis does not divide evenly (an odd
    vocabulary) is replicated instead, with a warning."""
    tp = mesh.shape[TP]
    if cfg.num_key_value_heads % tp:
        raise ValueError(f"{cfg.num_key_value_heads} KV heads do not split over {tp} devices: "
                         "expand them first with replicate_kv_heads")
    is_axes = lambda x: isinstance(x, tuple) and all(isinstance(a, str) for a in x)  # noqa: E731
    logical = param_logical_axes(params)

    def sharding(axes, x):
        spec = list(logical_to_spec(axes))
        for i, (dim, mesh_axis) in enumerate(zip(np.shape(x), spec)):
            if mesh_axis is not None and dim % mesh.shape[mesh_axis]:
                logger.warning("dim %d (%s, size %d) does not split over %d devices: replicated",
                               i, axes[i], dim, mesh.shape[mesh_axis])
                spec[i] = None
        return NamedSharding(mesh, P(*spec))

    return jax.tree.map(sharding, logical, params, is_leaf=is_axes)


def pool_sharding(mesh: Mesh) -> NamedSharding:
    """Every layer's k_pages / v_pages [num_blocks, block_size, K, H], split by KV head."""
    return NamedSharding(mesh, logical_to_spec(POOL_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def replicate_kv_heads(cfg: ModelConfig, params, tp: int) -> tuple[ModelConfig, Any]:
    """(cfg, params) with each KV head repeated so the KV head count is a multiple of ``tp``
    (unchanged when it already is). Head j of K becomes heads j*r .. j*r + r - 1 of K*r, so the
    query heads of group j (N/K of them, now split over r devices) each find their own copy.

    When it expands, the tree is new down to each layer's ``self_attn``, whose q/k/v are new
    arrays (k/v expanded, q copied; read from either layout, pagedjax/models/fused.py):
    fuse_projections may consume them and the caller's own self_attn stays as it was. The mlp dicts
    are shared."""
    k, h = cfg.num_key_value_heads, cfg.head_dim
    k_new = kv_heads_per_device(cfg, tp) * tp
    if k_new == k:
        return cfg, params
    r = k_new // k
    logger.info("tensor parallel %d > %d KV heads: each KV head is replicated on %d devices "
                "(k/v projections expanded to %d heads, %d per device; the KV pool stores the "
                "copies, so it holds %dx the K/V bytes of an unsplit model)", tp, k, r, k_new,
                k_new // tp, r)

    def expand(w):  # [K*H, ...] -> [K*r*H, ...]
        w = w.reshape(k, h, *w.shape[1:])
        return jnp.repeat(w, r, axis=0).reshape(k_new * h, *w.shape[2:])

    layers = []
    for layer in params["model"]["layers"]:
        proj = qkv_parts(cfg, layer["self_attn"])
        attn = {name: x for name, x in layer["self_attn"].items() if name != "qkv_proj"}
        attn["q_proj"] = jax.tree.map(jnp.copy, proj["q_proj"])
        for name in ("k_proj", "v_proj"):
            attn[name] = {key: expand(v) for key, v in proj[name].items()}
        layers.append({**layer, "self_attn": attn})
    params = {**params, "model": {**params["model"], "layers": layers}}
    return dataclasses.replace(cfg, num_key_value_heads=k_new), params


@dataclasses.dataclass(frozen=True)
class TensorParallel:
    """What the engine runs under ``--tensor-parallel-size``: the mesh (None at tp 1), the model
    config and params the step sees (KV heads expanded when tp > K; params already sharded, so
    that the engine measures device memory after placement; q/k/v and gate/up fused for tp
    devices, pagedjax/models/fused.py)."""

    tp: int
    mesh: Mesh | None
    cfg: ModelConfig
    params: Any

    @classmethod
    def build(cls, cfg: ModelConfig, params, tp: int, consume: bool = False) -> "TensorParallel":
        """The one place the engine's params are prepared; ``params`` stays as it was unless
        ``consume`` (the engine loaded them itself: fusing then deletes the originals as it goes,
        fuse_projections)."""
        check_tp(cfg, tp)
        run_cfg = cfg
        if params is not None:  # None: a stand-in device without weights
            run_cfg, params = replicate_kv_heads(cfg, params, tp)
            params = fuse_projections(run_cfg, params, tp, consume=consume)
        if tp == 1:
            return cls(1, None, run_cfg, params)
        mesh = make_mesh(tp)
        params = place_params(run_cfg, params, mesh)
        logger.info("tensor parallel %d over %s; per device: %d query heads, %d KV heads, %d MLP "
                    "columns", tp, [str(d) for d in mesh.devices.flat],
                    cfg.num_attention_heads // tp, run_cfg.num_key_value_heads // tp,
                    -(-cfg.intermediate_size // tp))
        return cls(tp, mesh, run_cfg, params)


def place_params(cfg: ModelConfig, params, mesh: Mesh):
    return jax.device_put(params, param_shardings(cfg, params, mesh))


def shard_attend(attend, mesh: Mesh):
    """``attend`` (write K/V, then attend) run per device on its own heads: query heads and KV
    heads are independent, so no collective is needed inside. ``meta`` (a StepMeta) is
    replicated; its static ``decode_only`` rides in the tree structure. check_vma is off because
    Pallas calls carry no varying-axis rules."""
    q_spec, kv_spec, pages_spec = (logical_to_spec(a) for a in (Q_AXES, KV_AXES, POOL_AXES))

    def attend_tp(q, k, v, layer_pages, meta: StepMeta):
        local = jax.shard_map(attend, mesh=mesh,
                              in_specs=(q_spec, kv_spec, kv_spec, (pages_spec, pages_spec), P()),
                              out_specs=(q_spec, (pages_spec, pages_spec)), check_vma=False)
        return local(q, k, v, tuple(layer_pages), meta)

    return attend_tp
