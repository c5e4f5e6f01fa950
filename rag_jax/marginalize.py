"""The paper's math as pure functions: retriever scores and both marginalizations.

Everything here is plain ``jax.numpy``: no Flax, no state, no Python loops over the batch
or the documents, so each function can be jitted, vmapped and differentiated, and reused
in any JAX model. Shapes use the names

  B  batch size                 K  retrieved documents per input (``n_docs``)
  T  target length              V  vocabulary size               H  embedding size

Two conventions hold throughout:

* ``logits[b, k, t]`` is the generator's prediction for ``targets[b, t]`` given document
  ``k``: inputs are already aligned, nothing is shifted inside. (transformers' ``get_nll``
  instead receives the decoder *inputs* and shifts them left by one.)
* ``doc_scores`` are raw retriever scores ``d(z)·q(x)``; they are normalised inside with a
  log-softmax over the K documents. A missing or padded document has score ``-inf``: it
  gets probability zero and produces neither NaN values nor NaN gradients.

All reductions run in float32, whatever the input dtype (bf16 logits are fine).

Reference: Lewis et al., "Retrieval-Augmented Generation for Knowledge-Intensive NLP
Tasks", NeurIPS 2020 (arXiv:2005.11401), section 2.1 (the two models) and 2.4 (decoding).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = [
    "doc_log_probs",
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
    """
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
      ``[..., T]`` float32 log-probabilities. Reverse-mode differentiable (``grad``,
      ``vjp``); forward-mode (``jvp``) is not defined.
    """
    return _log_softmax_stats(logits, jnp.broadcast_to(targets, logits.shape[:-1]), False)[0]


def _add_at_targets(grad: Array, targets: Array, values: Array) -> Array:
    """``grad[..., targets] += values``: the ``onehot(target)`` part of a softmax gradient.

    A scatter of the ``[...]`` values into the finished ``[..., V]`` gradient, in place,
    rather than a one-hot built by comparing every entry with the target: on CPU that
    comparison made the gradient pass ~20% slower (118 -> 95 ms at B=8, K=5, T=32,
    V=50265). Negative targets count from the end, as in the forward pass's gather.

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


# --------------------------------------------------------------------------------------
# Statistics over V, in cache-sized chunks on CPU
# --------------------------------------------------------------------------------------
# XLA's CPU code for a reduction over the minor axis evaluates exp() one element at a time
# (~0.35 G/s on this project's development machine), while an elementwise exp() is
# vectorised and a matrix-vector product with ones sums at BLAS speed. So on CPU the
# statistics below are computed a cache-sized chunk at a time, summing over V with a product
# with ones (measured 3-4x faster at B=8, K=5, T=32, V=50265). Other platforms run the same
# function once over the whole array with plain sums, which XLA fuses. On CPU the chunks also
# take forms with fewer passes or fewer exp() than the textbook ones, each checked at run time
# and recomputed the textbook way where it would lose accuracy (see _vocab_stats and
# _rag_token_ratio_stats).
_CHUNK_ELEMENTS = 1 << 20  # 4 MiB of float32 per chunk


def _sum_over_vocab(x: Array, for_cpu: bool) -> Array:
    """``Σ_v x[..., v]``, as a product with ones where that is the fast form."""
    if not for_cpu:
        return jnp.sum(x, axis=-1)
    return x @ jnp.ones((x.shape[-1],), x.dtype)


def _logsumexp_over_docs(joint: Array, for_cpu: bool) -> Array:
    """``log Σ_k exp(joint[:, k])``: ``[b, K, t, V] -> [b, t, V]``.

    On CPU as K elementwise maxima and a product with ones: XLA's CPU reduction over a
    non-minor axis is slower still than over the minor one (measured 7x slower than this).
    The ones are batched over b so that the terms are already in the layout the product
    wants; ``terms @ ones`` made XLA transpose them first (99 ms of 525 at B=8, K=5, T=32,
    V=50265).
    """
    if not for_cpu:
        return jax.nn.logsumexp(joint, axis=1)
    n_examples, n_docs, length, vocab_size = joint.shape
    per_doc = joint.reshape(n_examples, n_docs, length * vocab_size)
    doc_max = functools.reduce(jnp.maximum, [per_doc[:, k] for k in range(n_docs)])
    shift = jnp.where(jnp.isfinite(doc_max), doc_max, 0.0)
    terms = jnp.exp(per_doc - shift[:, None])  # (b, K, t·V)
    total = jnp.einsum("bk,bkn->bn", jnp.ones((n_examples, n_docs), terms.dtype), terms)
    return (jnp.log(total) + shift).reshape(n_examples, length, vocab_size)


