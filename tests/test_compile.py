"""``python -m rag_jax.compile``: train.py's step compiled for a TPU topology from libtpu alone.

The tiny config (``bert-tiny`` preset query encoder, a 1+1-layer generator from
``generator_init``) on ``v5e:2x2`` (4 abstract chips): the report's per-chip bytes against
values derived by hand from the shapes, the collective inventory, and the device-retrieval
step. libtpu is in the test extra: without it these tests skip loudly, and fail under CI.
"""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import jax
import pytest
from flax import nnx

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


# What each collective of the step is for, by the jax op XLA's metadata names as its source.
PARAMETER_USES = (  # FSDP's all-gathers: a weight, bias or LayerNorm scale where it is used
    r"(transpose\()?jvp\((bth,vh->btv)?\)\)?/(dot_general|add|mul)",  # bth,vh->btv: the LM head
    r"(transpose\()?jvp\(jit\(_take\)\)\)?/(gather|scatter-add)",  # embedding tables
)
SCALARS = ("jvp()/reduce_sum", "reduce_sum", "reduce_and", "cond/branch_1_fun/reduce_sum", "")


def test_collective_inventory(host_report):
    """Each collective is one the design calls for: FSDP's parameter all-gathers where a
    weight, bias, LayerNorm scale or embedding table is used (the backward gathers again);
    all-reduces of the gradients of parameters every chip holds whole (summed over the rows:
    ``transpose(jvp())/reduce_sum``) and of scalars (the loss, counts, the gradient norm, the
    finite checks); all-to-alls only where an embedding table split over its width is looked
    up (and its gradient scattered back: the rows go to the chips of their batch rows, cheaper
    than gathering the table; README, "Checking a config for a pod"). The split weights'
    gradients are reduced by all-reduces here: XLA writes each such reduce-scatter as an
    all-reduce and a slice, and the TPU compiler keeps that form for arrays this small (the
    next test). The activations stay split by rows (``partitioning.constrain_rows``): no
    all-to-all of LayerNorm's backward nor of the retriever scores, no collective-permute."""
    found = host_report["collectives"]
    assert found["all-gather"]["count"] > 0 and found["all-reduce"]["count"] > 0
    assert found["collective-permute"]["count"] == 0 and found["reduce-scatter"]["count"] == 0
    assert host_report["loops_of_unknown_trip_count"] == 0
    for group in host_report["collective_sources"]:
        kind, source = group["kind"], group["source"]
        if kind == "all-gather":
            assert any(re.fullmatch(pattern, source) for pattern in PARAMETER_USES), group
        elif kind == "all-to-all":
            assert re.fullmatch(PARAMETER_USES[1], source), group
        else:
            assert kind == "all-reduce", group
            assert source in SCALARS or source == "transpose(jvp())/reduce_sum", group
            if not source:  # no jax op named: small (vectors and scalars), not a weight
                assert group["bytes"] <= 64 * 1024, group
    # FSDP reduces a split weight's gradient with a reduce-scatter; XLA's partitioner writes
    # it as an all-reduce and a slice, which the TPU compiler keeps as an all-reduce at 16 KiB
    # and below (the next test, on a bare psum_scatter): every whole split weight inside an
    # all-reduce here is that small, and there is at least one.
    seen = 0
    mesh = make_mesh(_config(), rag_compile.tpu_devices(TOPOLOGY))
    model, _, _ = rag_compile.abstract_train_state(_config(), mesh)
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    split = {tuple(p.shape) for p in params if p.ndim == 2 and any(p.sharding.spec)}
    assert split, "the tiny config's FSDP splits no matrix"
    for line in host_report["hlo"].splitlines():
        if re.search(r"\sall-reduce(-start)?\(", line):
            result = line.split("=", 1)[1].split(" all-reduce")[0]
            for dtype, dims in re.findall(r"(f32|bf16)\[(\d+,\d+)\]", result):
                shape = tuple(int(d) for d in dims.split(","))
                if shape in split:
                    seen += 1
                    assert math.prod(shape) * (4 if dtype == "f32" else 2) <= 16 * 1024, line
    assert seen


