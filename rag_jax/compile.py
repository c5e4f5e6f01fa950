"""Compile the train step for a TPU pod without one: memory, FLOPs, collectives, a roofline.

    python -m rag_jax.compile --config configs/rag_sequence_nq.py --topology v5p:4x4x4 \\
        [--config.a.b=v ...] [--retrieval host|device|both] [--passages N] [--json FILE]

XLA compiles for a TPU topology from ``libtpu`` alone (``pip install rag_jax[test]`` brings
it): ``jax.experimental.topologies`` gives abstract TPU devices, the config's mesh is laid over
them, and the very jitted steps ``train.py`` runs (``training.train_step``, and
``training.device_train_step`` with the exact index's vectors and passage tokens sharded on the
mesh) are traced with abstract sharded inputs of the config's shapes, then lowered and compiled.
No weights are read: model shapes come from each checkpoint directory's ``config.json``, or
from the preset its name matches (:mod:`rag_jax.models.presets`), so the NQ configs compile on
a fresh clone.

The report, per step and per chip (the SPMD program each chip runs):

- memory (XLA's ``memory_analysis``): parameter, optimizer-state and batch bytes (the
  step's arguments, by kind), temporaries, against the chip's HBM;
- FLOPs: model FLOPs as ``benchmarks/gpu_train.py`` counts them (6 x multiply-adds of every
  weight matrix per token, attention's two products), and XLA's ``cost_analysis`` count;
- every collective in the compiled HLO, per step (an op in one of XLA's loops once per
  trip), by kind and by the jax op it implements (:func:`collective_sources`), with bytes;
- a roofline **lower bound** on the step time: max(XLA FLOPs / bf16 peak, XLA's HBM bytes /
  HBM bandwidth, collective bytes / ICI bandwidth), and the MFU it would allow. A bound, not a
  measurement: nothing runs. (XLA's cost analysis counts a loop body once, so in a step with
  windowed-einsum loops its FLOPs and bytes are low: the bound stays a lower bound.)

``import rag_jax`` does not need libtpu; this module needs it only when :func:`compile_step`
runs.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from rag_jax import device_retrieval
from rag_jax.builders import rag_config
from rag_jax.flops import model_flops
from rag_jax.index.exact import ExactIndex
from rag_jax.models import Bart, BartConfig, BertConfig, BertEncoder, partitioning
from rag_jax.models.hf_io import read_hf_config
from rag_jax.models.presets import find_preset
from rag_jax.optim import make_optimizer, trainable
from rag_jax.rag import RagBatch, RagModel
from rag_jax.sharding import make_mesh, param_rules
from rag_jax.training import device_train_step, train_step


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation's figures per chip, from Google's Cloud TPU pages (cited per chip).

    ``ici_gbytes_per_s`` is the bidirectional inter-chip interconnect bandwidth per chip.
    """

    name: str
    hbm_gib: float
    bf16_tflops: float
    hbm_gbytes_per_s: float
    ici_gbytes_per_s: float
    source: str


CHIPS = {
    # cloud.google.com/tpu/docs/v4: 32 GiB HBM2 at 1228 GB/s, 275 TFLOP/s bf16, ICI 2400 Gbps
    # (= 600 GB/s bidirectional, as v5e's 1600 Gbps is its 400 GB/s)
    "v4": Chip("v4", 32, 275, 1228, 600, "https://cloud.google.com/tpu/docs/v4"),
    # cloud.google.com/tpu/docs/v5e: 16 GB HBM2 at 819 GB/s, 197 TFLOP/s, ICI 400 GB/s
    "v5e": Chip("v5e", 16, 197, 819, 400, "https://cloud.google.com/tpu/docs/v5e"),
    # cloud.google.com/tpu/docs/v5p: 95 GiB HBM2e at 2765 GB/s, 459 TFLOP/s, ICI 1200 GB/s
    "v5p": Chip("v5p", 95, 459, 2765, 1200, "https://cloud.google.com/tpu/docs/v5p"),
    # cloud.google.com/tpu/docs/v6e: 32 GB HBM at 1638 GB/s, 918 TFLOP/s, ICI 800 GB/s
    "v6e": Chip("v6e", 32, 918, 1638, 800, "https://cloud.google.com/tpu/docs/v6e"),
}

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def chip_of(topology: str) -> Chip:
    """The :class:`Chip` of a topology name such as ``"v5p:4x4x4"`` or ``"v5e:2x2"``.

    Raises:
      ValueError: naming ``--topology``, for an unknown generation.
    """
    generation = topology.split(":")[0].lower()
    if generation == "v5litepod":
        generation = "v5e"
    if generation not in CHIPS:
        raise ValueError(
            f"--topology {topology!r}: unknown TPU generation {generation!r}; "
            f"one of {sorted(CHIPS)} (e.g. v5p:2x2x1, v5e:2x4)"
        )
    return CHIPS[generation]


