"""Flax NNX models (BERT encoder, BART generator) and their Hugging Face checkpoint I/O."""

from rag_jax.models import partitioning
from rag_jax.models.checkpoint import (
    CheckpointError,
    assign_params,
    module_params,
    read_hf_config,
    read_state_dict,
    save_hf_checkpoint,
)

__all__ = [
    "CheckpointError",
    "assign_params",
    "module_params",
    "partitioning",
    "read_hf_config",
    "read_state_dict",
    "save_hf_checkpoint",
]
