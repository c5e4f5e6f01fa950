"""What a run logs: one JSON line per logged step (``metrics.jsonl``), TensorBoard scalars,
and warnings when retrieval collapses onto a few documents."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from rag_jax import _files
from rag_jax.rag import RagConfig

log = logging.getLogger(__name__)


class MetricsWriter:
    """Each logged step as a JSON line in ``metrics.jsonl`` and as TensorBoard scalars.

    A run resumed from step ``resumed_from`` first drops the lines of later steps: an
    interrupted run logged them after its last checkpoint, and this run logs them again.
    """

    def __init__(self, workdir: Path, enabled: bool, resumed_from: int = 0):
        self.enabled = enabled
        if not enabled:
            return
        from tensorboardX import SummaryWriter  # no TensorFlow needed

        if resumed_from:
            drop_lines_after(workdir / "metrics.jsonl", resumed_from)
        self.jsonl = (workdir / "metrics.jsonl").open("a")
        self.tensorboard = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for name, value in metrics.items():
            self.tensorboard.add_scalar(name, value, step)

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tensorboard.close()


def drop_lines_after(path: Path, step: int) -> None:
    """Rewrites the JSONL file ``path`` (atomically) without the lines of steps after ``step``,
    and without a line a kill cut short."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    _files.write_text(path, "".join(kept))


def watch_collapse(metrics: dict, config, model_config: RagConfig) -> None:
    if model_config.closed_book:
        return
    if metrics["doc_entropy"] < config.collapse.min_entropy:
        log.warning(
            "retrieval collapse? mean entropy of p(z|x) is %.3f nats (threshold %.3f)",
            metrics["doc_entropy"],
            config.collapse.min_entropy,
        )
    if 0 < metrics["distinct_docs_in_window"] < config.collapse.min_distinct_docs:
        log.warning(
            "retrieval collapse? only %d distinct documents over the last %d retrieved",
            metrics["distinct_docs_in_window"],
            config.collapse.window,
        )
