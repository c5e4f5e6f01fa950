"""Logical axis names for parameters, and the one table that maps them onto a (data, fsdp) mesh.

Modules name the dimensions of every ``nnx.Param`` with logical axes (``axes(EMBED, MLP)`` for a
``(hidden, intermediate)`` kernel). Training code picks a mesh and turns those names into
shardings with :func:`param_shardings`, or shards a built model in place with
:func:`shard_module`::

    mesh = make_mesh(data=2)  # (data, fsdp) = (2, n_devices // 2)
    shardings = param_shardings(nnx.eval_shape(lambda: BertModel(config, rngs=nnx.Rngs(0))), mesh)

The annotations are plain Flax NNX ``out_sharding`` metadata, so Flax's own tools
(``nnx.get_partition_spec`` under ``nnx.logical_axis_rules(LOGICAL_RULES)``) read them too.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

# Mesh axes.
DATA = "data"  # data parallelism: parameters replicated, batch split
FSDP = "fsdp"  # fully sharded data parallelism: parameters and batch split
MESH_AXES = (DATA, FSDP)

# Logical axes of parameters and activations.
BATCH = "batch"  # examples in a batch
LENGTH = "length"  # token positions
EMBED = "embed"  # model width (hidden_size / d_model)
MLP = "mlp"  # feed-forward width (intermediate_size / ffn_dim)
HEADS = "heads"  # attention heads x head_dim, flattened (q/k/v/output projections)
VOCAB = "vocab"  # rows of a token embedding table

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# FSDP: every parameter is split along its model-width dimension; activations along the batch.
LOGICAL_RULES: Rules = (
    (BATCH, (DATA, FSDP)),
    (LENGTH, None),
    (EMBED, FSDP),
    (MLP, None),
    (HEADS, None),
    (VOCAB, None),
)


def make_mesh(data: int = 1, fsdp: int | None = None, devices: Sequence | None = None) -> Mesh:
    """A ``(data, fsdp)`` mesh over ``devices`` (default: all); ``fsdp=None`` takes the devices
    ``data`` leaves. Fewer devices than there are: the first ``data * fsdp`` of ``devices``.

    Its axes are ``Auto``: XLA's partitioner inserts FSDP's all-gathers, so model code needs no
    explicit output shardings (with ``Explicit`` axes, every matmul over a sharded width would).
    """
    devices = jax.devices() if devices is None else list(devices)
    fsdp = len(devices) // data if fsdp is None else fsdp
    auto = (AxisType.Auto, AxisType.Auto)
    return jax.make_mesh((data, fsdp), MESH_AXES, axis_types=auto, devices=devices[: data * fsdp])


def constrain_rows(x: jax.Array) -> jax.Array:
    """``x`` (rows first: B, B*K, ...) with its rows split over the mesh's ``(data, fsdp)`` axes
    and every other axis whole, under a ``jax.set_mesh`` training mesh; unchanged without one,
    inside ``shard_map``, or when the rows do not divide over the chips.

    Without it XLA's sharding propagation may follow an FSDP-sharded weight into an activation
    (its width split over ``fsdp``) and then move activation-sized tensors between a row split
    and a width split with all-to-alls; held to the rows, the activations stay where the batch
    is and only FSDP's weight gathers and gradient reductions move data.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names) or mesh.manual_axes:
        return x
    if x.ndim == 0 or x.shape[0] % (mesh.shape[DATA] * mesh.shape[FSDP]):
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(MESH_AXES))


def axes(*names: str | None) -> dict[str, Any]:
    """Param metadata naming each dimension: ``nnx.Linear(..., kernel_metadata=axes(EMBED, MLP))``.

    ``eager_sharding=False`` keeps module construction mesh-free (it works on one CPU); the
    caller shards later with :func:`param_shardings` / :func:`shard_module`.
    """
    return {"out_sharding": names, "eager_sharding": False}


