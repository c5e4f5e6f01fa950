"""rag_jax: Retrieval-Augmented Generation (Lewis et al., 2020) in JAX and Flax NNX."""

from rag_jax.marginalize import (
    doc_log_probs,
    has_documents,
    rag_sequence_log_likelihood,
    rag_sequence_nll,
    rag_token_log_likelihood,
    rag_token_log_probs,
    rag_token_nll,
    retriever_log_probs,
    retriever_scores,
    target_log_probs,
)

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
