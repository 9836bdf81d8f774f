"""The bandwidth probe and its guard, bytes per decoded token, the memory estimate and the refusal,
and the preset built in memory."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from relief_mlx.bench import memory, source
from relief_mlx.checkpoint.convert import mlx_config
from relief_mlx.checkpoint.presets import hf_config
from relief_mlx.errors import ReliefError
from relief_mlx.model.load import default_dtype

MINI = mlx_config(hf_config("mini"), "mxfp4")  # 4 layers S F S F, h = i = 128, 8 experts top-4, 4 q / 2 kv heads of 64


MIB = 2**20


def test_a_share_above_the_limit_is_a_measurement_error():
    # 50 tokens/s x 1 GB per token = 50 GB/s read, against a 40 GB/s limit
    with pytest.raises(memory.MeasurementError, match=r"reads 50 GB/s .*125% of the measured bandwidth limit 40 GB/s"):
        memory.bandwidth_share(50.0, 1e9, 40.0, "relief decode")
    assert issubclass(memory.MeasurementError, ReliefError)  # one line from the CLI, exit 1
    assert memory.bandwidth_share(10.0, 1e9, 40.0) == 0.25
    assert memory.bandwidth_share(40.0, 1e9, 40.0) == 1.0  # at the limit, not above it


@pytest.mark.parametrize("chip, cores, gbps", [
    ("Apple M1", 8, 68.25), ("Apple M1 Ultra", 20, 800), ("Apple M2 Pro", 12, 200), ("Apple M3 Pro", 12, 150),
    ("Apple M3 Max", 14, 300), ("Apple M3 Max", 16, 400), ("Apple M3 Max", None, None), ("Apple M3 Ultra", 28, 819),
    ("Apple M4", 10, 120), ("Apple M4 Max", 16, 546), ("AMD EPYC", 2, None), ("Apple M9", 8, None),
])
def test_advertised_bandwidth_of_apple_chips(chip, cores, gbps):
    assert memory.nominal_bandwidth(chip, cores) == gbps


def test_last_level_cache_is_the_highest_data_level(tmp_path):
    for i, (level, kind, size) in enumerate([(1, "Data", "48K"), (1, "Instruction", "32K"), (2, "Unified", "1024K"),
                                             (3, "Unified", "32768K")]):
        (tmp_path / f"index{i}").mkdir()
        for name, value in (("level", level), ("type", kind), ("size", size)):
            (tmp_path / f"index{i}" / name).write_text(f"{value}\n")
    assert memory.last_level_cache(tmp_path) == (32 * MIB, f"L3 of {tmp_path}")


def test_probe_sizes_stay_above_the_cache():
    assert memory.probe_sizes(None, 32 * MIB, gpu=False) == [128 * MIB, 256 * MIB, 512 * MIB]
    assert memory.probe_sizes(None, None, gpu=False) == [64 * MIB, 128 * MIB, 256 * MIB]
    assert memory.probe_sizes(None, 32 * MIB, gpu=True) == [512 * MIB, 1024 * MIB, 2048 * MIB]
    assert memory.probe_sizes(8 * MIB, 32 * MIB, gpu=False) == [2 * MIB, 4 * MIB, 8 * MIB]  # asked for


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_the_limit_is_the_best_read_where_mlx_computes(monkeypatch, backend):
    """On a CPU backend the host's threaded read counts; on a GPU only MLX's reads on the device."""
    monkeypatch.setattr("relief_mlx.doctor.backend", lambda mx: backend)
    bw = memory.measure_bandwidth(8 * MIB, trials=2)
    host = [f"numpy {op}, {bw['threads']} threads" for op in ("sum", "max")]
    assert set(bw["kernels_gbps"]) == {*host, "mlx sum", "mlx gemv"}
    for k in bw["kernels_gbps"].values():
        assert len(k["trials"]) == 2 and k["best"] == max(k["trials"])
        assert k["size_bytes"] in (2 * MIB, 4 * MIB, 8 * MIB)
    counted = [k for k in bw["kernels_gbps"] if backend == "cpu" or k not in host]
    assert bw["limit_gbps"] == max(bw["kernels_gbps"][k]["best"] for k in counted)
    assert bw["host_gbps"] == max(bw["kernels_gbps"][k]["best"] for k in host)
    assert bw["device"] == ("cpu" if backend == "cpu" else "gpu")


def test_host_read_reads_every_slice_in_threads():
    from concurrent.futures import ThreadPoolExecutor

    a = np.ones(3 * 1000 + 1, np.float32)
    seen = []

    class Recording(ThreadPoolExecutor):
        def map(self, fn, parts):
            parts = list(parts)
            seen.append(sum(len(p) for p in parts))
            assert len(parts) == 3 and all(np.shares_memory(p, a) for p in parts)  # views, no copies
            return super().map(fn, parts)

    with Recording(3) as pool:
        gbps = memory.host_read(a, pool, threads=3, trials=2)
    assert list(gbps) == ["numpy sum, 3 threads", "numpy max, 3 threads"]
    assert all(len(g) == 2 and min(g) > 0 for g in gbps.values())
    assert seen == [3001] * 6  # per reduction, the warm-up and two trials, each over the whole array


def test_decode_bytes_by_hand():
    parts = memory.decode_bytes(MINI, dtype_bytes=4, mxfp4=True, context=10)
    assert parts["embedding_row"] == 128 * 4
    # q 128x256+256, k and v 128x128+128, o 256x128+128, 4 sinks = 98,948 per layer
    assert parts["attention"] == 4 * 98_948 * 4
    assert parts["norms"] == (2 * 4 + 1) * 128 * 4
    assert parts["router"] == 4 * (128 * 8 + 8) * 4
    # per expert: 3 x 128 x 128 weights at 4.25 bits = 26,112 B, biases 2 x 128 + 128 floats = 1,536 B;
    # 4 experts per token in each of 4 layers
    assert parts["experts"] == 16 * (26_112 + 1_536)
    assert parts["lm_head"] == 201_088 * 128 * 4
    # keys + values of 2 heads x 64 in float32 = 1,024 B per token, 10 tokens on each of 4 layers
    assert parts["kv_cache"] == 4 * 10 * 1_024
    assert parts["total"] == 512 + 1_583_168 + 4_608 + 16_512 + 442_368 + 102_957_056 + 40_960


def test_sliding_layers_read_at_most_the_window():
    assert memory.kv_tokens(MINI, 200) == [128, 200, 128, 200]
    assert memory.decode_bytes(MINI, 4, True, 200)["kv_cache"] == (128 + 200 + 128 + 200) * 1_024


def test_mean_decode_bytes_averages_the_growing_cache():
    # 126-token prompt, 4 decode steps attend over 127, 128, 129 and 130 tokens
    mean = memory.mean_decode_bytes(MINI, 4, True, prompt=126, generated=4)
    full = (127 + 128 + 129 + 130) / 4  # full-attention layers; sliding ones stop at 128
    sliding = (127 + 128 + 128 + 128) / 4
    assert mean["kv_cache"] == pytest.approx(2 * (full + sliding) * 1_024)


def test_bf16_dense_experts_count_two_bytes_per_value():
    parts = memory.decode_bytes(MINI, dtype_bytes=2, mxfp4=False, context=1)
    assert parts["experts"] == 16 * (3 * 128 * 128 + 384) * 2


def test_every_expert_read_equals_the_built_model():
    """With top-k = all experts and the whole embedding, the bytes read are every weight the
    model holds: the arithmetic matches what MLX allocates for the preset."""
    model = source.build(source.describe(None, "mini"), mx.float32)
    held = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    parts = memory.decode_bytes(MINI | {"num_experts_per_tok": 8}, 4, True, context=0)
    assert held == parts["total"] - parts["embedding_row"] + 201_088 * 128 * 4


def test_folder_and_preset_build_the_same_model(mini_mlx):
    folder = source.describe(str(mini_mlx), None)
    assert folder.mxfp4 and folder.folder == str(mini_mlx)
    from_folder = dict(tree_flatten(source.build(folder, mx.float32).parameters()))
    synthesized = dict(tree_flatten(source.build(source.describe(None, "mini"), mx.float32).parameters()))
    assert {k: (v.shape, v.dtype) for k, v in from_folder.items()} == \
           {k: (v.shape, v.dtype) for k, v in synthesized.items()}


def test_random_mxfp4_experts_are_finite_with_the_intended_spread():
    model = source.build(source.describe(None, "mini"), mx.float32, seed=1)
    experts = model.model.layers[0].mlp.experts.gate_proj
    dense = mx.dequantize(experts.weight, experts.scales, group_size=32, bits=4, mode="mxfp4")
    std = dense.std().item()
    assert mx.isfinite(dense).all().item()
    assert 0.5 / 128**0.5 < std < 2 / 128**0.5


def test_refusal_names_need_and_availability(monkeypatch):
    needed = memory.needed_bytes(MINI, 4, True, memory.Workload(context=100, prefill_chunk=512, train_tokens=0))
    assert needed["weights"] == memory.weight_bytes(MINI, 4, True)
    with pytest.raises(ReliefError) as e:
        memory.check_fits("preset mini", needed, (needed["total"] - 1, "available RAM"))
    message = str(e.value)
    assert "\n" not in message
    assert f"{needed['total'] / 2**30:.1f} GiB" in message and "available RAM" in message
    memory.check_fits("preset mini", needed, (needed["total"], "available RAM"))  # exactly enough is fine
    memory.check_fits("preset mini", needed, (None, "unknown"))  # unknown: no refusal


def test_gpt_oss_20b_needs_its_published_size_at_least():
    config = mlx_config(hf_config("gpt-oss-20b"), "mxfp4")
    needed = memory.needed_bytes(config, 2, True, memory.Workload(2049, 512, 512))
    assert 12.5 * 2**30 < needed["weights"] < 13 * 2**30  # `relief inspect`: MXFP4 experts + bf16 rest, 12.8 GiB
    assert needed["total"] > needed["weights"] + needed["kv_cache"]


def test_a_hugging_face_folder_is_refused_before_anything_runs(mini_hf):
    with pytest.raises(ReliefError, match="relief convert"):
        source.describe(str(mini_hf), None)


def test_dense_preset_experts_are_the_mxfp4_ones_dequantized():
    """`--experts float32` (CPU) times the same weights as the default, only stored dense."""
    packed = source.build(source.describe(None, "mini"), mx.float32, seed=2)
    dense_src = source.describe(None, "mini", str(default_dtype()).removeprefix("mlx.core."))
    assert not dense_src.mxfp4
    dense = source.build(dense_src, mx.float32, seed=2)
    q = packed.model.layers[1].mlp.experts.down_proj
    expected = mx.dequantize(q.weight, q.scales, group_size=32, bits=4, mode="mxfp4")
    got = dense.model.layers[1].mlp.experts.down_proj.weight
    assert got.dtype == mx.float32 and mx.array_equal(got, expected).item()
    assert mx.array_equal(dense.model.layers[1].mlp.experts.down_proj.bias, q.bias).item()


def test_experts_option_is_for_presets_only(mini_mlx):
    with pytest.raises(ReliefError, match="--experts applies to --preset"):
        source.describe(str(mini_mlx), None, "mxfp4")
    with pytest.raises(ReliefError, match="choose one of auto, mxfp4, bfloat16, float32"):
        source.describe(None, "mini", "int8")
    other = "bfloat16" if default_dtype() == mx.float32 else "float32"
    with pytest.raises(ReliefError, match=f"pass --experts {str(default_dtype()).removeprefix('mlx.core.')} or mxfp4"):
        source.describe(None, "mini", other)
