"""The CPU's expert-by-expert MoE path gives what mlx-lm's gather_mm path gives, in value and
gradient, with and without LoRA on the experts; MXFP4 experts split across the CPU's cores give
what one stream gives; each path is taken only where it should be."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.activations import SwigluOAI
from mlx_lm.models.switch_layers import SwitchGLU
from mlx_lm.tuner.lora import LoRASwitchLinear

from relief_mlx.model import moe
from relief_mlx.model.gpt_oss import Model, ModelArgs

D, INTER, E, K = 48, 40, 8, 4


def _glu(lora: bool) -> SwitchGLU:
    mx.random.seed(3)
    glu = SwitchGLU(D, INTER, E, activation=SwigluOAI(), bias=True)
    glu.update({name: {"bias": 0.1 * mx.random.normal((E, getattr(glu, name).output_dims))}
                for name in ("gate_proj", "up_proj", "down_proj")})
    if lora:
        glu.freeze()
        for name in ("gate_proj", "up_proj", "down_proj"):
            layer = LoRASwitchLinear.from_base(getattr(glu, name), r=4, scale=2.0)
            layer.lora_b = 0.1 * mx.random.normal(layer.lora_b.shape)  # zero B would hide a wrong A gradient
            setattr(glu, name, layer)
    return glu


def _inputs(tokens: int = 30):
    rng = np.random.default_rng(0)
    x = mx.array(rng.normal(size=(1, tokens, D)).astype(np.float32))
    indices = mx.array(np.stack([rng.choice(E, K, replace=False) for _ in range(tokens)])[None], dtype=mx.uint32)
    return x, indices


@pytest.mark.parametrize("lora", [False, True])
def test_grouped_equals_gather_in_value_and_gradients(lora):
    glu = _glu(lora)
    x, indices = _inputs()
    probe = mx.array(np.random.default_rng(1).normal(size=(1, 30, K, D)).astype(np.float32))

    def loss(params, x, path):
        glu.update(params)
        return ((path(x) * probe).sum()) ** 2

    gather = nn.value_and_grad(glu, lambda x: loss(glu.trainable_parameters(), x, lambda x: glu(x, indices)))
    grouped = nn.value_and_grad(glu, lambda x: loss(glu.trainable_parameters(), x,
                                                    lambda x: moe.grouped_glu(glu, x, indices)))
    np.testing.assert_allclose(np.array(moe.grouped_glu(glu, x, indices)), np.array(glu(x, indices)),
                               rtol=1e-5, atol=1e-6)
    (want, want_grads), (got, got_grads) = gather(x), grouped(x)
    np.testing.assert_allclose(got.item(), want.item(), rtol=1e-5)
    want_grads, got_grads = dict(tree_flatten(want_grads)), dict(tree_flatten(got_grads))
    assert set(got_grads) == set(want_grads) and len(got_grads) == 6  # LoRA A and B, or weight and bias
    for name, g in want_grads.items():
        np.testing.assert_allclose(np.array(got_grads[name]), np.array(g), rtol=1e-4, atol=1e-6 * np.abs(g).max())
    dx_want = mx.grad(lambda x: loss(glu.trainable_parameters(), x, lambda x: glu(x, indices)))(x)
    dx_got = mx.grad(lambda x: loss(glu.trainable_parameters(), x, lambda x: moe.grouped_glu(glu, x, indices)))(x)
    np.testing.assert_allclose(np.array(dx_got), np.array(dx_want), rtol=1e-4, atol=1e-6 * np.abs(dx_want).max())


def test_the_path_is_chosen_by_device_size_dtype_and_compile():
    glu = _glu(lora=False)
    assert moe.groups_by_expert(glu, moe.GROUP_MIN_PAIRS)  # the test suite runs on the CPU backend
    assert not moe.groups_by_expert(glu, K)  # one decoded token: gather_mm's 4 rows are as good
    with moe.gather_only():
        assert not moe.groups_by_expert(glu, 1000)
    glu.update(nn.utils.tree_map(lambda p: p.astype(mx.bfloat16), glu.parameters()))
    assert moe.groups_by_expert(glu, K)  # the CPU's gather_mm has no bf16 kernel


def _tiny_model() -> Model:
    args = ModelArgs(num_hidden_layers=2, hidden_size=D, intermediate_size=INTER, num_local_experts=E,
                     num_experts_per_tok=K, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     vocab_size=64, sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    mx.random.seed(0)
    model = Model(args)
    mx.eval(model.parameters())
    return model


def test_bf16_dense_experts_run_on_the_cpu_and_agree_with_float32():
    """Guards the CPU's missing bf16 gather_mm: a bf16 model with dense experts prefilled and decoded."""
    model = _tiny_model()
    tokens = mx.array([[1, 5, 9, 2, 7, 3, 3, 8, 1, 0, 4, 6]])
    want = model(tokens)
    model.update(nn.utils.tree_map(lambda p: p.astype(mx.bfloat16), model.parameters()))
    cache = model.make_cache()
    prefill = model(tokens[:, :-1], cache=cache)
    step = model(tokens[:, -1:], cache=cache)  # 4 pairs: grouped only because of bf16
    got = mx.concatenate([prefill, step], axis=1).astype(mx.float32)
    scale = np.abs(np.array(want)).max()
    np.testing.assert_allclose(np.array(got), np.array(want), atol=0.05 * scale)


