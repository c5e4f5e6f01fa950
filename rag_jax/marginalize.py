"""The paper's math as pure functions: retriever scores and both marginalizations.

Everything here is plain ``jax.numpy``: no Flax, no state, no Python loops over the batch
or the documents, so each function can be jitted, vmapped and differentiated, and reused
in any JAX model. Shapes use the project's legend: B batch, K documents per question
(``n_docs``), T target length, V vocabulary, H hidden (embedding) size.

Three conventions hold throughout:

* ``logits[b, k, t]`` is the generator's prediction for ``targets[b, t]`` given document
  ``k``: inputs are already aligned, nothing is shifted inside. (transformers' ``get_nll``
  instead receives the decoder *inputs* and shifts them left by one.)
* ``doc_scores`` are raw retriever scores ``d(z)·q(x)``; they are normalised inside with a
  log-softmax over the K documents. A missing or padded document has score ``-inf``: it
  gets probability zero and produces neither NaN values nor NaN gradients.
* A masked target position contributes nothing, whatever id it holds. The losses check
  shapes and ``label_smoothing`` at trace time (``ValueError`` naming the parameter) and,
  outside ``jit``, that unmasked target ids lie in ``[0, V)``; under ``jit`` such an id
  gives NaN rather than the log-probability of another token. A row without any document
  gets loss 0 and zero gradients (see :func:`has_documents`).

All reductions run in float32, whatever the input dtype (bf16 logits are fine).

Reference: Lewis et al., "Retrieval-Augmented Generation for Knowledge-Intensive NLP
Tasks", NeurIPS 2020 (arXiv:2005.11401), section 2.1 (the two models) and 2.4 (decoding).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from rag_jax import _vocab_stats

Array = jax.Array

__all__ = [
    "doc_log_probs",
    "has_documents",
    "rag_sequence_log_likelihood",
    "rag_sequence_nll",
    "rag_token_log_likelihood",
    "rag_token_log_probs",
    "rag_token_nll",
    "retriever_log_probs",
    "retriever_scores",
    "target_log_probs",
]


# --------------------------------------------------------------------------------------
# Retriever: p_eta(z|x) ∝ exp(d(z)·q(x))
# --------------------------------------------------------------------------------------


def retriever_scores(query_emb: Array, doc_emb: Array) -> Array:
    """Inner-product retrieval scores ``d(z)·q(x)`` (DPR, eq. before (1) in the paper).

    Args:
      query_emb: ``[B, H]`` query vectors ``q(x) = BERT_q(x)``.
      doc_emb: ``[B, K, H]`` vectors ``d(z) = BERT_d(z)`` of each input's K retrieved docs.

    Returns:
      ``[B, K]`` float32 scores.

    Raises:
      ValueError: if the shapes are not ``[B, H]`` and ``[B, K, H]``.
    """
    if jnp.ndim(query_emb) != 2 or jnp.ndim(doc_emb) != 3:
        raise ValueError(
            f"query_emb must be [B, H] and doc_emb [B, K, H], got {jnp.shape(query_emb)} and "
            f"{jnp.shape(doc_emb)}"
        )
    B, H = query_emb.shape
    _check_shapes("query_emb [B, H]", (B, H), doc_emb=(doc_emb, (B, doc_emb.shape[1], H)))
    return jnp.einsum("bh,bkh->bk", query_emb, doc_emb, preferred_element_type=jnp.float32).astype(
        jnp.float32
    )


def doc_log_probs(doc_scores: Array) -> Array:
    """Log retriever probabilities ``log p_eta(z|x)``: a log-softmax over the K documents.

    ``-inf`` scores (missing documents) get log-probability ``-inf``. A row whose scores are
    all ``-inf`` gets ``-inf`` everywhere instead of NaN.

    Args:
      doc_scores: ``[..., K]`` raw scores.

    Returns:
      ``[..., K]`` float32 log-probabilities.
    """
    doc_scores = doc_scores.astype(jnp.float32)
    # jax.nn.logsumexp returns -inf (not NaN) for an all -inf row and has finite gradients.
    log_normaliser = jax.nn.logsumexp(doc_scores, axis=-1, keepdims=True)
    safe_normaliser = jnp.where(jnp.isfinite(log_normaliser), log_normaliser, 0.0)
    return doc_scores - safe_normaliser


def retriever_log_probs(query_emb: Array, doc_emb: Array, doc_mask: Array | None = None) -> Array:
    """``log p_eta(z|x)`` over the top-K documents, ``p_eta(z|x) ∝ exp(d(z)·q(x))``.

    Args:
      query_emb: ``[B, H]`` query vectors.
      doc_emb: ``[B, K, H]`` document vectors.
      doc_mask: optional ``[B, K]`` bool, ``False`` for padding documents, which get
        log-probability ``-inf``.

    Returns:
      ``[B, K]`` float32 log-probabilities; each row's ``exp`` sums to one.

    Example (course, lesson 2): ``q = [0.3, 0.8, 0.1]`` against three documents gives
    scores ``[0.70, 0.55, 0.27]`` and probabilities ``≈ [0.398, 0.343, 0.259]``.
    """
    doc_scores = retriever_scores(query_emb, doc_emb)
    if doc_mask is not None:
        doc_scores = jnp.where(doc_mask, doc_scores, -jnp.inf)
    return doc_log_probs(doc_scores)


# --------------------------------------------------------------------------------------
# Generator: log p_theta(y_t | x, z, y_<t) without a [B, K, T, V] log-softmax
# --------------------------------------------------------------------------------------


def target_log_probs(logits: Array, targets: Array) -> Array:
    """Log-probability of each target token, ``log softmax(logits)[target]``.

    Computed as ``logits[target] - logsumexp(logits)``: a gather and a reduction over V,
    so no ``[..., V]`` log-softmax is ever stored; the gradient
    ``onehot(target) - softmax(logits)`` is recomputed from the saved ``[...]`` normaliser
    and written straight into the ``[..., V]`` cotangent.

    Args:
      logits: ``[..., T, V]`` generator logits (any float dtype).
      targets: ``[..., T]`` int token ids, broadcastable against ``logits[..., 0]``
        (e.g. ``[B, 1, T]`` against ``[B, K, T, V]``).

    Returns:
      ``[..., T]`` float32 log-probabilities; NaN for an id outside ``[0, V)`` (never the
      log-probability of another token). Reverse-mode differentiable (``grad``, ``vjp``);
      forward-mode (``jvp``) is not defined.

    Raises:
      ValueError: if ``targets`` does not broadcast against ``logits[..., 0]``.
    """
    try:
        targets = jnp.broadcast_to(targets, jnp.shape(logits)[:-1])
    except ValueError:
        raise ValueError(
            f"targets of shape {jnp.shape(targets)} do not broadcast against logits[..., 0] "
            f"of shape {jnp.shape(logits)[:-1]} (logits are [..., T, V])"
        ) from None
    in_vocab = (targets >= 0) & (targets < logits.shape[-1])
    token_lp = _log_softmax_stats(logits, jnp.where(in_vocab, targets, 0), False)[0]
    return jnp.where(in_vocab, token_lp, jnp.nan)


def _add_at_targets(grad: Array, targets: Array, values: Array) -> Array:
    """``grad[..., targets] += values``: the ``onehot(target)`` part of a softmax gradient.

    A scatter of the ``[...]`` values into the finished ``[..., V]`` gradient, in place,
    rather than a one-hot built by comparing every entry with the target, which costs a
    pass over ``[..., V]`` (BENCHMARKS.md, "Marginalization").

    Args:
      grad: ``[..., V]``.
      targets: int ids, broadcastable against ``grad[..., 0]``.
      values: ``[...]``, broadcastable likewise.
    """
    batch_shape = grad.shape[:-1]
    targets = jnp.broadcast_to(targets, batch_shape)
    values = jnp.broadcast_to(values, batch_shape).astype(grad.dtype)

    def add_one(row, target, value):  # [V], [], []
        return row.at[target].add(value)

    # vmapped over the leading axes, not flattened: a scatter with batch dimensions, so a
    # batch axis sharded over devices stays sharded (flat row indices made XLA gather it).
    for _ in batch_shape:
        add_one = jax.vmap(add_one)
    return add_one(grad, targets, values)


# The two functions below have hand-written VJPs for memory: left to autodiff, XLA keeps
# exp(logits - lse) from the forward pass as a second [..., V] buffer beside the cotangent.
# Each returns everything a loss needs from the [..., V] logits, so that the whole gradient
# is written by one fused pass into one buffer.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _log_softmax_stats(
    logits: Array, targets: Array, with_vocab_sum: bool
) -> tuple[Array, Array | None]:
    """``[..., V], [...] -> (log p(target) [...], Σ_v log p(v) [...] or None)``.

    ``p = softmax(logits)``; ``targets`` lie in ``[0, V)``; the second output (label
    smoothing's term) only when ``with_vocab_sum``.
    """
    return _log_softmax_stats_fwd(logits, targets, with_vocab_sum)[0]


def _log_softmax_stats_fwd(logits, targets, with_vocab_sum):
    batch_shape, vocab_size = logits.shape[:-1], logits.shape[-1]
    rows = logits.reshape(-1, vocab_size)
    log_normaliser, target_lp = _vocab_stats.log_normaliser_and_target(rows, targets.reshape(-1))
    log_normaliser = log_normaliser.reshape(batch_shape)
    vocab_sum = None
    if with_vocab_sum:  # Σ_v log softmax(x)_v = Σ_v x_v - V·logsumexp(x)
        logit_sums = jnp.dot(
            rows, jnp.ones((vocab_size,), rows.dtype), preferred_element_type=jnp.float32
        )
        vocab_sum = logit_sums.reshape(batch_shape) - vocab_size * log_normaliser
    return (target_lp.reshape(batch_shape), vocab_sum), (logits, targets, log_normaliser)


def _log_softmax_stats_bwd(with_vocab_sum, residuals, cotangents):
    logits, targets, log_normaliser = residuals
    d_target = cotangents[0]
    softmax = jnp.exp(logits.astype(jnp.float32) - log_normaliser[..., None])  # recomputed
    grad = -d_target[..., None] * softmax
    if with_vocab_sum:
        grad += cotangents[1][..., None] * (1.0 - logits.shape[-1] * softmax)
    return _add_at_targets(grad, targets, d_target).astype(logits.dtype), None


_log_softmax_stats.defvjp(_log_softmax_stats_fwd, _log_softmax_stats_bwd)


@jax.custom_vjp
def _rag_token_stats(logits: Array, doc_lp: Array, targets: Array) -> tuple[Array, Array]:
    """``[B,K,T,V], [B,K], [B,T] -> (log p(y_t|z) [B,K,T], Σ_v log p'(v|x,y_<t) [B,T])``.

    ``p'`` is RAG-Token's marginal ``Σ_z p(z|x) p(v|x,z,y_<t)``; its sum over V is label
    smoothing's term, the one quantity that needs every vocabulary entry of the marginal.
    """
    return _rag_token_stats_fwd(logits, doc_lp, targets)[0]


def _rag_token_stats_fwd(logits, doc_lp, targets):
    B, K, T, V = logits.shape
    doc_targets = jnp.broadcast_to(targets[:, None, :], (B, K, T))
    log_normaliser, target_lp = _vocab_stats.log_normaliser_and_target(
        logits.reshape(-1, V), doc_targets.reshape(-1)
    )
    log_normaliser = log_normaliser.reshape(B, K, T)
    joint = doc_lp[:, :, None, None] + logits.astype(jnp.float32) - log_normaliser[..., None]
    marginal = jax.nn.logsumexp(joint, axis=1)  # log p'(v|x,y_<t), (B, T, V)
    # Σ_v p(z_k | x, y_<t, y_t = v): the gradient of Σ_v marginal w.r.t. log p(z_k|x).
    posterior_mass = jnp.sum(jnp.exp(joint - marginal[:, None]), axis=-1)  # (B, K, T)
    outputs = (target_lp.reshape(B, K, T), jnp.sum(marginal, axis=-1))
    return outputs, (logits, doc_lp, targets, log_normaliser, marginal, posterior_mass)


def _rag_token_stats_bwd(residuals, cotangents):
    logits, doc_lp, targets, log_normaliser, marginal, posterior_mass = residuals
    d_target, d_vocab_sum = cotangents  # (B, K, T), (B, T)
    log_softmax = logits.astype(jnp.float32) - log_normaliser[..., None]  # (B, K, T, V)
    softmax = jnp.exp(log_softmax)
    # posterior[b,k,t,v] = p(z_k | x, y_<t, y_t = v) = d marginal[v] / d log p(v|z_k).
    posterior = jnp.exp(doc_lp[:, :, None, None] + log_softmax - marginal[:, None])
    grad = -d_target[..., None] * softmax + d_vocab_sum[:, None, :, None] * (
        posterior - softmax * posterior_mass[..., None]
    )
    grad = _add_at_targets(grad, targets[:, None], d_target)
    d_doc_lp = jnp.sum(d_vocab_sum[:, None, :] * posterior_mass, axis=-1)  # (B, K)
    return grad.astype(logits.dtype), d_doc_lp.astype(doc_lp.dtype), None


_rag_token_stats.defvjp(_rag_token_stats_fwd, _rag_token_stats_bwd)


# --------------------------------------------------------------------------------------
# What the losses accept: shapes, target ids, rows without documents
# --------------------------------------------------------------------------------------


def has_documents(doc_scores: Array) -> Array:
    """``[B, K] -> [B]`` bool: whether a row has at least one document (a score not ``-inf``).

    The losses give a row without any document a loss of 0 and zero gradients (its likelihood
    is undefined: no document, no distribution), so it cannot poison a mean over the batch;
    count such rows with ``(~has_documents(doc_scores)).sum()``. A NaN score counts as a
    document, so NaN propagates instead of being hidden.
    """
    return jnp.any(doc_scores != -jnp.inf, axis=-1)


def _check_shapes(name_of_reference: str, reference: tuple, **arrays: tuple) -> None:
    """Raises ValueError unless each ``arrays[name] = (array, expected_shape)`` matches."""
    for name, (array, expected) in arrays.items():
        if jnp.shape(array) != tuple(expected):
            raise ValueError(
                f"{name} has shape {jnp.shape(array)}, expected {tuple(expected)} to match "
                f"{name_of_reference} of shape {reference}"
            )


def _check_loss_args(
    logits: Array, doc_scores: Array, targets: Array, target_mask: Array, label_smoothing: float
) -> None:
    """Trace-time checks of the losses' arguments (shapes, ``label_smoothing``; target ids
    too where they are concrete, i.e. outside ``jit``)."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    if jnp.ndim(logits) != 4:
        raise ValueError(f"logits must be [B, K, T, V], got shape {jnp.shape(logits)}")
    B, K, T, V = logits.shape
    _check_shapes(
        "logits [B, K, T, V]",
        logits.shape,
        doc_scores=(doc_scores, (B, K)),
        targets=(targets, (B, T)),
        target_mask=(target_mask, (B, T)),
    )
    if not jnp.issubdtype(jnp.result_type(targets), jnp.integer):
        raise ValueError(f"targets must be integer token ids, got {jnp.result_type(targets)}")
    if isinstance(targets, jax.core.Tracer) or isinstance(target_mask, jax.core.Tracer):
        return  # under jit: out-of-vocabulary ids give NaN (see _safe_targets)
    targets, target_mask = np.asarray(targets), np.asarray(target_mask, bool)
    bad = np.argwhere(target_mask & ((targets < 0) | (targets >= V)))
    if len(bad):
        b, t = bad[0]
        raise ValueError(
            f"targets[{b}, {t}] = {targets[b, t]} is outside the vocabulary [0, {V}) at an "
            f"unmasked position ({len(bad)} such positions); mask padding with target_mask"
        )


def _safe_targets(targets: Array, target_mask: Array, vocab_size: int) -> tuple[Array, Array]:
    """``(ids to gather, out_of_vocab)``: masked positions read id 0, whatever they hold, and
    an unmasked id outside ``[0, V)`` is flagged (its log-probability becomes NaN) instead
    of being read as another token (a negative id would count from the end)."""
    in_vocab = (targets >= 0) & (targets < vocab_size)
    return jnp.where(in_vocab & target_mask, targets, 0), target_mask & ~in_vocab


def _loss_inputs(logits, doc_scores, targets, target_mask, label_smoothing):
    """The checked, made-safe inputs every loss starts from.

    Returns ``(doc_lp [B,K], targets [B,T], out_of_vocab [B,T], target_mask [B,T],
    has_docs [B])``. A row without documents gets a uniform prior here (finite values and
    gradients) and its loss is zeroed by :func:`_finish`.
    """
    _check_loss_args(logits, doc_scores, targets, target_mask, label_smoothing)
    target_mask = jnp.asarray(target_mask, bool)
    has_docs = has_documents(doc_scores)  # (B,)
    doc_lp = doc_log_probs(jnp.where(has_docs[:, None], doc_scores, 0.0))  # (B, K)
    targets, out_of_vocab = _safe_targets(targets, target_mask, logits.shape[-1])
    return doc_lp, targets, out_of_vocab, target_mask, has_docs


def _finish(nll: Array, has_docs: Array, target_mask: Array) -> Array:
    """Exactly 0 (value and gradients) for a row without documents or without targets."""
    return jnp.where(has_docs & jnp.any(target_mask, axis=-1), nll, 0.0)


# --------------------------------------------------------------------------------------
# RAG-Sequence: p(y|x) = Σ_z p(z|x) Π_t p(y_t|x,z,y_<t)
# --------------------------------------------------------------------------------------


def rag_sequence_log_likelihood(
    token_log_probs: Array, doc_log_prior: Array, target_mask: Array
) -> Array:
    """RAG-Sequence ``log p(y|x) = log Σ_z p(z|x) Π_t p(y_t|x,z,y_<t)`` (paper eq. 1).

    Args:
      token_log_probs: ``[B, K, T]`` ``log p_theta(y_t|x,z_k,y_<t)`` (see
        :func:`target_log_probs`).
      doc_log_prior: ``[B, K]`` ``log p_eta(z_k|x)`` (see :func:`doc_log_probs`); ``-inf``
        for missing documents.
      target_mask: ``[B, T]`` bool, ``False`` at padding.

    Returns:
      ``[B]`` float32 log-likelihoods.

    Raises:
      ValueError: if the shapes do not fit together.
    """
    _check_likelihood_args(token_log_probs, doc_log_prior, target_mask)
    # Masking with `where`, not a product, so a -inf never meets a 0.
    token_log_probs = jnp.where(target_mask[:, None, :], token_log_probs, 0.0)
    seq_log_probs = jnp.sum(token_log_probs.astype(jnp.float32), axis=-1)  # (B, K)
    # The prior counts once per sequence, independent of the target mask.
    return jax.nn.logsumexp(doc_log_prior + seq_log_probs, axis=-1)


def _check_likelihood_args(token_log_probs, doc_log_prior, target_mask) -> None:
    if jnp.ndim(token_log_probs) != 3:
        raise ValueError(f"token_log_probs must be [B, K, T], got {jnp.shape(token_log_probs)}")
    B, K, T = token_log_probs.shape
    _check_shapes(
        "token_log_probs [B, K, T]",
        token_log_probs.shape,
        doc_log_prior=(doc_log_prior, (B, K)),
        target_mask=(target_mask, (B, T)),
    )


def rag_sequence_nll(
    logits: Array,
    doc_scores: Array,
    targets: Array,
    target_mask: Array,
    *,
    label_smoothing: float = 0.0,
) -> Array:
    """RAG-Sequence negative log-likelihood ``-log p(y|x)`` per example (paper eq. 1).

    With ``label_smoothing = eps`` the loss is ``(1 - eps)·nll + (eps / V)·smooth``, where,
    as in transformers' ``RagSequenceForGeneration.get_nll``,
    ``smooth = -log Σ_z exp(V·log p(z|x) + Σ_t Σ_v log p_theta(v|x,z,y_<t))``. Unlike that
    reference, which adds the prior at target position 1 and so drops it when that position
    is padding, the prior here counts exactly once per sequence (and not at all, smoothed or
    not, for an example without any target token).

    Args:
      logits: ``[B, K, T, V]``; ``logits[b, k, t]`` predicts ``targets[b, t]`` given doc k.
      doc_scores: ``[B, K]`` raw retriever scores, ``-inf`` for missing documents.
      targets: ``[B, T]`` int token ids in ``[0, V)``; any id at a masked position.
      target_mask: ``[B, T]`` bool, ``False`` at padding.
      label_smoothing: ``eps`` in ``[0, 1)``.

    Returns:
      ``[B]`` float32 losses. A row without any document (all scores ``-inf``) gets 0 and
      zero gradients (count them with :func:`has_documents`); an unmasked target id outside
      ``[0, V)`` gives NaN under ``jit``.

    Raises:
      ValueError: on shapes that do not fit together, ``label_smoothing`` outside
        ``[0, 1)``, or (outside ``jit``) an unmasked target id outside ``[0, V)``.

    Example (course, lesson 4): priors ``[0.6, 0.4]``, per-token probabilities
    ``[[0.8, 0.9], [0.5, 0.7]]``, so ``p(y|x) = 0.6·0.72 + 0.4·0.35 = 0.572``:

    >>> import jax.numpy as jnp
    >>> token_p = jnp.array([[[0.8, 0.9], [0.5, 0.7]]])  # [B=1, K=2, T=2]
    >>> logits = jnp.log(jnp.stack([token_p, 1 - token_p], -1))  # V=2, targets are id 0
    >>> nll = rag_sequence_nll(logits, jnp.log(jnp.array([[0.6, 0.4]])),
    ...                        jnp.zeros((1, 2), int), jnp.ones((1, 2), bool))
    >>> print(f"{float(jnp.exp(-nll[0])):.3f}")
    0.572
    """
    doc_lp, targets, out_of_vocab, target_mask, has_docs = _loss_inputs(
        logits, doc_scores, targets, target_mask, label_smoothing
    )
    doc_targets = jnp.broadcast_to(targets[:, None, :], logits.shape[:-1])  # (B, K, T)
    token_lp, vocab_sums = _log_softmax_stats(logits, doc_targets, bool(label_smoothing))
    token_lp = jnp.where(out_of_vocab[:, None, :], jnp.nan, token_lp)  # (B, K, T)
    nll = -rag_sequence_log_likelihood(token_lp, doc_lp, target_mask)
    if label_smoothing:
        vocab_size = logits.shape[-1]
        vocab_sums = jnp.where(target_mask[:, None, :], vocab_sums, 0.0)  # (B, K, T)
        smooth = -jax.nn.logsumexp(vocab_size * doc_lp + jnp.sum(vocab_sums, axis=-1), axis=-1)
        nll = (1.0 - label_smoothing) * nll + (label_smoothing / vocab_size) * smooth
    return _finish(nll, has_docs, target_mask)


# --------------------------------------------------------------------------------------
# RAG-Token: p(y|x) = Π_t Σ_z p(z|x) p(y_t|x,z,y_<t)
# --------------------------------------------------------------------------------------


def rag_token_log_likelihood(
    token_log_probs: Array, doc_log_prior: Array, target_mask: Array
) -> Array:
    """RAG-Token ``log p(y|x) = Σ_t log Σ_z p(z|x) p(y_t|x,z,y_<t)`` (paper eq. 2).

    Args:
      token_log_probs: ``[B, K, T]`` ``log p_theta(y_t|x,z_k,y_<t)``.
      doc_log_prior: ``[B, K]`` ``log p_eta(z_k|x)``; ``-inf`` for missing documents.
      target_mask: ``[B, T]`` bool, ``False`` at padding.

    Returns:
      ``[B]`` float32 log-likelihoods.

    Raises:
      ValueError: if the shapes do not fit together.
    """
    _check_likelihood_args(token_log_probs, doc_log_prior, target_mask)
    joint = doc_log_prior[:, :, None] + token_log_probs.astype(jnp.float32)  # (B, K, T)
    marginal = jax.nn.logsumexp(joint, axis=1)  # (B, T)
    return jnp.sum(jnp.where(target_mask, marginal, 0.0), axis=-1)


def rag_token_log_probs(logits: Array, doc_scores: Array) -> Array:
    """Marginal next-token log-probabilities ``log p'(y_t|x,y_<t)`` for beam search.

    ``p'(v) = Σ_z p(z|x) softmax(logits_z)_v`` (paper section 2.4, "RAG-Token"): a
    standard autoregressive distribution, so it plugs into ordinary beam search.

    Args:
      logits: ``[..., K, V]`` next-token logits, one row per document.
      doc_scores: ``[..., K]`` raw retriever scores, ``-inf`` for missing documents.

    Returns:
      ``[..., V]`` float32 log-probabilities (each row's ``exp`` sums to one; ``-inf``
      everywhere for a row without any document).

    Raises:
      ValueError: if ``doc_scores``' shape is not ``logits.shape[:-1]``.
    """
    _check_shapes(
        "logits [..., K, V]", jnp.shape(logits), doc_scores=(doc_scores, jnp.shape(logits)[:-1])
    )
    token_lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # (..., K, V)
    return jax.nn.logsumexp(token_lp + doc_log_probs(doc_scores)[..., None], axis=-2)


def rag_token_nll(
    logits: Array,
    doc_scores: Array,
    targets: Array,
    target_mask: Array,
    *,
    label_smoothing: float = 0.0,
) -> Array:
    """RAG-Token negative log-likelihood ``-log p(y|x)`` per example (paper eq. 2).

    With ``label_smoothing = eps`` the loss is ``(1 - eps)·nll + (eps / V)·smooth``, where,
    as in transformers' ``RagTokenForGeneration.get_nll``,
    ``smooth = -Σ_t Σ_v log p'(v|x,y_<t)`` over unmasked positions, ``p'`` being the
    marginal of :func:`rag_token_log_probs`. Only this smoothing term needs every vocabulary
    entry of the marginal; the plain loss gathers the targets first.

    Args, returns and errors as :func:`rag_sequence_nll`.

    Example (course, lesson 4): priors ``[0.6, 0.4]``, per-token probabilities
    ``[[0.8, 0.9], [0.5, 0.7]]``, so ``p(y|x) = 0.68·0.82 ≈ 0.558``:

    >>> import jax.numpy as jnp
    >>> token_p = jnp.array([[[0.8, 0.9], [0.5, 0.7]]])  # [B=1, K=2, T=2]
    >>> logits = jnp.log(jnp.stack([token_p, 1 - token_p], -1))  # V=2, targets are id 0
    >>> nll = rag_token_nll(logits, jnp.log(jnp.array([[0.6, 0.4]])),
    ...                     jnp.zeros((1, 2), int), jnp.ones((1, 2), bool))
    >>> print(f"{float(jnp.exp(-nll[0])):.3f}")
    0.558
    """
    doc_lp, targets, out_of_vocab, target_mask, has_docs = _loss_inputs(
        logits, doc_scores, targets, target_mask, label_smoothing
    )
    if not label_smoothing:
        token_lp = target_log_probs(logits, targets[:, None, :])  # (B, K, T)
    else:
        token_lp, vocab_sums = _rag_token_stats(logits, doc_lp, targets)  # (B, K, T), (B, T)
    token_lp = jnp.where(out_of_vocab[:, None, :], jnp.nan, token_lp)
    nll = -rag_token_log_likelihood(token_lp, doc_lp, target_mask)
    if label_smoothing:
        vocab_size = logits.shape[-1]
        smooth = -jnp.sum(jnp.where(target_mask, vocab_sums, 0.0), axis=-1)
        nll = (1.0 - label_smoothing) * nll + (label_smoothing / vocab_size) * smooth
    return _finish(nll, has_docs, target_mask)
