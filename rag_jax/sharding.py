"""The training mesh and where things live on it: parameters (FSDP-sharded or replicated),
the optimizer state, and each batch (its rows split over every device of the mesh).

The mesh is ``(data, fsdp)`` (:mod:`rag_jax.models.partitioning` holds the logical axis names
and the one rules table); with several processes each process contributes its own rows of a
batch and holds only its own shards of every parameter.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rag_jax.models import partitioning


def param_rules(config: ml_collections.ConfigDict) -> partitioning.Rules:
    """Logical axes -> mesh axes for the parameters: FSDP-sharded if ``mesh.fsdp_params``,
    else whole on every device."""
    rules = partitioning.LOGICAL_RULES
    return rules if config.mesh.fsdp_params else partitioning.replicated_rules(rules)


def make_mesh(config: ml_collections.ConfigDict, devices: Sequence | None = None) -> Mesh:
    """The ``(data, fsdp)`` mesh of ``config.mesh`` over ``devices`` (default: this run's):
    ``data x fsdp`` devices (``fsdp`` 0: all the devices ``data`` leaves). One process may use
    fewer devices than it has (tests compare 1 device with 4); a multi-process run, and a pod
    topology named by ``devices`` (:mod:`rag_jax.compile`), use them all.

    Raises:
      ValueError: the mesh does not fit the devices, or the batch does not split over it.
    """
    whole = devices is not None or jax.process_count() > 1
    devices = jax.devices() if devices is None else list(devices)
    n_devices, n_processes = len(devices), jax.process_count()
    data = config.mesh.data
    fsdp = config.mesh.fsdp or n_devices // max(data, 1)
    if data < 1 or fsdp < 1 or data * fsdp > n_devices:
        raise ValueError(
            f"config.mesh (data={data}, fsdp={config.mesh.fsdp}) does not fit the "
            f"{n_devices} devices"
        )
    if whole and data * fsdp != n_devices:
        raise ValueError(
            f"config.mesh uses {data * fsdp} of {n_devices} devices: a multi-process run (a "
            "pod) must use them all"
        )
    if config.batch_size % (data * fsdp) or config.batch_size % n_processes:
        raise ValueError(
            f"config.batch_size {config.batch_size} must be a multiple of the mesh's "
            f"{data * fsdp} devices and of the {n_processes} processes"
        )
    return partitioning.make_mesh(data=data, fsdp=fsdp, devices=devices)


def place_on_mesh(model, tx, mesh, config, wrt) -> nnx.Optimizer:
    """Moves the model onto ``mesh`` (FSDP-sharded or replicated, :func:`param_rules`) where it
    is not there already (``build_model(config, mesh)`` puts it there), and creates the
    optimizer there for the parameters ``wrt`` (:func:`rag_jax.optim.trainable`): its moments
    follow the parameters' shardings, its counters are replicated."""
    state = nnx.state(model)
    shardings = partitioning.param_shardings(state, mesh, param_rules(config))
    nnx.update(model, jax.tree.map(partitioning.put, state, shardings))
    with jax.set_mesh(mesh):
        optimizer = nnx.Optimizer(model, tx, wrt=wrt)
    replicated = NamedSharding(mesh, PartitionSpec())

    def on_mesh(x):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
            return x
        return partitioning.put(x, replicated)  # counters created on the default device

    nnx.update(optimizer, jax.tree.map(on_mesh, nnx.state(optimizer)))
    if mesh.size == 1:
        # The step returns every array of a one-device mesh as PartitionSpec(): started
        # from equivalent but differently written shardings (P(None, None), or uncommitted
        # arrays), the second step would compile the whole program again.
        for node in (model, optimizer):
            nnx.update(node, jax.device_put(nnx.state(node), replicated))
    return optimizer


def batch_sharding(mesh) -> NamedSharding:
    """Batch axis split over the whole (data, fsdp) mesh; other axes whole."""
    return NamedSharding(mesh, PartitionSpec(partitioning.MESH_AXES))


def shard_batch(batch, mesh):
    """This process's rows of a batch (a pytree of numpy arrays) -> global device arrays, the
    batch axis split over the whole (data, fsdp) mesh; each process contributes its own rows."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch
    )


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a global array sharded on its first axis, in order."""
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    rows, seen = [], set()
    for shard in shards:
        start = shard.index[0].start or 0
        if start not in seen:  # replicas of the same rows on other axes
            seen.add(start)
            rows.append(np.asarray(shard.data))
    return np.concatenate(rows)