def test_compiled_forward_takes_the_gather_path_and_agrees():
    model = _tiny_model()
    tokens = mx.array([list(range(20))])

    def forward(tokens):
        with moe.gather_only():
            return model(tokens)

    want = model(tokens)  # 80 pairs: grouped
    got = mx.compile(forward)(tokens)  # would fail to sync with the host if it grouped
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-6)


def test_a_compiled_training_step_agrees_with_the_uncompiled_one():
    """Guards `make_micro_step`'s compile path: a traced step cannot sync with the host to group."""
    from mlx.utils import tree_map

    from relief_mlx.recipe import LoraSection, TrainSection
    from relief_mlx.train.targets import apply_lora
    from relief_mlx.train.trainer import make_micro_step

    model = _tiny_model()
    apply_lora(model, LoraSection(targets=("mlp.experts.*",), rank=2))
    model.update(tree_map(lambda p: p + 0.05, model.trainable_parameters()))  # nonzero LoRA B
    tokens = np.arange(1, 22) % 64
    batch = (mx.array(tokens[None, :-1]), mx.arange(20), mx.array(tokens[1:]), mx.ones(20),
             mx.array(tokens[None, 1:]), mx.ones((1, 20)))
    results = []
    for compile_ in (False, True):
        step = make_micro_step(model, TrainSection(compile=compile_, loss_chunk=8))
        loss, grads = step(tree_map(mx.zeros_like, model.trainable_parameters()), *batch)
        results.append((loss.item(), dict(tree_flatten(grads))))
    (want, want_grads), (got, got_grads) = results
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for name, g in want_grads.items():
        np.testing.assert_allclose(np.array(got_grads[name]), np.array(g), rtol=1e-4, atol=1e-5 * np.abs(g).max())


def test_grouped_gradient_keeps_no_copy_of_the_expert_weights():
    """Guards `_expert`: `weight[e]` copies in MLX, and the gradient kept every copy (5.9 GB at 2 layers)."""
    mx.random.seed(0)
    glu = SwitchGLU(512, 512, E, activation=SwigluOAI(), bias=True)
    mx.eval(glu.parameters())
    expert_bytes = sum(v.nbytes for _, v in tree_flatten(glu.parameters()))  # 24 matrices of 1 MB
    x = mx.random.normal((1, 32, 512))
    indices = mx.array(np.random.default_rng(0).integers(0, E, (1, 32, K)), dtype=mx.uint32)
    mx.eval(x, indices)
    grad = mx.grad(lambda x: moe.grouped_glu(glu, x, indices).sum())
    mx.synchronize()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(grad(x))
    assert mx.get_peak_memory() - before < expert_bytes / 4


def _mxfp4_glu() -> SwitchGLU:
    mx.random.seed(5)
    glu = SwitchGLU(64, 64, E, activation=SwigluOAI(), bias=True)
    nn.quantize(glu, group_size=32, bits=4, mode="mxfp4")
    mx.eval(glu.parameters())
    return glu


@pytest.mark.parametrize("extra", [1, 2, 3])
def test_experts_split_across_streams_equal_one_stream(extra):
    """Each part runs the same kernel on its rows, so the split changes no bit (greedy tokens
    cannot change); 1-3 extra streams cut k=4 experts into 2, 3 and 4 parts."""
    glu = _mxfp4_glu()
    rng = np.random.default_rng(2)
    x = mx.array(rng.normal(size=(3, 1, 64)).astype(np.float32))  # 3 rows decoding one token each
    indices = mx.array(np.stack([rng.choice(E, K, replace=False) for _ in range(3)])[:, None], dtype=mx.uint32)
    streams = [mx.new_stream(mx.cpu) for _ in range(extra)]
    assert np.array_equal(np.array(moe.split_glu(glu, x, indices, streams)), np.array(glu(x, indices)))