def tpu_devices(topology: str) -> list:
    """The abstract TPU devices of ``topology`` (no TPU needed, libtpu is).

    Raises:
      RuntimeError: libtpu is missing or does not know the topology.
    """
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server to ask
    # Compiling claims no chip: let it run beside another process that loaded libtpu.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
    except Exception as error:  # jax raises RuntimeError / ValueError / ImportError variants
        raise RuntimeError(
            f"cannot get TPU topology {topology!r} ({type(error).__name__}: {error}); "
            "is libtpu installed (pip install -e '.[test]')?"
        ) from None


# --------------------------------------------------------------------------------------
# The model's shapes, without weights
# --------------------------------------------------------------------------------------


def _checkpoint_config(path: str, kind: str, field: str) -> tuple[dict, str, dict | None]:
    """``(hf_config, source, tokenizer)`` of checkpoint ``path``: its config.json, or the
    preset of its name (then ``tokenizer`` holds the preset's vocabulary size and ids)."""
    if path and (Path(path) / "config.json").is_file():
        hf_config = read_hf_config(path)
        if hf_config.get("model_type") == "rag":
            part = "question_encoder" if kind == "bert" else "generator"
            hf_config = read_hf_config(path, part=part)
        return hf_config, f"{path}/config.json", None
    if not path:
        raise ValueError(f"config.{field} is empty: name a checkpoint directory or a preset")
    preset = find_preset(path, kind, field)
    return preset["config"], f"preset {Path(path).name}", preset["tokenizer"]


def _generator_tokenizer(config: ml_collections.ConfigDict) -> dict:
    """Vocabulary size and special ids of the generator tokenizer (a generator built from
    ``model.generator_init`` takes them), from its files or its preset."""
    model = config.model
    directory = model.generator_tokenizer or model.generator or model.question_encoder
    if directory and Path(directory).is_dir():
        from rag_jax.models import load_bert_tokenizer

        tok = load_bert_tokenizer(directory)
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id
        eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        return dict(size=len(tok), pad=tok.pad_token_id, bos=bos, eos=eos)
    return _checkpoint_config(directory, "bert", "model.generator_tokenizer")[2]


def model_shapes(config: ml_collections.ConfigDict) -> tuple[BertConfig, BartConfig, dict]:
    """``(query encoder config, generator config, sources)`` that ``build_model`` would load,
    read from config.json files or presets (no weights).

    Raises:
      ValueError: a model path with neither config.json nor a preset name.
    """
    model = config.model
    bert_hf, bert_source, _ = _checkpoint_config(
        model.question_encoder, "bert", "model.question_encoder"
    )
    query = BertConfig.from_hf_config(bert_hf)
    if model.generator:
        bart_hf, bart_source, _ = _checkpoint_config(model.generator, "bart", "model.generator")
        generator = BartConfig.from_hf_config(bart_hf)
    else:
        tok = _generator_tokenizer(config)
        generator = BartConfig(
            vocab_size=tok["size"], pad_token_id=tok["pad"], bos_token_id=tok["bos"],
            eos_token_id=tok["eos"], decoder_start_token_id=tok["bos"], forced_bos_token_id=None,
            forced_eos_token_id=None, **model.generator_init.to_dict(),
        )  # fmt: skip
        bart_source = "config.model.generator_init"
    return query, generator, {"query_encoder": bert_source, "generator": bart_source}


def _pooling(path: str) -> tuple[str, bool]:
    """A query encoder's pooling and normalisation, as ``load_bert_encoder`` reads them."""
    if path and Path(path).is_dir():
        from rag_jax.models.sentence_transformers import read_sentence_transformers

        spec = read_sentence_transformers(path)
        return spec.pooling or "cls", spec.normalize
    return "cls", False  # DPR


def abstract_train_state(config: ml_collections.ConfigDict, mesh) -> tuple[RagModel, Any, dict]:
    """``(model, optimizer, sources)``: every variable a ``jax.ShapeDtypeStruct`` laid out on
    ``mesh`` as ``training._place_on_mesh`` lays the real ones (parameters by
    ``param_rules``, moments like their parameters, counters replicated)."""
    query, generator, sources = model_shapes(config)
    dtype = jnp.bfloat16 if config.model.bf16 else jnp.float32
    pooling, normalize = _pooling(config.model.question_encoder)
    tx, _ = make_optimizer(config)

    def make():
        rngs = nnx.Rngs(config.seed)
        # The pooler is not built: RAG never reads it (and a DPR checkpoint has none).
        query_encoder = BertEncoder(
            query, pooling=pooling, normalize=normalize, add_pooling_layer=False, dtype=dtype,
            remat=config.model.remat, rngs=rngs,
        )  # fmt: skip
        bart = Bart(generator, dtype=dtype, remat=config.model.remat, rngs=rngs)
        model = RagModel(query_encoder, bart, rag_config(config))
        return model, nnx.Optimizer(model, tx, wrt=trainable(config))

    model, optimizer = nnx.eval_shape(make)
    rules = param_rules(config)
    for module in (model, optimizer):
        state = nnx.state(module)
        shardings = partitioning.param_shardings(state, mesh, rules)
        nnx.update(
            module,
            jax.tree.map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
            ),
        )
    return model, optimizer, sources


# --------------------------------------------------------------------------------------
# The step's inputs
# --------------------------------------------------------------------------------------


