"""rag_jax.models.layers, the blocks BERT and BART share, against their PyTorch counterparts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from rag_jax.models import layers
from rag_jax.models.bart import Bart, BartConfig
from rag_jax.models.bert import BertConfig, BertEncoder
from tests.oracles import TINY_BART, TINY_BERT


def _large_mean_rows(seed: int = 0, H: int = 768) -> np.ndarray:
    """Rows whose mean (~30) is 30x their spread (~1): where E[x²] - mean² cancels."""
    rng = np.random.default_rng(seed)
    return (30.0 + rng.normal(size=(16, H)) * rng.uniform(0.5, 1.5, (16, 1))).astype(np.float32)


def test_layer_norm_matches_torch_on_large_mean_rows():
    x = _large_mean_rows()
    H = x.shape[1]
    rng = np.random.default_rng(1)
    scale, bias = 1 + 0.1 * rng.normal(size=H), 0.1 * rng.normal(size=H)
    reference = torch.nn.LayerNorm(H, eps=1e-5)
    with torch.no_grad():
        reference.weight.copy_(torch.from_numpy(scale))
        reference.bias.copy_(torch.from_numpy(bias))
        expected = reference(torch.from_numpy(x)).numpy()

    def normalise(norm: nnx.LayerNorm) -> np.ndarray:
        norm.scale.set_value(jnp.asarray(scale, jnp.float32))
        norm.bias.set_value(jnp.asarray(bias, jnp.float32))
        return np.asarray(jax.jit(lambda x: norm(x))(x))

    ours = normalise(layers.layer_norm(H, 1e-5, jnp.float32, nnx.Rngs(0)))
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)
    # The rows do tell the two forms apart: Flax's single-pass variance fails the tolerance.
    fast = normalise(nnx.LayerNorm(H, epsilon=1e-5, rngs=nnx.Rngs(0)))
    assert np.abs(fast - expected).max() > 1e-5


def test_layer_norm_keeps_rows_split_on_a_mesh_with_the_same_values_and_gradients():
    """Under a training mesh the LayerNorm's input and output rows stay split over (data,
    fsdp), the width whole (what keeps the backward free of all-to-alls, see
    ``partitioning.constrain_rows``), while its scale and bias are FSDP-sharded; values and
    gradients equal those computed with no mesh. 6 rows do not divide over 4 chips: left to
    XLA, still the same values."""
    from rag_jax.models import partitioning

    x = _large_mean_rows()  # (16, H)
    H = x.shape[1]
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

    def loss(norm, x):
        return jnp.sum(norm(x) * w[: x.shape[0]])

    def run(norm, x):
        return jax.jit(lambda norm, x: (norm(x), nnx.grad(loss, argnums=(0, 1))(norm, x)))(norm, x)

    norm = layers.layer_norm(H, 1e-5, jnp.float32, nnx.Rngs(0))
    norm.scale.set_value(jnp.asarray(1 + 0.1 * rng.normal(size=H), jnp.float32))
    norm.bias.set_value(jnp.asarray(0.1 * rng.normal(size=H), jnp.float32))
    expected = {n: run(norm, x[:n]) for n in (16, 6)}
    mesh = partitioning.make_mesh(data=1, fsdp=4)
    partitioning.shard_module(norm, mesh)
    assert norm.scale.get_value().sharding.spec == jax.sharding.PartitionSpec("fsdp")
    with jax.set_mesh(mesh):
        for n in (16, 6):
            y, (g_norm, g_x) = run(norm, jax.device_put(x[:n]))
            y_ref, (g_norm_ref, g_x_ref) = expected[n]
            # Rows at mean 30 carry float32 rounding of 30 * 2**-24 ~ 2e-6 per value; another
            # summation order (per-shard rows) moves a normalised value by a few of those: the
            # torch parity tolerance above. The scale's gradient sums 16 such rows.
            np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=0)
            np.testing.assert_allclose(g_x, g_x_ref, atol=1e-5, rtol=0)
            np.testing.assert_allclose(g_norm.scale.get_value(), g_norm_ref.scale.get_value(),
                                       atol=1e-4, rtol=0)  # fmt: skip
            if n == 16:
                by_row = jax.NamedSharding(mesh, jax.sharding.PartitionSpec(partitioning.MESH_AXES))
                assert y.sharding.is_equivalent_to(by_row, y.ndim)
                assert y.sharding.shard_shape(y.shape) == (4, H)


def test_both_models_use_the_two_pass_layer_norm():
    bert = BertEncoder(BertConfig(**TINY_BERT), rngs=nnx.Rngs(0))
    bart = Bart(BartConfig(**TINY_BART, normalize_before=True), rngs=nnx.Rngs(0))
    # BERT: embeddings + 2 per layer; mBART: embeddings and final per stack, 2 per encoder
    # layer, 3 per decoder layer.
    for model, n_norms in ((bert, 1 + 2 * 2), (bart, 2 * 2 + 2 * 2 + 3 * 2)):
        norms = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.LayerNorm)]
        assert len(norms) == n_norms
        assert not any(norm.use_fast_variance for norm in norms)


@pytest.mark.parametrize("name", sorted(layers.ACTIVATIONS))
def test_activations_match_transformers(name):
    x = np.linspace(-6, 6, 121, dtype=np.float32)
    expected = transformers.activations.ACT2FN[name](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(layers.ACTIVATIONS[name](jnp.asarray(x)), expected, atol=1e-6)


def test_dot_product_attention_matches_torch():
    rng = np.random.default_rng(2)
    B, T, S, n, d = 2, 3, 5, 2, 4
    q, k, v = (rng.normal(size=(B, L, n, d)).astype(np.float32) for L in (T, S, S))
    mask = rng.uniform(size=(B, T, S)) < 0.6
    mask[:, :, 0] = True  # every query sees a key; a fully masked row is tested below
    dropout = nnx.Dropout(0.5, deterministic=True, rngs=nnx.Rngs(0))
    ours = layers.dot_product_attention(q, k, v, mask, dropout)  # (B, T, n, d)
    heads_first = lambda x: torch.from_numpy(x).transpose(1, 2)  # noqa: E731 -- (B, n, L, d)
    expected = torch.nn.functional.scaled_dot_product_attention(
        heads_first(q), heads_first(k), heads_first(v), attn_mask=torch.from_numpy(mask)[:, None]
    )
    np.testing.assert_allclose(ours, expected.transpose(1, 2).numpy(), atol=1e-6)

    # A query that may see no key averages all values uniformly (torch gives NaN here).
    mask[0, 1] = False
    ours = layers.dot_product_attention(q, k, v, mask, dropout)
    np.testing.assert_allclose(ours[0, 1], v[0].mean(axis=0), atol=1e-6)


def test_maybe_remat_recomputes_only_when_enabled():
    layer = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
    x = jnp.arange(6.0).reshape(2, 3)
    graphdef, params = nnx.split(layer)
    results = []
    for enabled in (False, True):
        call = layers.maybe_remat(lambda layer, x: jnp.tanh(layer(x)), enabled)

        def loss(params, call=call):
            return jnp.sum(call(nnx.merge(graphdef, params), x) ** 2)

        assert ("remat" in str(jax.make_jaxpr(jax.grad(loss))(params))) == enabled
        results.append(jax.grad(loss)(params))
    for a, b in zip(*map(jax.tree.leaves, results), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
