"""``python -m rag_jax.compile``: train.py's step compiled for a TPU topology from libtpu alone.

The tiny config (``bert-tiny`` preset query encoder, a 1+1-layer generator from
``generator_init``) on ``v5e:2x2`` (4 abstract chips): the report's per-chip bytes against
values derived by hand from the shapes, the collective inventory, and the device-retrieval
step. libtpu is in the test extra: without it these tests skip loudly, and fail under CI.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
import pytest

from configs import tiny
from rag_jax import compile as rag_compile
from rag_jax.models import partitioning
from rag_jax.sharding import make_mesh

TOPOLOGY = "v5e:2x2"
CHIPS = 4


@pytest.fixture(scope="module")
def libtpu():
    if importlib.util.find_spec("libtpu") is None:
        message = "libtpu is not installed (pip install -e '.[test]'): TPU compiles untested"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def _config(fsdp_params: bool = True):
    config = tiny.get_config()
    config.model.question_encoder = "bert-tiny"  # a preset: no files
    config.mesh.fsdp_params = fsdp_params
    return config


@pytest.fixture(scope="module")
def host_report(libtpu, tmp_path_factory):
    """The command's JSON report for the tiny config's host-retrieval step, and its HLO."""
    out = tmp_path_factory.mktemp("compile")
    rag_compile.main(
        ["--config", tiny.__file__, "--topology", TOPOLOGY, "--retrieval", "host",
         "--config.model.question_encoder=bert-tiny", "--config.mesh.fsdp_params=true",
         "--json", str(out / "report.json"), "--hlo", str(out / "step.hlo")]
    )  # fmt: skip
    (report,) = json.loads((out / "report.json").read_text())
    report["hlo"] = (out / "step.hlo.host").read_text()
    return report


def test_host_step_report(host_report):
    report = host_report
    assert report["chips"] == CHIPS and report["mesh"] == {"data": 1, "fsdp": CHIPS}
    assert report["chip"]["name"] == "v5e" and report["chip"]["hbm_gib"] == 16
    per_chip = report["per_chip_bytes"]
    # One question per chip (B=4 over 4 chips), L=32, K=4, H=32, S=48, T=8:
    # ids/mask 32*4 + 32, doc vectors 4*32*4 + mask 4, contexts 4*48*4 + 4*48,
    # decoder inputs and targets 8*4 each, target mask 8.
    assert per_chip["batch"] == 128 + 32 + 512 + 4 + 768 + 192 + 32 + 32 + 8
    assert per_chip["device_index_and_passages"] == 0
    # The step's arguments are the parameters, the optimizer state, the RNG state and the batch.
    assert per_chip["arguments"] >= per_chip["parameters"] + per_chip["optimizer_state"]
    assert report["fits"] and 0 < report["per_chip_peak_bytes"] < report["hbm_bytes"]
    assert report["model_flops"] > 0 and report["xla_flops_per_chip"] > 0
    bound = report["step_time_lower_bound_s"]
    assert bound == max(report["roofline_seconds"].values()) > 0
    assert 0 < report["mfu_upper_bound"] <= 1
    assert report["versions"]["libtpu"]


def test_collective_inventory(host_report):
    """FSDP's parameter all-gathers, all-reduces (the gradients, which XLA combines and
    reduces whole at these sizes, and scalars: loss, counts, the gradient norm), and
    all-to-alls only where a token embedding table, split over its width, is looked up (and
    its gradient scattered back): the looked-up rows go to the chips of their batch rows,
    cheaper than gathering the table (README, "Checking a config for a pod"). The
    activations stay split by rows (``partitioning.constrain_rows``): no all-to-all of
    LayerNorm's backward nor of the retriever scores, no collective-permute."""
    found = host_report["collectives"]
    kinds = {k for k, v in found.items() if v["count"]}
    assert kinds <= {"all-gather", "all-reduce", "reduce-scatter", "all-to-all"}
    assert found["all-gather"]["count"] > 0 and found["all-reduce"]["count"] > 0
    assert found["collective-permute"]["count"] == 0
    ops = [
        re.search(r'op_name="([^"]*)"', line).group(1)
        for line in host_report["hlo"].splitlines()
        if re.search(r"\sall-to-all(-start)?\(", line)
    ]
    assert len(ops) == found["all-to-all"]["count"] > 0
    # jnp.take's gather (the lookup) and scatter-add (its transpose), nothing else
    assert all(re.search(r"jit\(_take\)+/(gather|scatter-add)$", op) for op in ops), ops


