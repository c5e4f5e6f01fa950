"""The one statistic over the vocabulary that every loss needs, in a fast form per platform.

Private to :mod:`rag_jax.marginalize`. For each row of logits it returns the log normaliser
``logsumexp_v logits[v]`` and the target's log-probability. On GPUs and TPUs that is one fused
reduction. XLA's CPU backend evaluates a reduction over the minor axis one element at a time,
so on CPU the rows go through in cache-sized chunks that sum over V with a product with ones,
and the exponentials are shifted by the target's logit instead of the row maximum, which
saves the pass that finds the maxima. BENCHMARKS.md ("Marginalization") has the measurements;
tests/test_marginalize.py runs every loss through both forms.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array

# Rows per CPU chunk: this many float32 entries (4 MiB), so that a chunk stays in cache.
CHUNK_ELEMENTS = 1 << 20


def log_normaliser_and_target(rows: Array, targets: Array) -> tuple[Array, Array]:
    """``[R, V], [R] -> (logsumexp_v rows [R], log softmax(rows)[target] [R])``, float32.

    ``targets`` must lie in ``[0, V)``; the caller makes them so. A row of ``-inf`` gets a log
    normaliser of ``-inf``, not NaN.
    """
    return jax.lax.platform_dependent(rows, targets, cpu=_on_cpu, default=_by_row_max)


def _by_row_max(rows: Array, targets: Array, sum_over_vocab=None) -> tuple[Array, Array]:
    """The textbook form: shift by the row maximum, then ``log Σ exp``."""
    if sum_over_vocab is None:
        sum_over_vocab = functools.partial(jnp.sum, axis=-1)
    rows = rows.astype(jnp.float32)
    row_max = jnp.max(rows, axis=-1)
    shift = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # an all -inf row stays -inf
    log_normaliser = jnp.log(sum_over_vocab(jnp.exp(rows - shift[:, None]))) + shift
    return log_normaliser, _target_logits(rows, targets) - log_normaliser


def _target_logits(rows: Array, targets: Array) -> Array:
    return jnp.take_along_axis(rows, targets[:, None], axis=-1)[:, 0].astype(jnp.float32)


def _sum_by_matmul(x: Array) -> Array:
    """``Σ_v x[..., v]`` as a product with ones: BLAS speed on CPU."""
    return x @ jnp.ones((x.shape[-1],), x.dtype)


def _on_cpu(rows: Array, targets: Array) -> tuple[Array, Array]:
    """Shifted by the target's logit, so ``log p(target) = -log Σ_v exp(rows_v - rows[target])``.

    The target's own term is exactly 1, so the sum cannot underflow; it overflows only where
    some logit exceeds the target's by more than ``log(FLT_MAX / V)`` (~77 for V = 50k), i.e.
    where ``p(target) < e^-77``. If any row does (or holds a NaN or infinite logit), every row
    is recomputed in the textbook form. Under ``vmap`` the ``cond`` becomes a ``select``.
    """
    target_logits = _target_logits(rows, targets)
    shift = jnp.where(jnp.isfinite(target_logits), target_logits, 0.0)

    def shifted_log_sum(rows, shift):  # [r, V], [r] -> [r]
        return jnp.log(_sum_by_matmul(jnp.exp(rows.astype(jnp.float32) - shift[:, None])))

    log_sum = _in_chunks(shifted_log_sum, rows, shift)
    log_normaliser = shift + log_sum
    target_lp = jnp.where(shift == target_logits, -log_sum, target_logits - log_normaliser)

    def by_row_max():
        return _in_chunks(
            lambda r, t: _by_row_max(r, t, _sum_by_matmul), rows, targets, n_outputs=2
        )

    ok = jnp.all(jnp.isfinite(log_normaliser))
    return jax.lax.cond(ok, lambda: (log_normaliser, target_lp), by_row_max)


def _in_chunks(fn, rows: Array, per_row: Array, n_outputs: int = 1):
    """``fn(rows, per_row)`` a chunk of rows at a time (``[R, V], [R] -> [R]`` or a tuple).

    The last chunk is shifted back to end at the last row rather than padded: rows it shares
    with the chunk before are recomputed to the same values.
    """
    n_rows, vocab_size = rows.shape
    size = max(1, min(n_rows, CHUNK_ELEMENTS // vocab_size))

    def one_chunk(i, outputs):
        start = jnp.minimum(i * size, n_rows - size)
        piece = jax.lax.dynamic_slice_in_dim(rows, start, size)
        values = fn(piece, jax.lax.dynamic_slice_in_dim(per_row, start, size))
        values = values if n_outputs > 1 else (values,)
        return tuple(
            jax.lax.dynamic_update_slice_in_dim(out, v, start, 0)
            for out, v in zip(outputs, values, strict=True)
        )

    init = tuple(jnp.zeros((n_rows,), jnp.float32) for _ in range(n_outputs))
    outputs = jax.lax.fori_loop(0, -(-n_rows // size), one_chunk, init)
    return outputs if n_outputs > 1 else outputs[0]
