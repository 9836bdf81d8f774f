"""Routing telemetry and checks: exact outputs, counts per phase, a failing layer named."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from relief_mlx.generate.engine import Engine, GenerateConfig, complete
from relief_mlx.generate.loop import generate_tokens
from relief_mlx.generate.moe import LayerRouting, RoutingError, RoutingProbe


def test_probe_changes_no_output_and_restores_the_blocks(fresh_mini):
    ids = mx.array([[5, 17, 300, 9001, 42] * 30])  # 150 tokens: the sorted-experts path too
    before = np.array(fresh_mini.model(ids))  # hidden states: the lm_head adds nothing here
    originals = [layer.mlp for layer in fresh_mini.model.layers]
    with RoutingProbe(fresh_mini) as probe:
        probe.start(ids.shape[1])
        probed = np.array(fresh_mini.model(ids))
    assert np.array_equal(before, probed)  # bit for bit: same ops as mlx-lm's MLPBlock
    assert all(layer.mlp is mlp for layer, mlp in zip(fresh_mini.model.layers, originals, strict=True))


def test_counts_split_prompt_and_answer(fresh_mini):
    prompt = list(range(1000, 1040))
    probe = RoutingProbe(fresh_mini)
    probe.start(len(prompt))
    for _ in generate_tokens(fresh_mini, prompt, max_tokens=6):
        probe.collect()
    report = probe.report()
    probe.close()
    k = report.experts_per_token
    assert len(report.prompt) == len(report.answer) == len(fresh_mini.model.layers)
    for layer in report.prompt:
        assert layer.tokens == 40 and layer.counts.sum() == 40 * k
    for layer in report.answer:  # tokens 1..5 went back in; the 6th was never fed
        assert layer.tokens == 5 and layer.counts.sum() == 5 * k
    assert "answer" in report.table() and report.to_dict()["prompt"][0]["tokens"] == 40


def test_moe_stats_do_not_change_greedy_tokens(mini_loaded, fresh_mini):
    model, tokenizer = mini_loaded
    engine = Engine.wrap(fresh_mini, tokenizer)
    prompt = list(range(2000, 2140))
    plain = complete(engine, prompt, GenerateConfig(max_tokens=8))
    probed = complete(engine, prompt, GenerateConfig(max_tokens=8, moe_stats=True, check_routing=True))
    assert plain.tokens == probed.tokens and plain.routing is None
    assert probed.routing.prompt[0].tokens == 140
    assert all(not hasattr(layer.mlp, "inner") for layer in fresh_mini.model.layers)


def test_check_routing_names_the_layer_and_token(mini_loaded, fresh_mini):
    _, tokenizer = mini_loaded
    router = fresh_mini.model.layers[2].mlp.router
    router.bias = mx.full(router.bias.shape, float("nan"))
    engine = Engine.wrap(fresh_mini, tokenizer)
    with pytest.raises(RoutingError, match="layer 2, prompt token 0: router weights not finite"):
        complete(engine, [1, 2, 3, 4], GenerateConfig(max_tokens=3, check_routing=True))
    assert not hasattr(fresh_mini.model.layers[2].mlp, "inner")  # probe removed after the failure


def test_layer_statistics():
    even = LayerRouting(np.array([2, 2, 2, 2]), tokens=2, weight_entropy_sum=2.0)
    assert even.usage_entropy == pytest.approx(2.0) and even.imbalance == pytest.approx(1.0)
    assert even.mean_weight_entropy == pytest.approx(1.0)
    skewed = LayerRouting(np.array([8, 0, 0, 0]), tokens=8)
    assert skewed.usage_entropy == 0.0 and skewed.imbalance == pytest.approx(4.0)
