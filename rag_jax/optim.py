"""The optimizer from a config: AdamW with a warmup/decay schedule, per-module learning-rate
factors, frozen parameters, gradient clipping, accumulation and non-finite updates skipped.

``make_optimizer(config)`` builds the whole optax chain (big_vision's ``optax.make`` idea);
:func:`trainable` is the matching NNX filter: the parameters the train step differentiates
and the optimizer keeps moments for.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re

import jax
import ml_collections
import optax
from flax import nnx


def parameter_path(path) -> str:
    """A parameter's pytree path as "/"-joined keys, e.g. "generator/shared/embedding"."""
    path_string = jax.tree_util.keystr(path, simple=True, separator="/")
    return path_string.removesuffix("/value")  # the nnx.Variable's own field, not its name


def _module_labels(params, freeze: re.Pattern | None = None):
    """Labels each parameter "query_encoder", "doc_encoder" or "generator" by its top-level
    module, or "frozen" where its :func:`parameter_path` matches the compiled expression
    ``freeze``."""

    def label(path, _):
        if freeze is not None and freeze.search(parameter_path(path)):
            return "frozen"
        module = getattr(path[0], "key", None)
        return module if module in ("query_encoder", "doc_encoder") else "generator"

    return jax.tree_util.tree_map_with_path(label, params)


@dataclasses.dataclass(frozen=True)
class _PathMatches:
    """An NNX filter: the variables whose :func:`parameter_path` ``pattern`` finds."""

    pattern: re.Pattern

    def __call__(self, path, value) -> bool:
        return self.pattern.search("/".join(map(str, path))) is not None


def _freeze_pattern(freeze: str) -> re.Pattern | None:
    """``optimizer.freeze`` compiled (None when empty)."""
    try:
        return re.compile(freeze) if freeze else None
    except re.error as error:
        message = f"optimizer.freeze={freeze!r} is not a regular expression: {error}"
        raise ValueError(message) from None


def trainable(config: ml_collections.ConfigDict) -> nnx.filterlib.Filter:
    """The parameters training changes: every ``nnx.Param`` but those whose path matches
    ``config.optimizer.freeze``, and but the query encoder of a closed-book model (which never
    reads it). The train step differentiates only these and the optimizer keeps moments only
    for them, so a frozen embedding table costs no weight gradient and no Adam state.

    Raises:
      ValueError: ``optimizer.freeze`` is not a regular expression.
    """
    patterns = [_freeze_pattern(config.optimizer.freeze)]
    if config.rag.marginalization == "closed_book":
        patterns.append(re.compile("^query_encoder/"))
    frozen = [_PathMatches(pattern) for pattern in patterns if pattern is not None]
    return nnx.All(nnx.Param, nnx.Not(nnx.Any(*frozen))) if frozen else nnx.Param


