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


def watch_collapse(
    metrics: dict, config, model_config: RagConfig, n_passages: int | None = None
) -> list[str]:
    """Warns (and returns the warnings) when retrieval looks collapsed at a logged step.

    Three signs, each against ``metrics`` of the step (``doc_entropy``: mean entropy of p(z|x)
    in nats; ``distinct_docs_in_window`` over the last ``retrieved_in_window`` retrieved
    documents): the entropy under ``collapse.min_entropy`` (every question trusts one
    document); fewer distinct documents than ``collapse.min_distinct_docs``; and, whatever the
    thresholds, every question of the window retrieving the same K documents while the index
    holds more (``n_passages`` > K): the retriever returns one fixed set whatever is asked.
    """
    if model_config.closed_book:
        return []
    warnings = []
    if metrics["doc_entropy"] < config.collapse.min_entropy:
        warnings.append(
            f"retrieval collapse? mean entropy of p(z|x) is {metrics['doc_entropy']:.3f} nats "
            f"(threshold {config.collapse.min_entropy:.3f})"
        )
    distinct, retrieved = metrics["distinct_docs_in_window"], metrics["retrieved_in_window"]
    K = model_config.n_docs
    if 0 < distinct < config.collapse.min_distinct_docs:
        warnings.append(
            f"retrieval collapse? only {distinct} distinct documents over the last "
            f"{retrieved} retrieved (threshold {config.collapse.min_distinct_docs})"
        )
    elif 0 < distinct <= K < (n_passages or 0) and retrieved >= 2 * K:
        warnings.append(
            f"retrieval collapse? the last {retrieved // K} questions all retrieved the same "
            f"{distinct} of the index's {n_passages} documents"
        )
    for warning in warnings:
        log.warning("%s", warning)
    return warnings