def _logsumexp_over_vocab(logits: Array, row_max: Array, for_cpu: bool) -> Array:
    """``log Σ_v exp(logits[..., v])``; ``-inf`` (not NaN) for an all ``-inf`` row.

    ``row_max = max_v logits[..., v]``, taken by the caller in one pass over all rows: inside
    the CPU chunks XLA copied each chunk before taking its maximum.
    """
    shift = jnp.where(jnp.isfinite(row_max), row_max, 0.0)[..., None]
    return jnp.log(_sum_over_vocab(jnp.exp(logits - shift), for_cpu)) + shift[..., 0]


def _in_chunks(stats_fn, *arrays, in_axes: tuple, out_axes: tuple, chunk: int) -> tuple:
    """``stats_fn(*arrays, for_cpu=True)``, chunk by chunk.

    A chunk is ``chunk`` consecutive entries of the sequence axis, which is ``in_axes[i]``
    of ``arrays[i]`` (``None``: it has none) and ``out_axes[j]`` of output j; every other
    axis is taken whole, so a batch axis sharded over devices stays sharded. The last chunk
    is shifted back to end at the last entry rather than padded: entries it shares with the
    chunk before are recomputed to the same values.
    """
    length = arrays[0].shape[in_axes[0]]
    size = max(1, min(length, chunk))

    def take(x, axis, start):
        return x if axis is None else jax.lax.dynamic_slice_in_dim(x, start, size, axis)

    def one_chunk(i, outputs):
        start = jnp.minimum(i * size, length - size)
        pieces = (take(x, ax, start) for x, ax in zip(arrays, in_axes, strict=True))
        stats = stats_fn(*pieces, for_cpu=True)
        return tuple(
            jax.lax.dynamic_update_slice_in_dim(out, x, start, ax)
            for out, x, ax in zip(outputs, stats, out_axes, strict=True)
        )

    first = [take(x, ax, 0) for x, ax in zip(arrays, in_axes, strict=True)]
    out_shapes = jax.eval_shape(functools.partial(stats_fn, for_cpu=True), *first)
    init = tuple(
        jnp.zeros((*s.shape[:ax], length, *s.shape[ax + 1 :]), s.dtype)
        for s, ax in zip(out_shapes, out_axes, strict=True)
    )
    return jax.lax.fori_loop(0, -(-length // size), one_chunk, init)


def _vocab_stats(logits: Array, targets: Array, with_logit_sum: bool) -> tuple:
    """``[..., V], [...] -> (logsumexp, log p(target), Σ_v logits or None)``, float32 ``[...]``.

    ``targets`` broadcasts against ``logits[..., 0]``; ``p = softmax(logits)``.

    On CPU the logits are first shifted by the target's logit instead of the row maximum,
    which saves a pass over them (~25 of ~180 ms at B=8, K=5, T=32, V=50265), and then
    ``log p(target) = -log Σ_v exp(logits_v - logits[target])`` directly. The target's own
    term is exactly 1, so the sum cannot underflow; it overflows (to ``inf``) only where
    some logit exceeds the target's by more than ``log(FLT_MAX / V)`` (~77 at V=50265), that
    is where ``p(target) < e^-77``. If any row does (or holds a NaN or infinite logit), all
    rows are recomputed with the row maxima. Under ``vmap`` the ``cond`` becomes a
    ``select`` and both are computed.
    """
    batch_shape, vocab_size = logits.shape[:-1], logits.shape[-1]
    rows = logits.reshape(-1, vocab_size)
    row_targets = jnp.broadcast_to(targets, batch_shape).reshape(-1)
    target_logits = jnp.take_along_axis(rows, row_targets[:, None], axis=-1)[:, 0]
    target_logits = target_logits.astype(jnp.float32)
    chunking = dict(in_axes=(0, 0), out_axes=(0,), chunk=_CHUNK_ELEMENTS // vocab_size)

    def shifted_log_sum(rows, row_shift, for_cpu):  # [R, V], [R] -> ([R],)
        shifted = rows.astype(jnp.float32) - row_shift[:, None]
        return (jnp.log(_sum_over_vocab(jnp.exp(shifted), for_cpu)),)

    def logsumexp_stats(rows, row_max, for_cpu):  # [R, V], [R] -> ([R],)
        return (_logsumexp_over_vocab(rows.astype(jnp.float32), row_max, for_cpu),)

    def by_row_max(rows, for_cpu):
        row_max = jnp.max(rows, axis=-1).astype(jnp.float32)
        if for_cpu:
            log_normaliser = _in_chunks(logsumexp_stats, rows, row_max, **chunking)[0]
        else:
            log_normaliser = logsumexp_stats(rows, row_max, for_cpu=False)[0]
        return log_normaliser, target_logits - log_normaliser

    def by_target_logit(rows):
        shift = jnp.where(jnp.isfinite(target_logits), target_logits, 0.0)
        log_sum = _in_chunks(shifted_log_sum, rows, shift, **chunking)[0]
        log_normaliser = shift + log_sum
        target_lp = jnp.where(shift == target_logits, -log_sum, target_logits - log_normaliser)
        return log_normaliser, target_lp

    def on_cpu(rows):
        first_try = by_target_logit(rows)
        safe = jnp.all(jnp.isfinite(first_try[0]))
        return jax.lax.cond(safe, lambda: first_try, lambda: by_row_max(rows, for_cpu=True))

    log_normaliser, target_lp = jax.lax.platform_dependent(
        rows, cpu=on_cpu, default=lambda rows: by_row_max(rows, for_cpu=False)
    )
    logit_sums = None
    if with_logit_sum:  # in one pass over all rows, as a product with ones
        ones = jnp.ones((vocab_size,), rows.dtype)
        logit_sums = jnp.dot(rows, ones, preferred_element_type=jnp.float32).reshape(batch_shape)
    return log_normaliser.reshape(batch_shape), target_lp.reshape(batch_shape), logit_sums


def _rag_token_vocab_stats(logits: Array, doc_lp: Array, targets: Array) -> tuple:
    """Everything smoothed RAG-Token needs from the ``[B, K, T, V]`` logits, in one pass.

    Returns float32 ``(logsumexp [B,K,T], logits[target] [B,K,T], marginal [B,T,V],
    posterior_mass [B,K,T], ratio_form_ok [])``, where ``marginal = log p'(v|x,y_<t)`` is
    RAG-Token's marginal and ``posterior_mass[k] = Σ_v p(z_k|x,y_<t,y_t=v)``, a sum over V that
    its gradient needs. ``ratio_form_ok`` says whether the gradient may use the ratio form
    (see :func:`_rag_token_ratio_stats`).
    """

    def log_space_stats(logits, doc_lp, targets, row_max, for_cpu):  # [B,K,t,V], [B,K], ...
        logits = logits.astype(jnp.float32)
        log_normaliser = _logsumexp_over_vocab(logits, row_max.astype(jnp.float32), for_cpu)
        target_logits = jnp.take_along_axis(logits, targets[:, None, :, None], axis=-1)[..., 0]
        joint = doc_lp[:, :, None, None] + logits - log_normaliser[..., None]  # (B, K, t, V)
        marginal = _logsumexp_over_docs(joint, for_cpu)  # (B, t, V)
        posterior = jnp.exp(joint - marginal[:, None])  # p(z_k | x, y_<t, y_t = v)
        return log_normaliser, target_logits, marginal, _sum_over_vocab(posterior, for_cpu)

    chunk = _CHUNK_ELEMENTS // (logits.shape[0] * logits.shape[1] * logits.shape[-1])
    chunking = dict(in_axes=(2, None, 1, 2), out_axes=(2, 2, 1, 2), chunk=chunk)
    arrays = (logits, doc_lp, targets, jnp.max(logits, axis=-1))

    def on_cpu(*arrays):
        ratio_form = _in_chunks(_rag_token_ratio_stats, *arrays, **chunking)
        ok = jnp.all(ratio_form[2] >= _LOG_MIN_MARGINAL)  # NaN compares False, too
        log_space = lambda: (*_in_chunks(log_space_stats, *arrays, **chunking), ok)  # noqa: E731
        return jax.lax.cond(ok, lambda: (*ratio_form, ok), log_space)

    def default(*arrays):
        return (*log_space_stats(*arrays, for_cpu=False), jnp.asarray(False))

    return jax.lax.platform_dependent(*arrays, cpu=on_cpu, default=default)


# Below this marginal log-probability the ratio form would divide by a sum of underflowed terms.
_LOG_MIN_MARGINAL = -69.0  # log(1e-30)


def _rag_token_ratio_stats(logits, doc_lp, targets, row_max, for_cpu):
    """CPU form of ``_rag_token_vocab_stats``'s statistics with one ``exp`` per entry.

    With ``e_k(v) = exp(logits_k(v) - max_k)`` and ``S_k = Σ_v e_k(v)``, the joint
    probabilities are ``c_k e_k(v)`` with ``c_k = p(z_k|x) / S_k``, so the marginal is
    ``p'(v) = Σ_k c_k e_k(v)`` and the posterior mass ``Σ_v c_k e_k(v) / p'(v)``: sums and
    products of ``e``, where the log-space form takes three ``exp`` per entry. As accurate as
    that form as long as no ``p'(v)`` is tiny (the caller checks ``log p'(v) >=
    _LOG_MIN_MARGINAL`` everywhere and otherwise recomputes in log space): then no term that
    matters has underflowed.
    """
    logits = logits.astype(jnp.float32)
    shift = jnp.where(jnp.isfinite(row_max), row_max, 0.0).astype(jnp.float32)
    scaled = jnp.exp(logits - shift[..., None])  # e_k(v), (B, K, t, V)
    total = _sum_over_vocab(scaled, for_cpu)  # S_k, (B, K, t)
    target_logits = jnp.take_along_axis(logits, targets[:, None, :, None], axis=-1)[..., 0]
    weights = jnp.exp(doc_lp)[:, :, None] / total  # c_k, (B, K, t)
    n_docs = logits.shape[1]
    terms = [weights[:, k, :, None] * scaled[:, k] for k in range(n_docs)]
    mixture = functools.reduce(jnp.add, terms)  # p'(v), (B, t, V)
    posterior_mass = weights * _sum_over_vocab(scaled / mixture[:, None], for_cpu)
    return jnp.log(total) + shift, target_logits, jnp.log(mixture), posterior_mass


# The two functions below have hand-written VJPs for memory, not for speed: left to autodiff,
# XLA keeps exp(logits - lse) from the forward pass as a second [..., V] buffer beside the
# cotangent (measured: 470 MiB instead of 233 MiB at B=8, K=5, T=32, V=50265). Each returns
# everything a loss needs from the [..., V] logits, so that the whole gradient is written
# by one fused pass into one buffer.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _log_softmax_stats(
    logits: Array, targets: Array, with_vocab_sum: bool
) -> tuple[Array, Array | None]:
    """``[..., V], [...] -> (log p(target) [...], Σ_v log p(v) [...] or None)``.

    ``p = softmax(logits)``; the second output (label smoothing's term) only when
    ``with_vocab_sum``.
    """
    return _log_softmax_stats_fwd(logits, targets, with_vocab_sum)[0]


def _log_softmax_stats_fwd(logits, targets, with_vocab_sum):
    log_normaliser, target_lp, logit_sums = _vocab_stats(logits, targets, with_vocab_sum)
    # Σ_v log softmax(x)_v = Σ_v x_v - V·logsumexp(x): label smoothing's term.
    vocab_sum = logit_sums - logits.shape[-1] * log_normaliser if with_vocab_sum else None
    return (target_lp, vocab_sum), (logits, targets, log_normaliser)


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
    log_normaliser, target_logits, marginal, posterior_mass, ratio_form_ok = _rag_token_vocab_stats(
        logits, doc_lp, targets
    )
    outputs = (target_logits - log_normaliser, jnp.sum(marginal, axis=-1))
    residuals = (logits, doc_lp, targets, log_normaliser, marginal, posterior_mass, ratio_form_ok)
    return outputs, residuals


def _rag_token_stats_bwd(residuals, cotangents):
    logits, doc_lp, targets, log_normaliser, marginal, posterior_mass, ratio_form_ok = residuals
    d_target, d_vocab_sum = cotangents  # (B, K, T), (B, T)

    def logits_grad(ratio_form: bool):  # each branch of the cond one fused pass over [B, K, T, V]
        log_softmax = logits.astype(jnp.float32) - log_normaliser[..., None]  # (B, K, T, V)
        softmax = jnp.exp(log_softmax)
        # posterior[b,k,t,v] = p(z_k | x, y_<t, y_t = v): d marginal[v] / d log p(v|z_k).
        if ratio_form:  # p(z_k|x) softmax_k(v) / p'(v): one exp per entry instead of two
            inverse_marginal = jnp.exp(-marginal)  # (B, T, V), at most 1e30 (checked)
            posterior = jnp.exp(doc_lp)[:, :, None, None] * softmax * inverse_marginal[:, None]
        else:
            posterior = jnp.exp(doc_lp[:, :, None, None] + log_softmax - marginal[:, None])
        return -d_target[..., None] * softmax + d_vocab_sum[:, None, :, None] * (
            posterior - softmax * posterior_mass[..., None]
        )

    grad = jax.lax.cond(ratio_form_ok, lambda: logits_grad(True), lambda: logits_grad(False))
    grad = _add_at_targets(grad, targets[:, None], d_target)
    d_doc_lp = jnp.sum(d_vocab_sum[:, None, :] * posterior_mass, axis=-1)  # (B, K)
    return grad.astype(logits.dtype), d_doc_lp.astype(doc_lp.dtype), None


_rag_token_stats.defvjp(_rag_token_stats_fwd, _rag_token_stats_bwd)


# --------------------------------------------------------------------------------------
# RAG-Sequence: p(y|x) = Σ_z p(z|x) Π_t p(y_t|x,z,y_<t)
# --------------------------------------------------------------------------------------


def rag_sequence_log_likelihood(
    token_log_probs: Array, doc_log_probs: Array, target_mask: Array
) -> Array:
    """RAG-Sequence ``log p(y|x) = log Σ_z p(z|x) Π_t p(y_t|x,z,y_<t)`` (paper eq. 1).

    Args:
      token_log_probs: ``[B, K, T]`` ``log p_theta(y_t|x,z_k,y_<t)`` (see
        :func:`target_log_probs`).
      doc_log_probs: ``[B, K]`` ``log p_eta(z_k|x)``; ``-inf`` for missing documents.
      target_mask: ``[B, T]`` bool, ``False`` at padding.

    Returns:
      ``[B]`` float32 log-likelihoods.
    """
    # Masking with `where`, not a product, so a -inf never meets a 0.
    token_log_probs = jnp.where(target_mask[:, None, :], token_log_probs, 0.0)
    seq_log_probs = jnp.sum(token_log_probs.astype(jnp.float32), axis=-1)  # (B, K)
    # The prior counts once per sequence, independent of the target mask.
    return jax.nn.logsumexp(doc_log_probs + seq_log_probs, axis=-1)


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
    is padding, the prior here counts exactly once per sequence.

    Args:
      logits: ``[B, K, T, V]``; ``logits[b, k, t]`` predicts ``targets[b, t]`` given doc k.
      doc_scores: ``[B, K]`` raw retriever scores, ``-inf`` for missing documents.
      targets: ``[B, T]`` int token ids.
      target_mask: ``[B, T]`` bool, ``False`` at padding.
      label_smoothing: ``eps`` in ``[0, 1)``.

    Returns:
      ``[B]`` float32 losses.

    Example (course, lesson 4): priors ``[0.6, 0.4]`` and per-token probabilities
    ``[[0.8, 0.9], [0.5, 0.7]]`` give ``p(y|x) = 0.6·0.72 + 0.4·0.35 = 0.572``.
    """
    doc_lp = doc_log_probs(doc_scores)  # (B, K)
    targets = jnp.broadcast_to(targets[:, None, :], logits.shape[:-1])  # (B, K, T)
    token_lp, vocab_sums = _log_softmax_stats(logits, targets, bool(label_smoothing))  # (B, K, T)
    nll = -rag_sequence_log_likelihood(token_lp, doc_lp, target_mask)
    if not label_smoothing:
        return nll
    vocab_size = logits.shape[-1]
    vocab_sums = jnp.where(target_mask[:, None, :], vocab_sums, 0.0)  # (B, K, T)
    smooth = -jax.nn.logsumexp(vocab_size * doc_lp + jnp.sum(vocab_sums, axis=-1), axis=-1)
    return (1.0 - label_smoothing) * nll + (label_smoothing / vocab_size) * smooth


# --------------------------------------------------------------------------------------
# RAG-Token: p(y|x) = Π_t Σ_z p(z|x) p(y_t|x,z,y_<t)
# --------------------------------------------------------------------------------------


def rag_token_log_likelihood(
    token_log_probs: Array, doc_log_probs: Array, target_mask: Array
) -> Array:
    """RAG-Token ``log p(y|x) = Σ_t log Σ_z p(z|x) p(y_t|x,z,y_<t)`` (paper eq. 2).

    Args:
      token_log_probs: ``[B, K, T]`` ``log p_theta(y_t|x,z_k,y_<t)``.
      doc_log_probs: ``[B, K]`` ``log p_eta(z_k|x)``; ``-inf`` for missing documents.
      target_mask: ``[B, T]`` bool, ``False`` at padding.

    Returns:
      ``[B]`` float32 log-likelihoods.
    """
    joint = doc_log_probs[:, :, None] + token_log_probs.astype(jnp.float32)  # (B, K, T)
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
      ``[..., V]`` float32 log-probabilities (each row's ``exp`` sums to one).
    """
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

    Args:
      logits: ``[B, K, T, V]``; ``logits[b, k, t]`` predicts ``targets[b, t]`` given doc k.
      doc_scores: ``[B, K]`` raw retriever scores, ``-inf`` for missing documents.
      targets: ``[B, T]`` int token ids.
      target_mask: ``[B, T]`` bool, ``False`` at padding.
      label_smoothing: ``eps`` in ``[0, 1)``.

    Returns:
      ``[B]`` float32 losses.

    Example (course, lesson 4): priors ``[0.6, 0.4]`` and per-token probabilities
    ``[[0.8, 0.9], [0.5, 0.7]]`` give ``p(y|x) = 0.68·0.82 ≈ 0.558``.
    """
    doc_lp = doc_log_probs(doc_scores)  # (B, K)
    if not label_smoothing:
        token_lp = target_log_probs(logits, targets[:, None, :])  # (B, K, T)
        return -rag_token_log_likelihood(token_lp, doc_lp, target_mask)
    token_lp, vocab_sums = _rag_token_stats(logits, doc_lp, targets)  # (B, K, T), (B, T)
    nll = -rag_token_log_likelihood(token_lp, doc_lp, target_mask)
    vocab_size = logits.shape[-1]
    smooth = -jnp.sum(jnp.where(target_mask, vocab_sums, 0.0), axis=-1)
    return (1.0 - label_smoothing) * nll + (label_smoothing / vocab_size) * smooth
