"""Flax NNX models (BERT encoder, BART generator) and their Hugging Face checkpoint I/O.

What users call is exported here; the helpers behind it (``hf_io.assign_params``,
``hf_io.read_state_dict``, ``hf_bart.hf_state_dict``, ...) stay importable from their modules.
"""

from rag_jax.models import partitioning
from rag_jax.models.bart import Bart, BartConfig, DecodeCache, EncoderMemory, KeyValue
from rag_jax.models.bert import BertConfig, BertEncoder, BertModel, l2_normalize, mean_pool
from rag_jax.models.hf_bart import load_bart, save_bart
from rag_jax.models.hf_bert import load_bert_encoder, load_bert_tokenizer, save_bert_encoder
from rag_jax.models.hf_io import CheckpointError, read_hf_config, save_hf_checkpoint
from rag_jax.models.warm_start import bart_from_bert

__all__ = [
    "Bart",
    "BartConfig",
    "BertConfig",
    "BertEncoder",
    "BertModel",
    "CheckpointError",
    "DecodeCache",
    "EncoderMemory",
    "KeyValue",
    "bart_from_bert",
    "l2_normalize",
    "load_bart",
    "load_bert_encoder",
    "load_bert_tokenizer",
    "mean_pool",
    "partitioning",
    "read_hf_config",
    "save_bart",
    "save_bert_encoder",
    "save_hf_checkpoint",
]