def test_tpu_lowers_small_or_multi_ring_reduce_scatters_as_all_reduces(libtpu):
    """Why the compiled steps show all-reduces where FSDP calls for reduce-scatters (README):
    the TPU compiler itself lowers a bare ``psum_scatter`` over all the chips as a
    reduce-scatter on 4 chips (one ring) at 64 KiB and up, as an all-reduce at 16 KiB and
    below, and as an all-reduce on a slice whose chips span more than one ring (v5p:2x2x2 and
    up, v5e:4x4; 1 MiB per chip here); on v5p:4x4x4 and v5p:4x4x8 (64 and 128 chips) an
    ``all_gather`` too."""
    from jax.sharding import AxisType, PartitionSpec

    def kinds(topology, collective, rows_per_chip=256, cols=1024):
        devices = rag_compile.tpu_devices(topology)
        mesh = jax.make_mesh((len(devices),), ("x",), (AxisType.Explicit,), devices=devices)
        whole, split = PartitionSpec(), PartitionSpec("x")
        if collective == "psum_scatter":
            body = lambda a: jax.lax.psum_scatter(a, "x", tiled=True)  # noqa: E731
            specs = dict(in_specs=whole, out_specs=split)
        else:
            body = lambda a: jax.lax.all_gather(a, "x", tiled=True)  # noqa: E731
            specs = dict(in_specs=split, out_specs=whole, check_vma=False)
        x = jax.ShapeDtypeStruct(
            (len(devices) * rows_per_chip, cols),
            "float32",
            sharding=jax.sharding.NamedSharding(mesh, specs["in_specs"]),
        )
        step = jax.jit(jax.shard_map(body, mesh=mesh, **specs))
        found = rag_compile.collectives(step.trace(x).lower().compile().as_text())
        return {kind for kind, value in found.items() if value["count"]}

    assert kinds("v5e:2x2", "psum_scatter", 8, 32) == {"all-reduce"}  # 4 KiB
    assert kinds("v5e:2x2", "psum_scatter", 8, 128) == {"all-reduce"}  # 16 KiB
    assert kinds("v5e:2x2", "psum_scatter", 32, 128) == {"reduce-scatter"}  # 64 KiB
    assert kinds("v5p:2x2x1", "psum_scatter") == {"reduce-scatter"}
    assert kinds("v5e:2x2", "psum_scatter") == {"reduce-scatter"}
    assert kinds("v5p:2x2x2", "psum_scatter") == {"all-reduce"}
    assert kinds("v5p:4x4x2", "psum_scatter") == {"all-reduce"}
    assert kinds("v5e:4x4", "psum_scatter") == {"all-reduce"}
    assert kinds("v5p:4x4x2", "all_gather") == {"all-gather"}
    assert kinds("v5p:4x4x4", "all_gather") == {"all-reduce"}
    assert kinds("v5p:4x4x8", "all_gather") == {"all-reduce"}


def test_parameters_split_over_chips_only_with_fsdp(libtpu):
    """Per-chip parameter bytes: the whole model when replicated; about 1/4 with FSDP (the
    logical rules split every EMBED dimension, 32 here, by 4; vectors over MLP or HEADS and
    the biases stay whole, a few percent of the bytes)."""
    mesh = make_mesh(_config(), rag_compile.tpu_devices(TOPOLOGY))
    sizes = {}
    for fsdp in (True, False):
        model, optimizer, _ = rag_compile.abstract_train_state(_config(fsdp), mesh)
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