def _rows(mesh, shape, dtype) -> jax.ShapeDtypeStruct:
    """A batch input: rows split over the whole mesh, as ``training._shard_batch`` puts it."""
    sharding = NamedSharding(mesh, PartitionSpec(partitioning.MESH_AXES))
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def abstract_batch(config: ml_collections.ConfigDict, model: RagModel, mesh) -> RagBatch:
    """The host-retrieval step's :class:`RagBatch` (global shapes, as ``BatchBuilder`` makes
    them: int32 ids, bool masks, float32 document vectors)."""
    rag = model.config
    B, L, S = config.batch_size, rag.max_question_length, rag.max_context_length
    T = rag.max_target_length
    K, H = (1, 1) if rag.closed_book else (rag.n_docs, model.query_encoder.output_dim)
    i32, b = jnp.int32, jnp.bool_
    return RagBatch(
        question_ids=_rows(mesh, (B, L), i32), question_mask=_rows(mesh, (B, L), b),
        doc_vectors=_rows(mesh, (B, K, H), jnp.float32), doc_mask=_rows(mesh, (B, K), b),
        context_ids=_rows(mesh, (B, K, S), i32), context_mask=_rows(mesh, (B, K, S), b),
        decoder_input_ids=_rows(mesh, (B, T), i32), targets=_rows(mesh, (B, T), i32),
        target_mask=_rows(mesh, (B, T), b),
    )  # fmt: skip


def abstract_questions(config, model: RagModel, mesh, n_special: int = 2):
    """The device-retrieval step's :class:`~rag_jax.device_retrieval.QuestionBatch`; the
    suffix width Q is S minus the generator tokenizer's ``n_special`` tokens (2 for BART's
    ``<s>``/``</s>`` and BERT's ``[CLS]``/``[SEP]``)."""
    rag = model.config
    B, L, T = config.batch_size, rag.max_question_length, rag.max_target_length
    Q = max(rag.max_context_length - n_special, 1)
    i32, b = jnp.int32, jnp.bool_
    return device_retrieval.QuestionBatch(
        question_ids=_rows(mesh, (B, L), i32), question_mask=_rows(mesh, (B, L), b),
        suffix_ids=_rows(mesh, (B, Q), i32), suffix_lengths=_rows(mesh, (B,), i32),
        decoder_input_ids=_rows(mesh, (B, T), i32), targets=_rows(mesh, (B, T), i32),
        target_mask=_rows(mesh, (B, T), b),
    )  # fmt: skip


def abstract_corpus(
    model: RagModel, mesh, n_passages: int, index_dtype=jnp.bfloat16, n_special: int = 2
) -> device_retrieval.DeviceCorpus:
    """An exact index of ``n_passages`` (N) vectors and their passages' tokens (N', P), rows
    sharded over every axis of ``mesh`` (N padded to the chips), as ``ExactIndex.from_array``
    and ``device_retrieval.device_corpus`` place them; BART's special tokens around each
    input."""
    H = model.query_encoder.output_dim
    n_shards = mesh.devices.size
    padded = math.ceil(n_passages / n_shards) * n_shards
    axes = tuple(mesh.axis_names)
    sharding = NamedSharding(mesh, PartitionSpec(axes))
    vectors = jax.ShapeDtypeStruct((padded, H), index_dtype, sharding=sharding)
    index = ExactIndex(vectors, n_passages, mesh, axes)
    P = max(model.config.max_context_length - n_special, 1)
    return device_retrieval.DeviceCorpus(
        index,
        jax.ShapeDtypeStruct((padded, P), jnp.int32, sharding=sharding),
        jax.ShapeDtypeStruct((padded,), jnp.int32, sharding=sharding),
        lead=(0,), trail=(2,), pad_id=1,
    )  # fmt: skip


# --------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------