def logical_to_mesh(names: Sequence[str | None], rules: Rules = LOGICAL_RULES) -> PartitionSpec:
    """Maps logical axis names to a ``PartitionSpec`` over mesh axes; unknown names replicate."""
    table = dict(rules)
    return PartitionSpec(*(table.get(name) if name is not None else None for name in names))


def _fit_to_shape(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Replicates any dimension whose size the mesh axes do not divide (e.g. a 30522-row vocab)."""
    fitted = []
    for dim, mesh_axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        names = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
        n_shards = 1
        for name in names:
            n_shards *= mesh.shape[name]
        fitted.append(mesh_axes if dim % n_shards == 0 else None)
    return PartitionSpec(*fitted)


def param_shardings(tree: Any, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> nnx.State:
    """``NamedSharding`` for every variable of a module (or its ``nnx.State``, possibly abstract).

    Variables without axis annotations (RNG state, counters) are replicated. Works on the output
    of ``nnx.eval_shape``, so shardings can be computed before any parameter exists.
    """
    state = tree if isinstance(tree, nnx.State) else nnx.state(tree)

    def sharding(variable: nnx.Variable) -> nnx.Variable:
        shape = tuple(getattr(variable.get_value(), "shape", ()))
        names = variable.get_metadata().get("out_sharding") or ()
        spec = _fit_to_shape(logical_to_mesh(names, rules), shape, mesh)
        return variable.replace(NamedSharding(mesh, spec))

    return jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated_rules(rules: Rules = LOGICAL_RULES) -> Rules:
    """``rules`` with every logical axis replicated: parameters whole on every device."""
    return tuple((name, None) for name, _ in rules)


def put(x: Any, sharding: NamedSharding) -> jax.Array:
    """One value onto ``sharding``, also when the mesh spans several processes.

    ``x`` (a numpy or jax array, a PRNG key) must be equal on every process; each process builds
    only its own shards from it. A jax array already laid out as ``sharding`` is returned as it
    is; one spanning other processes is resharded on the devices (never gathered to a host).
    """
    if isinstance(x, jax.Array):
        if x.sharding.is_equivalent_to(sharding, x.ndim):
            return x
        if jax.process_count() == 1 or not x.is_fully_addressable:
            return jax.device_put(x, sharding)
    if hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # raw data
        impl = jax.random.key_impl(x)
        return jax.random.wrap_key_data(put(jax.random.key_data(x), sharding), impl=impl)
    value = np.asarray(x)
    if jax.process_count() == 1:
        return jax.device_put(value, sharding)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def shard_module(module: nnx.Module, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> None:
    """Moves a module's variables onto ``mesh`` in place, laid out by their logical axes."""
    state = nnx.state(module)
    nnx.update(module, jax.tree.map(put, state, param_shardings(state, mesh, rules)))


ModuleT = TypeVar("ModuleT", bound=nnx.Module)


def create_sharded(
    make: Callable[[], ModuleT], mesh: Mesh, rules: Rules = LOGICAL_RULES
) -> ModuleT:
    """``make()``, its variables initialised directly into their shardings on ``mesh``.

    One jitted call whose outputs are constrained to :func:`param_shardings`: each device
    computes and holds only its own shards, and no parameter is ever whole on one device (nor
    on one host, with several processes). ``make`` must build its own ``nnx.Rngs`` (from a
    seed), since a jitted function may not change the caller's. A ``make`` that compares equal
    to an earlier one (a frozen dataclass, not a closure) reuses that one's traced and compiled
    initialiser: a second model of the same shapes in a process is not traced again.
    """
    rules = tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)
    create = _sharded_initializer(make, mesh, rules)  # rules as a key: tuples, not lists
    with jax.set_mesh(mesh):
        return create()


@functools.lru_cache(maxsize=8)
def _sharded_initializer(make: Callable[[], ModuleT], mesh: Mesh, rules: Rules):
    shardings = param_shardings(nnx.eval_shape(make), mesh, rules)

    @nnx.jit
    def create():
        module = make()
        nnx.update(module, jax.lax.with_sharding_constraint(nnx.state(module), shardings))
        return module

    return create
