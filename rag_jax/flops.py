"""Model FLOPs of one RAG training step, as PaLM's appendix B counts them.

Forward + backward matmuls: 6 x the multiply-adds of every weight matrix per token it sees
(2 for a multiply-add, x3 for the forward and the backward's two products; the tied LM head
included), plus attention's ``QK^T`` and ``AV``; nothing for rematerialisation, softmax or
LayerNorm. ``benchmarks/gpu_train.py`` divides it by the measured step time (MFU),
:mod:`rag_jax.compile` by a compiled step's roofline.

Shapes (the README's legend): B questions, K passages each, L question tokens, S generator-input
tokens, T target tokens.
"""

from __future__ import annotations

import jax
from flax import nnx

_TABLES = ("embed", "shared", "pooler")  # lookups, and BERT's pooler (unused by RAG)


def matmul_params(state: nnx.State) -> int:
    """Entries of every weight matrix (2-D kernel) in ``state``; embedding tables excluded."""
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        name = jax.tree_util.keystr(path)
        if getattr(leaf, "ndim", 0) == 2 and not any(t in name for t in _TABLES):
            total += leaf.size
    return total


def model_flops(model, shapes: dict[str, int]) -> dict[str, int]:
    """FLOPs of one training step of ``model`` (a :class:`rag_jax.rag.RagModel`), by part.

    Args:
      shapes: ``B``, ``K``, ``L``, ``S``, ``T`` (K=1 for a closed-book model).

    Returns:
      ``query_encoder``, ``generator_encoder``, ``generator_decoder``, ``doc_scores`` and
      their ``total``.
    """
    B, K, L, S, T = (shapes[k] for k in "BKLST")
    bert, bart = model.query_encoder.bert.config, model.generator.config
    H, d, V = bert.hidden_size, bart.d_model, bart.vocab_size
    query = matmul_params(nnx.state(model.query_encoder, nnx.Param))
    encoder = matmul_params(nnx.state(model.generator.encoder, nnx.Param))
    decoder = matmul_params(nnx.state(model.generator.decoder, nnx.Param))
    flops = {
        "query_encoder": 6 * query * B * L + 12 * bert.num_hidden_layers * B * L * L * H,
        "generator_encoder": 6 * encoder * B * K * S + 12 * bart.encoder_layers * B * K * S * S * d,
        "generator_decoder": 6 * (decoder + d * V) * B * K * T
        + 12 * bart.decoder_layers * B * K * (T * T + T * S) * d,
        "doc_scores": 6 * B * K * H,
    }
    flops["total"] = sum(flops.values())
    return flops
