"""The document index: corpus and passage store, encoding, exact and ScaNN MIPS, hot-swap.

Build an index directory with :func:`build_index` (or ``python -m rag_jax.index build``), open it
with :class:`KnowledgeSource` (or :func:`load_index`), search it with query vectors.

What users call is exported here; the helpers behind it (``exact.chunked_top_k``,
``checks.check_search_args``, ``encode.weights_sha256``, ...) stay importable from their modules.
"""

from rag_jax.index.build import BuildError, build_index
from rag_jax.index.corpus import (
    CorpusError,
    CorpusReader,
    Passage,
    PassageStore,
    split_document,
    split_passages,
)
from rag_jax.index.encode import (
    EncodingError,
    TextEncoder,
    encode_passages,
    encode_texts,
    load_text_encoder,
)
from rag_jax.index.exact import ExactIndex, SearchResult, exact_search
from rag_jax.index.manifest import IndexMismatchError, Manifest
from rag_jax.index.scann_index import ScannConfig, ScannIndex
from rag_jax.index.source import Index, KnowledgeSource, LoadedIndex, load_index, tune_index

__all__ = [
    "BuildError",
    "CorpusError",
    "CorpusReader",
    "EncodingError",
    "ExactIndex",
    "Index",
    "IndexMismatchError",
    "KnowledgeSource",
    "LoadedIndex",
    "Manifest",
    "Passage",
    "PassageStore",
    "ScannConfig",
    "ScannIndex",
    "SearchResult",
    "TextEncoder",
    "build_index",
    "encode_passages",
    "encode_texts",
    "exact_search",
    "load_index",
    "load_text_encoder",
    "split_document",
    "split_passages",
    "tune_index",
]