def test_parameters_split_over_chips_only_with_fsdp(libtpu):
    """Per-chip parameter bytes: the whole model when replicated; about 1/4 with FSDP (the
    logical rules split every EMBED dimension, 32 here, by 4; vectors over MLP or HEADS and
    the biases stay whole, a few percent of the bytes)."""
    mesh = make_mesh(_config(), rag_compile.tpu_devices(TOPOLOGY))
    sizes = {}
    for fsdp in (True, False):
        model, optimizer, _ = rag_compile.abstract_train_state(_config(fsdp), mesh)
        from flax import nnx

        params = nnx.state(model, nnx.Param)
        total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
        sizes[fsdp] = (rag_compile._bytes_of(params), rag_compile._bytes_of(nnx.state(optimizer)))
    assert sizes[False][0] == total
    assert total / CHIPS <= sizes[True][0] <= 1.15 * total / CHIPS
    # Adam's two moments per float32 parameter, laid out like the parameters (+ counters).
    assert 2 * sizes[True][0] <= sizes[True][1] <= 2 * sizes[True][0] + 1024


def test_device_retrieval_step_compiles(libtpu):
    n = 1000  # 250 rows per chip
    report = rag_compile.compile_step(_config(), TOPOLOGY, "device", n_passages=n)
    # Each chip's rows: a bf16 vector (H=32: 64 bytes), the passage tokens (P = S - 2 = 46
    # int32: 184 bytes) and the passage length (4 bytes).
    assert report["per_chip_bytes"]["device_index_and_passages"] == (n // CHIPS) * (64 + 184 + 4)
    # The device index's top-k merge gathers candidates: all-gathers, never a permute.
    assert report["collectives"]["all-gather"]["count"] > 0
    assert report["collectives"]["collective-permute"]["count"] == 0
    assert report["fits"]


def test_collectives_parser_counts_hand_written_hlo():
    hlo = "\n".join(
        [
            # 2 x 4 x 2 bytes = 16
            "  %ag = bf16[2,4]{1,0} all-gather(bf16[1,4]{1,0} %p), dimensions={0}",
            # async pair: the output half of the tuple, 8 floats = 32 bytes; -done not counted
            "  %ars = (f32[8]{0}, f32[8]{0}) all-reduce-start(f32[8]{0} %x), to_apply=%add",
            "  %ard = f32[8]{0} all-reduce-done((f32[8]{0}, f32[8]{0}) %ars)",
            # a TPU reduce-scatter fusion: result 3 x 2 floats = 24 bytes
            "  %f = f32[3,2]{1,0} fusion(%a, %b), kind=kCustom, calls=%all-reduce-scatter.1",
            "  ROOT %a2a = s32[4,1]{1,0} all-to-all(s32[4,1]{1,0} %y), dimensions={0}",
            # a TPU ring step: (operand, output, two u32 sync flags): the output, 6 x 4 x 2 = 48
            "  %cp = (bf16[6,4]{1,0}, bf16[6,4]{1,0}, u32[]{:S(2)}, u32[]{:S(2)}) "
            "collective-permute-start(%s), source_target_pairs={{0,1},{1,2},{2,3}}",
        ]
    )
    found = rag_compile.collectives(hlo)
    assert found["all-gather"] == {"count": 1, "bytes": 16}
    assert found["all-reduce"] == {"count": 1, "bytes": 32}
    assert found["reduce-scatter"] == {"count": 1, "bytes": 24}
    assert found["all-to-all"] == {"count": 1, "bytes": 16}
    assert found["collective-permute"] == {"count": 1, "bytes": 48}


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="--topology 'v9x:2x2'"):
        rag_compile.chip_of("v9x:2x2")
    config = _config()
    config.model.question_encoder = "checkpoints/no-such-model"
    with pytest.raises(ValueError, match=r"config.model.question_encoder=.*no-such-model"):
        rag_compile.model_shapes(config)
    mesh_config = _config()
    mesh_config.batch_size = 6
    devices = jax.devices()[:4]  # the check is on counts only
    with pytest.raises(ValueError, match="batch_size 6 must be a multiple of the mesh's 4 devices"):
        make_mesh(mesh_config, devices)
    assert partitioning.MESH_AXES == ("data", "fsdp")


def test_import_rag_jax_needs_no_libtpu():
    code = (
        "import sys, rag_jax, rag_jax.training, rag_jax.compile; "
        "assert 'libtpu' not in sys.modules, 'libtpu imported'"
    )
    root = os.path.dirname(os.path.dirname(tiny.__file__))  # this checkout's rag_jax
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def test_out_of_hbm_reads_xla_refusal():
    # XLA's words for the paper config on v5e:2x4 without remat; 17.13 GiB = 17.13 * 2**30 B
    message = (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        "temporaries (17.13G) exceeds available HBM (15.75G)."
    )
    assert rag_compile.out_of_hbm(message) == int(17.13 * 2**30)
    assert rag_compile.out_of_hbm("RESOURCE_EXHAUSTED: out of something") == 0
    assert rag_compile.out_of_hbm("INVALID_ARGUMENT: bad shape") is None