# A compiled module as the TPU compiler writes one (shapes and names shortened): an entry, a
# reduce-scatter fusion, an async collective fusion (start, a continuation, done), and a
# windowed-einsum loop whose counter runs 0, 2, ..., 14 (8 trips).
HAND_WRITTEN_HLO = """\
HloModule jit_train_step, entry_computation_layout={()->f32[]}

%all-reduce-scatter.1 (p: f32[12,2]) -> f32[3,2] {
  %p = f32[12,2]{1,0} parameter(0)
  %ar = f32[12,2]{1,0} all-reduce(f32[12,2]{1,0} %p), to_apply=%add
  ROOT %ds = f32[3,2]{1,0} dynamic-slice(%ar, %c, %c), dynamic_slice_sizes={3,2}
}

%gather.2 (w: bf16[2,4]) -> bf16[8,4] {
  %w = bf16[2,4]{1,0} parameter(0)
  ROOT %ag.5 = bf16[8,4]{1,0} all-gather(bf16[2,4]{1,0} %w), dimensions={0}, BWD
}

%fc.1 (q: bf16[2,4]) -> (bf16[2,4], bf16[8,4]) {
  %q = bf16[2,4]{1,0} parameter(0)
  %ag.1 = bf16[8,4]{1,0} all-gather(bf16[2,4]{1,0} %q), dimensions={0}, FWD
  ROOT %t = (bf16[2,4]{1,0}, bf16[8,4]{1,0}) tuple(%q, %ag.1)
}

%async_collective_fusion.1 (r: bf16[2,4], o: bf16[8,4]) -> bf16[8,4] {
  %r = bf16[2,4]{1,0} parameter(0)
  ROOT %ag.2 = bf16[8,4]{1,0} all-gather(bf16[2,4]{1,0} %r), dimensions={0}, FWD
}

%fused_computation.2 (u: bf16[2,4], v: bf16[8,4]) -> bf16[8,4] {
  %u = bf16[2,4]{1,0} parameter(0)
  ROOT %ag.3 = bf16[8,4]{1,0} all-gather(bf16[2,4]{1,0} %u), dimensions={0}, FWD
}

%gather.1 (w: f32[4,8]) -> bf16[8,4] {
  %w = bf16[2,4]{1,0} parameter(0)
  ROOT %ag.4 = bf16[8,4]{1,0} all-gather(bf16[2,4]{1,0} %w), dimensions={0}, FWD
}

%COND (param.1: (f32[4,8], u32[])) -> pred[] {
  %constant.9 = u32[]{:T(128)} constant(16)
  %param.1 = (f32[4,8]{1,0}, u32[]{:T(128)}) parameter(0)
  %get-tuple-element.1 = u32[]{:T(128)} get-tuple-element(%param.1), index=1
  ROOT %compare.1 = pred[] compare(%get-tuple-element.1, %constant.9), direction=LT
}

%BODY (param.2: (f32[4,8], u32[])) -> (f32[4,8], u32[]) {
  %param.2 = (f32[4,8]{1,0}, u32[]{:T(128)}) parameter(0)
  %get-tuple-element.2 = f32[4,8]{1,0} get-tuple-element(%param.2), index=0
  %get-tuple-element.3 = u32[]{:T(128)} get-tuple-element(%param.2), index=1
  %cp = CP_TUPLE collective-permute-start(%get-tuple-element.2), RING, BWD
  %cpd = f32[4,8]{1,0} collective-permute-done(%cp), BWD
  %in_loop = bf16[8,4]{1,0} fusion(%get-tuple-element.2), kind=kLoop, calls=%gather.1
  %constant.2 = u32[]{:T(128)} constant(2)
  %add.1 = u32[]{:T(128)} add(%get-tuple-element.3, %constant.2)
  ROOT %tuple.2 = (f32[4,8]{1,0}, u32[]{:T(128)}) tuple(%cpd, %add.1)
}

ENTRY %main.1_spmd (a: bf16[1,4], x: f32[8], y: s32[4,1], g: f32[4,8], b: bf16[2,4]) -> f32[] {
  %a = bf16[1,4]{1,0} parameter(0)
  %b = bf16[2,4]{1,0} parameter(4)
  %x = f32[8]{0} parameter(1)
  %y = s32[4,1]{1,0} parameter(2)
  %g = f32[4,8]{1,0} parameter(3)
  %ag = bf16[2,4]{1,0} all-gather(bf16[1,4]{1,0} %a), dimensions={0}, FWD
  %async-collective-start.1 = (bf16[2,4]{1,0}, bf16[8,4]{1,0}) fusion(%b), calls=%fc.1
  %piece = bf16[8,4]{1,0} fusion(%b, %b), kind=kCustom, calls=%async_collective_fusion.1
  %async-collective-done.1 = bf16[8,4]{1,0} fusion(%b, %piece), calls=%fused_computation.2
  %ars = f32[8]{0} all-reduce-start(f32[8]{0} %x), to_apply=%add
  %ard = f32[8]{0} all-reduce-done(f32[8]{0} %ars)
  %f = f32[3,2]{1,0} fusion(%ard), kind=kCustom, calls=%all-reduce-scatter.1
  %twice.1 = bf16[8,4]{1,0} fusion(%b), kind=kLoop, calls=%gather.2
  %twice.2 = bf16[8,4]{1,0} fusion(%b), kind=kLoop, calls=%gather.2
  %a2a = s32[4,1]{1,0} all-to-all(s32[4,1]{1,0} %y), dimensions={0}
  %peeled = CP_TUPLE collective-permute-start(%g), RING, BWD
  %constant.0 = u32[]{:T(128)} constant(0)
  %copy.0 = u32[]{:T(128)} copy(%constant.0)
  %tuple.1 = (f32[4,8]{1,0}, u32[]{:T(128)}) tuple(%g, /*index=1*/%copy.0)
  %while.1 = (f32[4,8]{1,0}, u32[]{:T(128)}) while(%tuple.1), condition=%COND, body=%BODY
  ROOT %r = f32[] constant(0)
}
"""
for short, long in {
    "BWD": 'metadata={op_name="jit(train_step)/transpose(jvp())/dot_general"}',
    "FWD": 'metadata={op_name="jit(train_step)/jvp()/dot_general"}',
    "RING": "source_target_pairs={{0,1},{1,2},{2,3},{3,0}}",
    "CP_TUPLE": "(f32[4,8]{1,0}, f32[4,8]{1,0}, u32[]{:S(2)}, u32[]{:S(2)})",
    "COND": "wide.windowed_dot_general_cond_rs.1",
    "BODY": "wide.windowed_dot_general_body_rs.1",
}.items():
    HAND_WRITTEN_HLO = HAND_WRITTEN_HLO.replace(short, long)


