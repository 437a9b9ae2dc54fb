"""Splash attention: JAX's Pallas (Mosaic) flash-attention kernel for TPU, behind ``layers.attention``.

Chosen per run (``config.attention="splash"``, ``bench --attention=splash``) it computes the LLM's
causal self-attention over a chunk (training, scoring; not the KV-cache decode path) and unmasked full
attention (vision towers, perceiver); any other mask stays on XLA. What the kernel asks for:

- **no dense mask**: causality is a static ``CausalMask`` (``LocalMask`` with a sliding window) and key
  padding becomes segment ids (0: padding; 1, or in packed rows 1, 2, ... one per example). A query
  attends keys of its own segment, so a packed example never sees another and a padding query sees
  padding keys (its output is never read): no row is ever empty.
- **lengths in whole blocks**: sequences are padded to a multiple of 128 (the padding is segment 0)
  and each block is the largest of 512, 256, 128 dividing the padded length.
- **grouped-query attention** is native: ``N`` query heads over ``K`` kv heads, ``N % K == 0``.
- **no scaling**: queries are scaled by ``1/sqrt(head_dim)`` here.
- **sharding**: a Pallas call is opaque to XLA's partitioner (it would gather every input to every
  chip), so under a mesh it runs in ``shard_map``: batch over ``act_batch``'s mesh axes and heads over
  ``act_heads``' (from the logical rules in force), each only where it divides.

``interpret=True`` runs the kernel in the Pallas interpreter (any backend; how the tests check it on CPU).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
from jax.sharding import PartitionSpec

LANES = 128  # sequence lengths and blocks come in multiples of the TPU's 128 lanes
BLOCKS = (512, 256, 128)  # tried largest first


def block_size(length: int) -> int:
    """The largest of ``BLOCKS`` dividing ``length`` (a multiple of ``LANES``)."""
    return next(b for b in BLOCKS if length % b == 0)


@functools.lru_cache(maxsize=64)
def make_kernel(heads: int, q_len: int, kv_len: int, causal: bool, window: int | None, interpret: bool):
    """The kernel for one sequence: ``q [heads, q_len, H]``, ``k, v [kv_heads, kv_len, H]``. The mask's
    block structure is worked out here, in numpy, once per shape."""
    shape = (q_len, kv_len)
    if window is not None:  # causal_mask's window: q - window < k <= q
        head_mask = mask_lib.LocalMask(shape, window_size=(window - 1, 0), offset=0)
    elif causal:
        head_mask = mask_lib.CausalMask(shape)
    else:
        head_mask = mask_lib.FullMask(shape)
    # every query block (forward, dkv and dq passes) spans bq queries, every key/value block bkv keys
    q_blocks = dict.fromkeys(("block_q", "block_q_dkv", "block_q_dq"), block_size(q_len))
    kv_fields = ("block_kv", "block_kv_compute", "block_kv_dkv", "block_kv_dkv_compute", "block_kv_dq")
    blocks = kernel_lib.BlockSizes(**q_blocks, **dict.fromkeys(kv_fields, block_size(kv_len)))
    with jax.ensure_compile_time_eval():  # concrete mask arrays, not the caller's tracers: cacheable
        return kernel_lib.make_splash_mha(
            mask_lib.MultiHeadMask([head_mask] * heads),
            block_sizes=blocks,
            head_shards=1,
            q_seq_shards=1,
            interpret=interpret,
        )


def _pad(x, length: int, axis: int = 1):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, widths)


def _local(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, *segments, causal, window, interpret):
    """One shard: the kernel vmapped over the batch, heads moved in front of the sequence.
    ``segments``: none, or the query and key segment ids ``[B, T]``, ``[B, S]``."""
    heads, q_len, kv_len = q_BxTxNxH.shape[2], q_BxTxNxH.shape[1], k_BxSxKxH.shape[1]
    kernel = make_kernel(heads, q_len, kv_len, causal, window, interpret)
    to_heads = lambda x: x.transpose(1, 0, 2)  # noqa: E731  [T, N, H] <-> [N, T, H]

    def one(q, k, v, *seg):
        segment_ids = kernel_lib.SegmentIds(*seg) if seg else None
        return to_heads(kernel(to_heads(q), to_heads(k), to_heads(v), segment_ids=segment_ids))

    return jax.vmap(one)(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, *segments)


def active_mesh():
    """The mesh a step is being traced under: ``jax.set_mesh``'s, or the legacy ``with mesh:`` that
    ``train.Trainer`` uses (which sets no abstract mesh); None outside both."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        return mesh
    from jax._src import mesh as mesh_lib_  # jax 0.10 has no public accessor for the legacy context

    physical = mesh_lib_.thread_resources.env.physical_mesh
    return None if physical.empty else physical


def _mesh_axes(logical: str, mesh, *sizes: int):
    """The mesh axes the rules give ``logical``, if they divide every one of ``sizes``; else None."""
    rule = nn.logical_to_mesh_axes((logical,))[0]
    names = tuple(a for a in ((rule,) if isinstance(rule, str) else (rule or ())) if a in mesh.axis_names)
    n = math.prod(mesh.shape[a] for a in names)
    return names if names and all(s % n == 0 for s in sizes) else None


def splash_attention(
    q_BxTxNxH,
    k_BxSxKxH,
    v_BxSxKxH,
    key_valid_BxS=None,
    *,
    causal: bool,
    sliding_window: int | None = None,
    interpret: bool = False,
):
    """``softmax(q k^T / sqrt(H)) v`` over the keys each query may see: causal (and within
    ``sliding_window``) if asked, never a key where ``key_valid`` is 0; in causal self-attention
    ``key_valid`` may be segment ids (packed rows): a query sees only keys of its own segment.
    Returns ``[B, T, N, H]`` in ``q``'s dtype; rows of padding queries are unspecified."""
    b, t, n, h = q_BxTxNxH.shape
    s, kv_heads = k_BxSxKxH.shape[1], k_BxSxKxH.shape[2]
    if n % kv_heads:
        raise ValueError(f"splash attention: {n} query heads are not a multiple of {kv_heads} kv heads")
    if causal and s != t:
        raise ValueError(
            f"splash attention: causal self-attention needs as many keys as queries ({s} != {t})"
        )
    t_pad, s_pad = -(-t // LANES) * LANES, -(-s // LANES) * LANES
    q = _pad(q_BxTxNxH * jnp.asarray(h**-0.5, q_BxTxNxH.dtype), t_pad)
    k, v = _pad(k_BxSxKxH, s_pad), _pad(v_BxSxKxH, s_pad)
    segments = ()
    if key_valid_BxS is not None or t_pad != t or s_pad != s:
        valid = jnp.ones((b, s), jnp.int32) if key_valid_BxS is None else key_valid_BxS.astype(jnp.int32)
        seg_kv = _pad(valid, s_pad)
        # a query's segment: its own key's in self-attention, else 1 (0 for the queries added as padding)
        segments = (seg_kv if causal else _pad(jnp.ones((b, t), jnp.int32), t_pad), seg_kv)
    local = functools.partial(_local, causal=causal, window=sliding_window, interpret=interpret)
    mesh = active_mesh()
    if mesh is not None:
        batch = _mesh_axes("act_batch", mesh, b)
        heads = _mesh_axes("act_heads", mesh, n, kv_heads)
        qkv, seg = PartitionSpec(batch, None, heads, None), PartitionSpec(batch, None)
        specs = (qkv, qkv, qkv) + (seg,) * len(segments)
        local = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=qkv, check_vma=False)
    return local(q, k, v, *segments)[:, :t]