_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
    "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1,
}  # fmt: skip
_SHAPE = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_COLLECTIVE = re.compile(r"(.+?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
# The TPU compiler's reduce-scatter: a fusion calling a computation named so.
_RS_FUSION_BODY = "all-reduce-scatter"
_RS_FUSION = re.compile(rf"calls=%{_RS_FUSION_BODY}")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_CALLED = re.compile(r"\b(?:calls|body|to_apply)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_WHILE = re.compile(r"\swhile\((%[\w.\-]+)\).*condition=%([\w.\-]+), body=%([\w.\-]+)")
_NAMED = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_OP_NAME = re.compile(r'op_name="(?:jit\([\w.]+\)/)?([^"]*)"')
_INDEX_COMMENT = re.compile(r"/\*index=\d+\*/")


def _result_bytes(result: str, kind: str, start: bool) -> int:
    """Bytes of an op's result type. An async ``-start`` of an all-gather or a permute returns
    the tuple (operands..., outputs...[, u32[] sync flags]): its output half counts; an
    ``all-reduce-start`` returns its outputs alone."""
    shapes = _SHAPE.findall(result)
    if start and kind != "all-reduce":
        shapes = [(dtype, dims) for dtype, dims in shapes if (dtype, dims) != ("u32", "")]
        shapes = shapes[len(shapes) // 2 :] if len(shapes) > 1 else shapes
    return sum(
        _DTYPE_BYTES.get(dtype, 0) * math.prod(int(d) for d in dims.split(",") if d)
        for dtype, dims in shapes
    )


@dataclasses.dataclass
class _Module:
    """An HLO module's text by computation: ``{computation: {instruction: text after '='}}``,
    each computation's ROOT instruction, and the entry computation's name."""

    computations: dict[str, dict[str, str]]
    roots: dict[str, str]
    entry: str


def _parse(hlo_text: str) -> _Module:
    computations: dict[str, dict[str, str]] = {}
    roots: dict[str, str] = {}
    entry, current = "", None
    for line in hlo_text.splitlines():
        if line[:1] not in ("", " ", "\t"):
            header = _COMPUTATION.match(line)
            current = header.group(2) if header else None
            if header:
                computations[current] = {}
                entry = current if header.group(1) else entry
        elif current is not None and (named := _NAMED.match(line)):
            computations[current][named.group(1)] = named.group(2)
            if line.lstrip().startswith("ROOT "):
                roots[current] = named.group(1)
    return _Module(computations, roots, entry)


def _operands(text: str, op: str) -> list[str]:
    """The operand names of the first ``op(...)`` in an instruction's text."""
    m = re.search(rf"\b{op}\((.*?)\)(?:,|$)", _INDEX_COMMENT.sub("", text))
    return re.findall(r"%[\w.\-]+", m.group(1)) if m else []


def _constant(body: dict[str, str], name: str, depth: int = 4) -> int | None:
    """The integer an instruction holds, through ``copy``s."""
    text = body.get(name.lstrip("%"), "")
    if m := re.match(r"\S+ constant\((-?\d+)\)", text):
        return int(m.group(1))
    if depth and (m := re.match(r"\S+ copy\((%[\w.\-]+)\)", text)):
        return _constant(body, m.group(1), depth - 1)
    return None


def _trip_count(module: _Module, caller: str, init: str, condition: str, body: str) -> int | None:
    """Iterations of a counted ``while`` (``i = start; while i < limit: ...; i += step``, as
    XLA writes its windowed-einsum loops), read from the condition's and the body's ROOTs and
    the initial tuple; None when the loop is not of that form."""
    comps = module.computations
    cond, loop, outer = comps.get(condition, {}), comps.get(body, {}), comps.get(caller, {})
    test = cond.get(module.roots.get(condition, ""), "")
    compared = _operands(test, "compare")
    if "direction=LT" not in test or len(compared) != 2:
        return None
    counter, limit = cond.get(compared[0].lstrip("%"), ""), _constant(cond, compared[1])
    index = re.search(r"get-tuple-element\(%[\w.\-]+\), index=(\d+)", counter)
    initial = _operands(outer.get(init.lstrip("%"), ""), "tuple")
    updated = _operands(loop.get(module.roots.get(body, ""), ""), "tuple")
    if limit is None or not index or int(index.group(1)) >= min(len(initial), len(updated)):
        return None
    i = int(index.group(1))
    start = _constant(outer, initial[i])
    added = _operands(loop.get(updated[i].lstrip("%"), ""), "add")
    steps = [_constant(loop, name) for name in added]
    step = next((value for value in steps if value), None)
    if start is None or step is None or step < 0 or len(added) != 2:
        return None
    return max(0, math.ceil((limit - start) / step))


@dataclasses.dataclass
class _Walk:
    """Per reachable computation: how many times it runs per step (``times``), the
    windowed-einsum ring it is a body of (``rings``), whether its collectives are counted
    elsewhere (``elsewhere``); and the loops whose trip count could not be read."""

    times: dict[str, int]
    rings: dict[str, str | None]
    elsewhere: set[str]
    unknown_loops: int


def _walk(module: _Module) -> _Walk:
    """Runs per step of every computation: the entry once; a callee as often as all its call
    sites together, a loop body times the loop's trip count (a loop whose count cannot be read:
    once, and counted in ``unknown_loops``).

    Counted elsewhere: the body of a reduce-scatter fusion (the fusion is the reduce-scatter),
    and the pieces of an async collective fusion (TPU v5e): an ``async-collective-start``
    begins one collective, ``async_collective_fusion`` computations carry it on inside other
    ops (each writes the whole result's shape but moves a part), ``async-collective-done``
    ends it: it counts once, at its start."""
    calls: dict[str, list[tuple[str, int, str]]] = collections.defaultdict(list)
    loops: dict[str, list[int | None]] = collections.defaultdict(list)
    for name, body in module.computations.items():
        for instruction, text in body.items():
            called = _CALLED.findall(text)
            if m := _BRANCHES.search(text):
                called += [c.strip().lstrip("%") for c in m.group(1).split(",")]
            loop, trips = _WHILE.search(text), None
            if loop:
                trips = _trip_count(module, name, *loop.groups())
            if loop or re.search(r"\swhile\(", text):
                loops[name].append(trips)
            for callee in called:
                factor = (trips or 1) if loop and callee == loop.group(3) else 1
                calls[callee].append((name, factor, instruction))

    times: dict[str, int] = {}

    def runs(name: str) -> int:
        if name not in times:
            times[name] = 0  # a cycle (none in HLO) contributes nothing
            own = 1 if name == module.entry else 0
            times[name] = own + sum(runs(c) * f for c, f, _ in calls.get(name, []))
        return times[name]

    reached = [name for name in module.computations if runs(name)]
    rings: dict[str, str | None] = {}
    elsewhere: set[str] = set()

    def classify(name: str) -> None:
        if name in rings:
            return
        rings[name] = None
        for caller, _, instruction in calls.get(name, []):
            classify(caller)
            rings[name] = rings[name] or rings[caller]
            if (
                name.startswith((_RS_FUSION_BODY, "async_collective_fusion"))
                or instruction.startswith("async-collective-done")
                or caller in elsewhere
            ):
                elsewhere.add(name)
        if "windowed_dot_general_body_rs" in name:
            rings[name] = "reduce-scatter"
        elif "windowed_dot_general_body_ag" in name:
            rings[name] = "all-gather"

    for name in reached:
        classify(name)
    unknown = sum(trips is None for name in reached for trips in loops.get(name, []))
    return _Walk({n: times[n] for n in reached}, rings, elsewhere, unknown)


def _analyse(hlo_text: str) -> tuple[list[dict], int]:
    """:func:`collective_ops` and :func:`loops_of_unknown_trip_count` from one parse."""
    module = _parse(hlo_text)
    walk = _walk(module)
    found = []
    for name, runs in walk.times.items():
        if name in walk.elsewhere:
            continue
        for text in module.computations[name].values():
            if op := _COLLECTIVE.match(text):
                kind = op.group(2)
                size = _result_bytes(op.group(1), kind, bool(op.group(3)))
            elif _RS_FUSION.search(text):
                kind = "reduce-scatter"
                size = _result_bytes(text.split(" fusion(")[0], kind, False)
            else:
                continue
            source = _OP_NAME.search(text)
            ring = walk.rings[name] if kind == "collective-permute" else None
            found.append({
                "kind": kind, "bytes": size, "times": runs,
                "source": source.group(1) if source else "", "ring": ring,
            })  # fmt: skip
    # XLA peels a ring's first or last step out of its loop: a permute of the same jax op.
    ring_of = collections.defaultdict(set)
    for op in found:
        if op["ring"]:
            ring_of[op["source"]].add(op["ring"])
    for op in found:
        if op["kind"] == "collective-permute" and not op["ring"]:
            rings_of_source = ring_of.get(op["source"], set())
            if len(rings_of_source) == 1:
                op["ring"] = next(iter(rings_of_source))
            elif op["source"].endswith("dot_general"):  # a ring XLA unrolled whole
                op["ring"] = "collective matmul"
    return found, walk.unknown_loops


def collective_ops(hlo_text: str) -> list[dict]:
    """Every collective of a compiled (per-chip) HLO module, each as ``{"kind", "bytes" (one
    execution, per chip), "times" (executions per step), "source" (the jax op it implements,
    from the HLO metadata), "ring"}``.

    ``bytes`` is the op's result per chip: an all-gather's or all-reduce's whole array, a
    reduce-scatter's shard, a permute's block. It is not the traffic on the links (a ring
    all-reduce sends about twice its array, a reduce-scatter about its whole input): the
    ICI term built on it is a lower bound.

    ``ring`` names the collective a ``collective-permute`` is a step of, when it runs in one of
    XLA's windowed-einsum loops (a "collective matmul": a weight all-gather, ``"all-gather"``,
    or a gradient reduce-scatter, ``"reduce-scatter"``, split into ring steps that overlap the
    matmul; also a step XLA peeled out of such a loop, a permute of the same jax op), or
    ``"collective matmul"`` for a matmul's permute outside any such loop (a ring XLA unrolled
    whole, its direction not read); else None. An op inside a counted loop runs once per
    iteration (``times``; a loop whose count cannot be read counts once:
    :func:`loops_of_unknown_trip_count`); the TPU compiler's reduce-scatter fusions (calling an
    ``all-reduce-scatter`` computation) are one reduce-scatter each, the all-reduce inside them
    not counted again. An async ``-start``/``-done`` pair counts once.
    """
    return _analyse(hlo_text)[0]


def loops_of_unknown_trip_count(hlo_text: str) -> int:
    """How many ``while`` loops :func:`collective_ops` counted once for want of a trip count."""
    return _analyse(hlo_text)[1]


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """Every collective of a compiled (per-chip) HLO module by kind, per step:
    ``{kind: {"count": executions, "bytes": their results' bytes per chip}}``
    (:func:`collective_ops`; a ``collective-permute`` that is a step of a windowed-einsum ring
    counts under its kind)."""
    return _by_kind(collective_ops(hlo_text))


def collective_sources(hlo_text: str) -> list[dict]:
    """The collectives grouped by what they implement: ``[{"kind", "ring", "source", "count",
    "bytes"}]`` per step and chip, largest first; ``source`` is the jax op (e.g.
    ``transpose(jvp())/dot_general``: a matmul of the backward pass)."""
    return _by_source(collective_ops(hlo_text))


def _by_kind(ops: list[dict]) -> dict[str, dict[str, int]]:
    found = {kind: {"count": 0, "bytes": 0} for kind in COLLECTIVES}
    for op in ops:
        found[op["kind"]]["count"] += op["times"]
        found[op["kind"]]["bytes"] += op["times"] * op["bytes"]
    return found


def _by_source(ops: list[dict]) -> list[dict]:
    groups: dict[tuple, dict] = {}
    for op in ops:
        key = (op["kind"], op["ring"], op["source"])
        group = groups.setdefault(key, {"kind": key[0], "ring": key[1], "source": key[2],
                                        "count": 0, "bytes": 0})  # fmt: skip
        group["count"] += op["times"]
        group["bytes"] += op["times"] * op["bytes"]
    return sorted(
        groups.values(), key=lambda g: (-g["bytes"], g["kind"], g["ring"] or "", g["source"])
    )


def _bytes_of(tree) -> int:
    """Per-chip bytes of a tree of sharded ``ShapeDtypeStruct`` (each chip's shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        if not hasattr(leaf, "shape"):
            continue
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        is_key = jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
        total += math.prod(shape) * (8 if is_key else jnp.dtype(leaf.dtype).itemsize)  # 2 x u32
    return total


def _model_flops(model: RagModel, config, batch_size: int) -> int:
    """Model FLOPs of one step (:func:`rag_jax.flops.model_flops`)."""
    rag = model.config
    shapes = dict(
        B=batch_size, K=1 if rag.closed_book else rag.n_docs, L=rag.max_question_length,
        S=rag.max_context_length, T=rag.max_target_length,
    )  # fmt: skip
    return int(model_flops(model, shapes)["total"])


_OUT_OF_HBM = re.compile(r"Ran out of memory|RESOURCE_EXHAUSTED")
_NEEDED = re.compile(r"HLO temporaries \(([0-9.]+)([KMGT])\)")


def out_of_hbm(message: str) -> int | None:
    """The temporary bytes XLA says a program needs, from its refusal to compile one that
    exceeds HBM (``RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for
    HLO temporaries (17.13G) exceeds available HBM (15.75G)``); ``None`` for any other error,
    0 when the message names no figure."""
    if not _OUT_OF_HBM.search(message):
        return None
    match = _NEEDED.search(message)
    if not match:
        return 0
    return int(float(match.group(1)) * 2 ** (10 * ("KMGT".index(match.group(2)) + 1)))


def compile_step(
    config: ml_collections.ConfigDict,
    topology: str,
    retrieval: str = "host",
    n_passages: int | None = None,
    hlo_file: str | None = None,
) -> dict:
    """Compiles ``train.py``'s step for ``config`` on ``topology`` and returns the report.

    Args:
      config: a training config (``configs/*.py``), overrides applied.
      topology: a TPU topology name, e.g. ``"v5p:4x4x4"`` (64 chips), ``"v5e:2x4"`` (8).
      retrieval: ``"host"`` (``training.train_step``) or ``"device"``
        (``training.device_train_step`` over an exact index of ``n_passages`` bf16 vectors).
      n_passages: N of the device index; default DPR's Wikipedia, 21,015,300.

    Raises:
      ValueError: a mesh or batch that does not fit the chips, a model path with no
        config.json nor preset, an unknown generation or retrieval.
      RuntimeError: libtpu missing.
    """
    if retrieval not in ("host", "device"):
        raise ValueError(f"--retrieval must be 'host' or 'device', got {retrieval!r}")
    chip = chip_of(topology)
    devices = tpu_devices(topology)
    mesh = make_mesh(config, devices)
    model, optimizer, sources = abstract_train_state(config, mesh)
    with jax.set_mesh(mesh):
        if retrieval == "host":
            inputs = (abstract_batch(config, model, mesh),)
            traced = train_step.trace(model, optimizer, *inputs)
        else:
            n_passages = n_passages or 21_015_300
            retrieval_state = nnx.state(model.query_encoder)
            inputs = (
                abstract_corpus(model, mesh, n_passages),
                retrieval_state,
                abstract_questions(config, model, mesh),
            )
            traced = device_train_step.trace(model, optimizer, *inputs)
        try:
            compiled = traced.lower().compile()
        except Exception as error:  # jax's XlaRuntimeError; only the HBM shortfall is a result
            needed = out_of_hbm(str(error))
            if needed is None:
                raise
            compiled = None
    n_chips = len(devices)
    params = _bytes_of(nnx.state(model, nnx.Param))
    other_model = _bytes_of(nnx.state(model, nnx.Not(nnx.Param)))
    opt = _bytes_of(nnx.state(optimizer))
    batch = _bytes_of(inputs[-1])  # a RagBatch or a QuestionBatch
    corpus = _bytes_of(inputs[0]) if retrieval == "device" else 0
    hbm = chip.hbm_gib * 2**30
    model_flops = _model_flops(model, config, config.batch_size)
    report = {
        "topology": topology,
        "chips": n_chips,
        "chip": dataclasses.asdict(chip),
        "retrieval": retrieval,
        "n_passages": n_passages if retrieval == "device" else None,
        "mesh": dict(mesh.shape),
        "batch_size": config.batch_size,
        "bf16": bool(config.model.bf16),
        "remat": bool(config.model.remat),
        "fsdp_params": bool(config.mesh.fsdp_params),
        "models": sources,
        "model_flops": model_flops,
        "versions": {"jax": jax.__version__, "libtpu": _libtpu_version()},
    }
    if compiled is None:
        # XLA refuses to build a program whose temporaries exceed the chip's HBM: the report
        # says so with XLA's figure, and has no HLO to count collectives or FLOPs in.
        return report | {
            "per_chip_bytes": {
                "parameters": params, "optimizer_state": opt, "other_model_state": other_model,
                "batch": batch, "device_index_and_passages": corpus, "temporaries": needed,
            },
            "hbm_bytes": hbm,
            "fits": False,
            "compile_error": "XLA: HLO temporaries exceed the chip's HBM",
        }  # fmt: skip
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    hlo = compiled.as_text()
    if hlo_file:
        Path(hlo_file).write_text(hlo)
    per_chip = {
        "parameters": params,
        "optimizer_state": opt,
        "other_model_state": other_model,
        "batch": batch,
        "device_index_and_passages": corpus,
        "arguments": int(memory.argument_size_in_bytes),
        "outputs": int(memory.output_size_in_bytes),
        "aliased": int(memory.alias_size_in_bytes),
        "temporaries": int(memory.temp_size_in_bytes),
        "generated_code": int(memory.generated_code_size_in_bytes),
    }
    # Donated parameters and optimizer state are aliased to the outputs: counted once.
    peak = (
        per_chip["arguments"]
        + per_chip["outputs"]
        - per_chip["aliased"]
        + per_chip["temporaries"]
        + per_chip["generated_code"]
    )
    return report | {
        "per_chip_bytes": per_chip,
        "per_chip_peak_bytes": peak,
        "hbm_bytes": hbm,
        "fits": peak <= hbm,
        **step_figures(
            hlo, chip, float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0)),
            model_flops, n_chips,
        ),
    }  # fmt: skip


def step_figures(
    hlo: str, chip: Chip, xla_flops: float, hbm_bytes: float, model_flops: float, n_chips: int
) -> dict:
    """The compiled step's collectives (:func:`collectives`, :func:`collective_sources`) and
    its roofline: ``max(xla_flops / bf16 peak, hbm_bytes / HBM bandwidth, collective bytes /
    ICI bandwidth)`` seconds, all per chip, and the MFU that bound would allow
    (``model_flops / (n_chips x peak x bound)``). A lower bound on the step time, not a
    measurement."""
    ops, unknown_loops = _analyse(hlo)
    found = _by_kind(ops)
    collective_bytes = sum(v["bytes"] for v in found.values())
    terms = {
        "compute": xla_flops / (chip.bf16_tflops * 1e12),
        "hbm": hbm_bytes / (chip.hbm_gbytes_per_s * 1e9),
        "collectives": collective_bytes / (chip.ici_gbytes_per_s * 1e9),
    }
    bound = max(terms.values())
    return {
        "xla_flops_per_chip": xla_flops,
        "xla_bytes_accessed_per_chip": hbm_bytes,
        "collectives": found,
        "collective_sources": _by_source(ops),
        "loops_of_unknown_trip_count": unknown_loops,
        "collective_bytes_per_chip": collective_bytes,
        "roofline_seconds": terms,
        "step_time_lower_bound_s": bound,
        "bound_by": max(terms, key=terms.get),
        "mfu_upper_bound": model_flops / (n_chips * chip.bf16_tflops * 1e12 * bound)
        if bound > 0
        else None,
    }


def _libtpu_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("libtpu")
    except metadata.PackageNotFoundError:
        return None


def _gib(n: float) -> str:
    return f"{n / 2**30:.3f} GiB" if n >= 2**28 else f"{n / 2**20:.3f} MiB"


_SOURCES_SHOWN = 12


def format_report(report: dict) -> str:
    """The report as lines of text."""
    chip, pc = report["chip"], report["per_chip_bytes"]
    lines = [
        f"{report['topology']}: {report['chips']} x TPU {chip['name']}, mesh {report['mesh']}, "
        f"{report['retrieval']} retrieval"
        + (f" over {report['n_passages']:,} passages" if report["n_passages"] else "")
        + f", batch {report['batch_size']}, bf16={report['bf16']}, remat={report['remat']}, "
        f"fsdp_params={report['fsdp_params']}",
        f"models: {report['models']['query_encoder']} + {report['models']['generator']}",
        "per chip (XLA memory analysis; parameters/optimizer/batch: the arguments' shards):",
    ]
    names = ("parameters", "optimizer_state", "batch", "device_index_and_passages", "arguments",
             "temporaries", "outputs")  # fmt: skip
    for name in names:
        if name in pc:
            lines.append(f"  {name:<26} {_gib(pc[name])}")
    if "compile_error" in report:
        lines.append(
            f"  DOES NOT FIT: {report['compile_error']} ({_gib(pc['temporaries'])} of temporaries"
            f" against {chip['hbm_gib']:g} GiB); model FLOPs {report['model_flops']:.4g} per step"
        )
        lines.append(f"chip figures: {chip['source']}; versions {report['versions']}")
        return "\n".join(lines)
    lines.append(
        f"  peak ~{_gib(report['per_chip_peak_bytes'])} of {chip['hbm_gib']:g} GiB HBM: "
        + ("fits" if report["fits"] else "DOES NOT FIT")
    )
    lines.append(
        f"FLOPs per step: model {report['model_flops']:.4g} "
        f"({report['model_flops'] / report['chips']:.4g} per chip); "
        f"XLA {report['xla_flops_per_chip']:.4g} per chip"
    )
    lines.append("collectives per step (per chip):")
    for kind, value in report["collectives"].items():
        lines.append(f"  {kind:<19} {value['count']:>5}  {value['bytes'] / 2**20:10.2f} MiB")
    lines.append("  by the jax op each implements (ring: a step of a collective matmul):")
    for group in report["collective_sources"][:_SOURCES_SHOWN]:
        kind = group["kind"] + (f" ({group['ring']} ring)" if group["ring"] else "")
        lines.append(
            f"    {kind:<38} {group['count']:>5}  {group['bytes'] / 2**20:10.2f} MiB  "
            f"{group['source'] or '(no jax op named)'}"
        )
    if report["loops_of_unknown_trip_count"]:
        lines.append(
            f"  ({report['loops_of_unknown_trip_count']} loops of unknown trip count: their "
            "collectives counted once, an undercount)"
        )
    terms = report["roofline_seconds"]
    lines.append(
        "roofline LOWER BOUND on the step time (not a measurement): "
        f"compute {terms['compute'] * 1e3:.2f} ms ({chip['bf16_tflops']:g} TFLOP/s), "
        f"HBM {terms['hbm'] * 1e3:.2f} ms ({chip['hbm_gbytes_per_s']:g} GB/s), "
        f"collectives {terms['collectives'] * 1e3:.2f} ms (ICI {chip['ici_gbytes_per_s']:g} GB/s)"
        f" -> >= {report['step_time_lower_bound_s'] * 1e3:.2f} ms, bound by "
        f"{report['bound_by']}; MFU <= {100 * (report['mfu_upper_bound'] or 0):.1f}%"
    )
    lines.append(f"chip figures: {chip['source']}; versions {report['versions']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    """``python -m rag_jax.compile``: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="configs/X.py")
    parser.add_argument("--topology", required=True, help="e.g. v5p:4x4x4, v5e:2x4")
    parser.add_argument(
        "--retrieval", choices=("host", "device", "both"), help="default: the config's"
    )
    parser.add_argument("--passages", type=int, default=21_015_300, help="N of a device index")
    parser.add_argument("--json", help="also write the report(s) here")
    parser.add_argument("--hlo", help="write the compiled HLO here (RETRIEVAL is appended)")
    args, overrides = parser.parse_known_args(argv)
    config = _load_config(args.config, overrides)
    mode = args.retrieval or config.data.retrieval
    modes = ["host", "device"] if mode == "both" else [mode]
    reports = []
    try:
        for retrieval in modes:
            hlo = f"{args.hlo}.{retrieval}" if args.hlo else None
            report = compile_step(config, args.topology, retrieval, args.passages, hlo)
            print(format_report(report), flush=True)
            reports.append(report)
    except (ValueError, RuntimeError, OSError) as error:
        sys.exit(f"error: {error}")
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=1, default=str) + "\n")
    return reports


def _load_config(path: str, overrides: list[str]) -> ml_collections.ConfigDict:
    """``configs/X.py``'s config with ``--config.a.b=v`` overrides (as train.py takes them).

    Raises:
      SystemExit: naming the override, for one that names no field or is malformed.
    """
    import importlib.util

    spec = importlib.util.spec_from_file_location("_rag_jax_config", path)
    if spec is None or not Path(path).is_file():
        sys.exit(f"error: --config {path!r} is not a config file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for override in overrides:
        if not override.startswith("--config.") or "=" not in override:
            sys.exit(f"error: unknown argument {override!r} (overrides: --config.a.b=value)")
        key, value = override[len("--config.") :].split("=", 1)
        *parents, name = key.split(".")
        node = config
        try:
            for parent in parents:
                node = node[parent]
            old = node[name]
        except (KeyError, AttributeError):
            sys.exit(f"error: {override!r} names no config field")
        node[name] = _parse_value(value, old, override)
    return config


def _parse_value(text: str, old: Any, override: str) -> Any:
    """An override's value, of the type of the field's default."""
    if isinstance(old, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            sys.exit(f"error: {override!r}: expected true or false")
        return text.lower() in ("true", "1")
    try:
        return type(old)(text) if isinstance(old, int | float) else text
    except ValueError:
        sys.exit(f"error: {override!r}: expected a {type(old).__name__}")


if __name__ == "__main__":
    main()