def test_collectives_parser_counts_hand_written_hlo():
    found = rag_compile.collectives(HAND_WRITTEN_HLO)
    # the plain one (2 x 4 bf16); the async collective fusion's once, at its start (8 x 4
    # bf16), not again in its continuation nor at its done (each writes the whole result);
    # one in a fusion inside the loop body, once per trip (8); one in a computation two
    # fusions call, once per call site (2)
    assert found["all-gather"] == {
        "count": 1 + 1 + 8 + 2,
        "bytes": 2 * 4 * 2 + 8 * 4 * 2 + (8 + 2) * 8 * 4 * 2,
    }
    # an all-reduce-start's result is its output (8 floats); -done not counted
    assert found["all-reduce"] == {"count": 1, "bytes": 8 * 4}
    # the fusion is the reduce-scatter (result 3 x 2 floats); its inner all-reduce not again
    assert found["reduce-scatter"] == {"count": 1, "bytes": 3 * 2 * 4}
    assert found["all-to-all"] == {"count": 1, "bytes": 4 * 4}
    # a ring step's output (4 x 8 floats, not the operand nor the u32 flags), in the loop once
    # per trip (ceil((16 - 0) / 2) = 8) and once peeled out of it
    assert found["collective-permute"] == {"count": 8 + 1, "bytes": (8 + 1) * 4 * 8 * 4}
    assert rag_compile.loops_of_unknown_trip_count(HAND_WRITTEN_HLO) == 0
    sources = {(g["kind"], g["ring"], g["source"]): g["count"] for g in
               rag_compile.collective_sources(HAND_WRITTEN_HLO)}  # fmt: skip
    # the peeled step is a step of the same jax op's ring: a reduce-scatter
    assert sources[("collective-permute", "reduce-scatter", "transpose(jvp())/dot_general")] == 9
    assert sources[("all-gather", None, "jvp()/dot_general")] == 1 + 1 + 8
    assert sources[("all-gather", None, "transpose(jvp())/dot_general")] == 2
    # a loop whose counter is not a constant start: counted once, and said
    unknown = HAND_WRITTEN_HLO.replace("copy(%constant.0)", "copy(%x)")
    assert rag_compile.collectives(unknown)["collective-permute"]["count"] == 1 + 1
    assert rag_compile.loops_of_unknown_trip_count(unknown) == 1
    # a loop whose test is not "counter < constant" (its ROOT): counted once, and said
    other_test = HAND_WRITTEN_HLO.replace("direction=LT", "direction=NE")
    assert rag_compile.collectives(other_test)["collective-permute"]["count"] == 1 + 1
    assert rag_compile.loops_of_unknown_trip_count(other_test) == 1


def test_bad_inputs_are_named(capsys):
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
    # the command's --retrieval: refused before anything compiles, naming the three choices
    with pytest.raises(SystemExit):
        rag_compile.main(["--config", tiny.__file__, "--topology", TOPOLOGY, "--retrieval", "x"])
    error = capsys.readouterr().err
    assert "--retrieval: invalid choice: 'x'" in error
    assert all(choice in error for choice in ("host", "device", "both"))


def test_import_rag_jax_needs_no_libtpu():
    code = (
        "import sys, rag_jax, rag_jax.training, rag_jax.compile; "
        "assert 'libtpu' not in sys.modules, 'libtpu imported'"
    )
    root = os.path.dirname(os.path.dirname(tiny.__file__))  # this checkout's rag_jax
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def test_out_of_hbm_reads_xla_refusal():
    # XLA's words for the paper config on v5e:2x4 without remat, before constrain_rows
    message = (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        "temporaries (17.13G) exceeds available HBM (15.75G)."
    )
    assert rag_compile.out_of_hbm(message) == int(17.13 * 2**30)
    assert rag_compile.out_of_hbm("RESOURCE_EXHAUSTED: out of something") == 0
    assert rag_compile.out_of_hbm("INVALID_ARGUMENT: bad shape") is None