def test_the_split_is_taken_only_for_cpu_kernels_without_threads(monkeypatch):
    cores = [mx.new_stream(mx.cpu)]
    monkeypatch.setattr(moe, "_streams", lambda: cores)
    quantized, dense = _mxfp4_glu(), _glu(lora=False)
    assert moe.core_streams(quantized) == cores  # MXFP4: one thread per stream
    assert moe.core_streams(dense) == []  # float32 through BLAS, threaded already
    with moe.gather_only():  # inside mx.compile
        assert moe.core_streams(quantized) == []
    monkeypatch.setattr(moe, "_streams", lambda: [])
    assert moe.core_streams(quantized) == []  # a one-core machine


def test_split_mxfp4_experts_with_lora_train_like_one_stream():
    """A prefill-sized batch (120 pairs, sorted inside SwitchGLU) through LoRA on MXFP4 experts:
    value and every LoRA gradient equal with the experts split across three streams."""
    glu = _mxfp4_glu()
    glu.freeze()
    for name in ("gate_proj", "up_proj", "down_proj"):
        layer = LoRASwitchLinear.from_base(getattr(glu, name), r=4, scale=2.0)
        layer.lora_b = 0.1 * mx.random.normal(layer.lora_b.shape)
        setattr(glu, name, layer)
    rng = np.random.default_rng(4)
    x = mx.array(rng.normal(size=(1, 30, 64)).astype(np.float32))
    indices = mx.array(np.stack([rng.choice(E, K, replace=False) for _ in range(30)])[None], dtype=mx.uint32)
    streams = [mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)]
    results = []
    for path in (lambda x: glu(x, indices), lambda x: moe.split_glu(glu, x, indices, streams)):
        def loss(params, x, path=path):
            glu.update(params)
            return (path(x) ** 2).sum()

        value, grads = mx.value_and_grad(loss)(glu.trainable_parameters(), x)
        results.append((value.item(), dict(tree_flatten(grads))))
    (want, want_grads), (got, got_grads) = results
    assert len(got_grads) == 6 and got == pytest.approx(want, rel=1e-6)
    for name, g in want_grads.items():
        np.testing.assert_allclose(np.array(got_grads[name]), np.array(g), rtol=1e-5, atol=1e-6 * np.abs(g).max())


def test_streams_are_one_per_usable_core_beyond_the_first():
    from relief_mlx.blas import usable_cpus

    assert len(moe._streams()) == usable_cpus() - 1
    assert moe._streams() is moe._streams()  # made once


def test_mxfp4_model_decodes_the_same_tokens_split_and_unsplit(monkeypatch):
    """Greedy decode through the generation loop: the split path (forced to 3 parts) and one
    stream give the same tokens and the same log-probabilities to the bit."""
    from relief_mlx.generate.loop import generate_tokens
    from relief_mlx.generate.sampling import SamplingConfig

    args = ModelArgs(num_hidden_layers=2, hidden_size=64, intermediate_size=64, num_local_experts=E,
                     num_experts_per_tok=K, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     vocab_size=64, sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    mx.random.seed(0)
    model = Model(args)
    nn.quantize(model, group_size=32, bits=4, mode="mxfp4",
                class_predicate=lambda path, m: path.endswith(("gate_proj", "up_proj", "down_proj")))
    mx.eval(model.parameters())
    calls, split = [], moe.split_glu
    monkeypatch.setattr(moe, "split_glu", lambda *a: calls.append(1) or split(*a))
    runs = []
    for streams in ([mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)], []):
        monkeypatch.setattr(moe, "_streams", lambda s=streams: s)
        steps = list(generate_tokens(model, [3, 1, 4, 1, 5, 9, 2, 6], max_tokens=12,
                                     sampling=SamplingConfig(temperature=0.0), logprobs=True))
        runs.append([(s.token, s.logprob) for s in steps])
    assert len(calls) == 2 * 13  # both layers of the 7-token feed (28 pairs) and the 12 one-token passes
    assert runs[0] == runs[1]
