"""The manifest of an index directory: what built it, over what, and checks made when it is loaded.

An index is only meaningful with the document encoder that produced its vectors: searching it with
queries from another embedding space returns confident garbage. Every index directory therefore
carries ``manifest.json`` naming the encoder (name and SHA-256 of its weights), the vector dim,
count and dtype, the backend, the passage store's checksum and the build time; loading compares
it against what the caller expects and against the files present.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from pathlib import Path
from typing import Any

from rag_jax import _files

MANIFEST_FILE = "manifest.json"
FORMAT = "rag_jax.index/1"
BACKENDS = ("exact", "scann")


# Types of the manifest fields that loading relies on.
_FIELD_TYPES = {
    "encoder_name": str,
    "encoder_sha256": str,
    "dim": int,
    "count": int,
    "dtype": str,
    "backend": str,
    "corpus_sha256": str,
    "encoder_path": str,
    "encoder_preprocessing": dict,
    "backend_config": dict,
}
# Preprocessing that must agree between the index's encoder and the one queries are made with.
_COMPARED = ("pooling", "normalize", "max_length", "tokenizer_sha256")


class IndexMismatchError(ValueError):
    """An index directory does not fit what is asked of it (encoder, dim, files)."""


@dataclasses.dataclass(frozen=True)
class Manifest:
    """Identity of an index directory.

    Attributes:
      encoder_name: the document encoder's name (e.g. its model directory name).
      encoder_sha256: SHA-256 of the encoder's weights (``encode.weights_sha256``).
      dim: H, the embedding size.
      count: N, the number of passages (= rows of the embeddings).
      dtype: storage dtype of the embeddings, "float32" or "float16".
      backend: "exact" or "scann".
      corpus_sha256: checksum of the passage store (ids, titles, texts in order).
      source_sha256: SHA-256 of the corpus file the store was read from.
      source: that file's path at build time (informational).
      encoder_path: where the encoder was loaded from at build time, as an absolute path (the
        search CLI's default document encoder); "" if unknown.
      encoder_preprocessing: what besides the weights made the vectors: pooling, normalize,
        max_length, tokenizer_sha256, architecture (``TextEncoder.preprocessing``); loading
        with an encoder whose pooling, normalisation, max length or tokenizer differ fails.
      n_skipped: bad corpus lines skipped during the build.
      n_truncated: passages cut at the encoder's max_length tokens (their text beyond it does
        not reach the vectors); None when the encoder could not count tokens.
      created: build time, ISO 8601 UTC.
      backend_config: the backend's settings.
      format: manifest format version.
    """

    encoder_name: str
    encoder_sha256: str
    dim: int
    count: int
    dtype: str
    backend: str
    corpus_sha256: str
    source_sha256: str = ""
    source: str = ""
    encoder_path: str = ""
    encoder_preprocessing: dict[str, Any] = dataclasses.field(default_factory=dict)
    n_skipped: int = 0
    n_truncated: int | None = None
    created: str = dataclasses.field(
        default_factory=lambda: datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    )
    backend_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    format: str = FORMAT

    def write(self, index_dir: str | os.PathLike) -> None:
        """Writes ``manifest.json`` into ``index_dir`` (temp file, then rename)."""
        text = json.dumps(dataclasses.asdict(self), indent=1) + "\n"
        _files.write_text(Path(index_dir) / MANIFEST_FILE, text)

    @staticmethod
    def read(index_dir: str | os.PathLike) -> Manifest:
        """Reads and validates ``index_dir/manifest.json``."""
        path = Path(index_dir) / MANIFEST_FILE
        if not path.is_file():
            raise IndexMismatchError(f"{index_dir} is not an index directory: no {MANIFEST_FILE}")
        data = _files.read_json(path, IndexMismatchError, unreadable="unreadable manifest")
        if data.get("format") != FORMAT:
            raise IndexMismatchError(f"{path}: not a {FORMAT} manifest")
        fields = {f.name for f in dataclasses.fields(Manifest)}
        required = {
            f.name
            for f in dataclasses.fields(Manifest)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        missing = sorted(required - data.keys())
        if missing:
            raise IndexMismatchError(f"{path}: manifest lacks field(s) {', '.join(missing)}")
        wrong = [
            f"{name} (expected {kind.__name__}, got {data[name]!r})"
            for name, kind in _FIELD_TYPES.items()
            if name in data
            and (not isinstance(data[name], kind) or isinstance(data[name], bool) != (kind is bool))
        ]
        if wrong:
            raise IndexMismatchError(f"{path}: bad field(s) {', '.join(wrong)}; rebuild the index")
        manifest = Manifest(**{key: value for key, value in data.items() if key in fields})
        if manifest.backend not in BACKENDS:
            raise IndexMismatchError(f"{path}: unknown backend {manifest.backend!r}")
        return manifest

    def check(
        self,
        index_dir: str | os.PathLike,
        *,
        encoder_sha256: str | None = None,
        encoder_name: str | None = None,
        dim: int | None = None,
        encoder_preprocessing: dict[str, Any] | None = None,
    ) -> None:
        """Raises :class:`IndexMismatchError` if the index was built for another encoder or dim.

        Args:
          index_dir: the index directory (named in the message).
          encoder_sha256: the document encoder the caller uses; None skips the check.
          encoder_name: its name, for the message.
          dim: the query embedding size the caller will search with; None skips the check.
          encoder_preprocessing: the document encoder's ``TextEncoder.preprocessing``; its
            pooling, normalize, max_length and tokenizer_sha256 must equal the recorded ones
            (each compared when both sides record it; None skips the check).
        """
        if dim is not None and dim != self.dim:
            raise IndexMismatchError(
                f"index {index_dir} holds {self.dim}-dim vectors (encoder {self.encoder_name!r}) "
                f"but the query vectors are {dim}-dim"
            )
        if encoder_sha256 is not None and encoder_sha256 != self.encoder_sha256:
            raise IndexMismatchError(
                f"index {index_dir} was built with encoder {self.encoder_name!r} "
                f"(weights sha256 {self.encoder_sha256[:12]}...) but the document encoder given is "
                f"{encoder_name or '?'!r} (weights sha256 {encoder_sha256[:12]}...); rebuild the "
                "index with this encoder or load the one it was built with"
            )
        recorded, given = self.encoder_preprocessing, encoder_preprocessing or {}
        differ = [
            f"{key} {recorded[key]!r} (index) != {given[key]!r} (given)"
            for key in _COMPARED
            if key in recorded and key in given and recorded[key] != given[key]
        ]
        if differ:
            raise IndexMismatchError(
                f"index {index_dir} was built with encoder {self.encoder_name!r} preprocessing "
                f"text differently from the encoder given: {'; '.join(differ)}. The same weights "
                "give other vectors: load the encoder as the index was built"
            )
