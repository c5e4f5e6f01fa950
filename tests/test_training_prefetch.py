"""The next batch built in a background thread while the step runs: the same losses as
building it in turn, and the host/device split reported."""

import numpy as np

from rag_jax.training import train
from tests.test_training import read_metrics, tiny_config, toy  # noqa: F401 (fixture)


def test_prefetch_changes_speed_not_results(toy, tmp_path):  # noqa: F811
    common = {"train_steps": 4, "log_every": 1, "rag.n_docs": 4, "mesh.fsdp": 1}
    train(tiny_config(toy, **common, **{"data.prefetch": False}), str(tmp_path / "in_turn"))
    train(tiny_config(toy, **common, **{"data.prefetch": True}), str(tmp_path / "prefetch"))
    in_turn, prefetch = read_metrics(tmp_path / "in_turn"), read_metrics(tmp_path / "prefetch")
    np.testing.assert_allclose(
        [m["loss"] for m in prefetch], [m["loss"] for m in in_turn], rtol=1e-6, atol=1e-6
    )
    assert len({m["loss"] for m in prefetch}) == 4  # the query encoder and generator learn
    for m in prefetch:
        assert m["host_seconds"] > 0 and m["device_seconds"] > 0
        assert 0 <= m["host_wait_seconds"] <= m["host_seconds"] + m["device_seconds"]
