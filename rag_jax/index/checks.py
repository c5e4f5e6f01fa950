"""Argument checks shared by the index's entry points, run before any work or backend sees them.

Every check raises ``ValueError`` naming the parameter, so the API and the command line report
bad input the same way, and before a corpus is encoded or a native library (ScaNN) is called.

Shapes (the project's legend: B batch, K docs per question, W beams, S source length, T target
length, V vocabulary, H hidden, N corpus size, R flattened rows): B queries, N passages, H vector
size, k results per query.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def positive_int(name: str, value: Any, *, minimum: int = 1, allow_none: bool = False) -> None:
    """Raises ValueError unless ``value`` is an integer >= ``minimum`` (or None if allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_search_args(queries: Any, k: Any, dim: int, n_passages: int) -> None:
    """The one rule every backend applies to a search, before the backend sees it.

    Args:
      queries: (B, H) query vectors; B may be 0. Values must be finite; this is checked only
        for concrete arrays (inside ``jit`` the values are unknown; non-finite queries there
        give undefined ids and NaN scores).
      k: neighbours per query, an integer in [1, N].
      dim: H, the index's vector size.
      n_passages: N, the number of indexed passages.

    Raises:
      ValueError: naming ``k`` or ``queries``: a non-integer or out-of-range k; queries of
        another rank or dim, of a non-numeric dtype, or holding NaN/inf (the first bad row).
    """
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise ValueError(f"k must be an integer, got {k!r}")
    if not 1 <= k <= n_passages:
        raise ValueError(
            f"k must be in [1, {n_passages}] for an index of {n_passages} passages, got {k}"
        )
    shape = np.shape(queries)
    if len(shape) != 2 or shape[1] != dim:
        raise ValueError(f"queries must have shape (B, {dim}), got {shape}")
    dtype = getattr(queries, "dtype", None)
    dtype = np.asarray(queries).dtype if dtype is None else np.dtype(dtype)
    if not (jax.dtypes.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)):
        raise ValueError(f"queries must be numeric, got dtype {dtype}")
    if isinstance(queries, jax.core.Tracer):
        return
    finite = np.isfinite(np.asarray(queries, np.float32)).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise ValueError(
            f"queries hold NaN or inf ({int((~finite).sum())} of {len(finite)} rows, the first "
            f"row {row}): check the query encoder"
        )