def make_optimizer(
    config: ml_collections.ConfigDict,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(tx, schedule)``: AdamW with linear warmup and linear decay, global-norm clipping,
    optional gradient accumulation, and non-finite updates skipped (and counted in the
    optimizer state). Parameters whose path matches ``config.optimizer.freeze`` (a regular
    expression, e.g. ``"^generator/shared/"``) never change: their gradients are dropped
    before clipping and their updates (weight decay included) are zero. Train with
    ``nnx.Optimizer(model, tx, wrt=trainable(config))``: they then have no moments either.

    Equal settings give the same objects: ``nnx.Optimizer`` keeps ``tx`` in its graph
    definition, the train step's cache key, so a new (equal but not identical) chain would make
    every :func:`train` in a process compile the step again (a resume, a test's second run).
    """
    settings = json.dumps(config.optimizer.to_dict(), sort_keys=True)
    doc_encoder = bool(config.model.get("train_doc_encoder", False))
    # The schedule's length, not the run's: runs of other lengths on one schedule share a step.
    total_steps = config.optimizer.decay_steps or config.train_steps
    return _make_optimizer(settings, total_steps, doc_encoder)


@functools.lru_cache(maxsize=16)
def _make_optimizer(settings: str, total_steps: int, doc_encoder: bool = False):
    opt = ml_collections.ConfigDict(json.loads(settings))
    # BERT_d's own label only when it trains: the optimizer state of other runs is unchanged.
    doc_label = {"doc_encoder": optax.identity()} if doc_encoder else {}
    doc_scale = {"doc_encoder": optax.scale(opt.get("doc_encoder_lr_factor", 1.0))}
    pattern = _freeze_pattern(opt.get("freeze", ""))
    labels = functools.partial(_module_labels, freeze=pattern)
    schedule = (
        optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=opt.learning_rate,
            warmup_steps=opt.warmup_steps,
            decay_steps=max(total_steps, opt.warmup_steps + 1),
            end_value=opt.learning_rate * opt.end_lr_factor,
        )
        if opt.schedule == "cosine"
        else optax.join_schedules(
            [
                optax.linear_schedule(0.0, opt.learning_rate, max(opt.warmup_steps, 1)),
                optax.linear_schedule(
                    opt.learning_rate,
                    opt.learning_rate * opt.end_lr_factor,
                    max(total_steps - opt.warmup_steps, 1),
                ),
            ],
            [max(opt.warmup_steps, 1)],
        )
    )
    drop_frozen = optax.multi_transform(
        {"frozen": optax.set_to_zero(), "query_encoder": optax.identity(),
         "generator": optax.identity(), **doc_label},
        labels,
    )  # fmt: skip
    tx = optax.chain(
        drop_frozen,  # frozen parameters' gradients count in no norm and no moment
        optax.clip_by_global_norm(opt.max_grad_norm),
        optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay),
        # Each module its own fraction of the schedule: a pretrained query encoder may want a
        # smaller step than a generator trained afresh, or a generator that already reads well
        # a smaller step than the retriever (0 freezes a module).
        optax.multi_transform(
            {
                "query_encoder": optax.scale(opt.get("query_encoder_lr_factor", 1.0)),
                "generator": optax.scale(opt.get("generator_lr_factor", 1.0)),
                "frozen": optax.set_to_zero(),  # AdamW's weight decay would move them
                **(doc_scale if doc_encoder else {}),
            },
            labels,
        ),
    )
    tx = skip_nonfinite(tx)
    if opt.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=opt.grad_accum_steps)
    return tx, schedule


# optax.apply_if_finite applies a non-finite update once more than ``max_consecutive_errors``
# came in a row: with its counter's largest value, never (the run stops long before, see
# rag_jax.training._check_finite).
_NEVER = 2**31 - 1


def skip_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner``, except that gradients with any non-finite entry change nothing: the update is
    zero and ``inner``'s state (moments, schedule count) stays as it was, however many come in
    a row; stopping is the caller's decision (:func:`nonfinite_updates` counts them)."""
    return optax.apply_if_finite(inner, max_consecutive_errors=_NEVER)


def _skip_state(opt_state) -> optax.ApplyIfFiniteState | None:
    leaves = jax.tree_util.tree_leaves(
        opt_state, is_leaf=lambda x: isinstance(x, optax.ApplyIfFiniteState)
    )
    return next((leaf for leaf in leaves if isinstance(leaf, optax.ApplyIfFiniteState)), None)


def nonfinite_updates(opt_state) -> tuple[int, int]:
    """``(consecutive, total)``: the non-finite updates :func:`skip_nonfinite` skipped in a row
    up to now, and in all."""
    state = _skip_state(opt_state)
    return (0, 0) if state is None else (int(state.notfinite_count), int(state.total_notfinite))


def skipped_updates(opt_state) -> int:
    """Total non-finite updates skipped (never applied)."""
    return nonfinite_updates(opt_state)[1]


def applied_updates(opt_state) -> int:
    """Updates applied so far: the count the learning-rate schedule has reached."""
    for leaf in jax.tree_util.tree_leaves(
        opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState)
    ):
        if isinstance(leaf, optax.ScaleByScheduleState):
            return int(leaf.count)
    return 0
