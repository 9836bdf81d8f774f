"""The mlx-lm runners run mlx-lm's own model on the very weight arrays of relief's."""

from __future__ import annotations

import gc

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models import gpt_oss

from relief_mlx.bench import source


def test_mlx_lm_model_is_mlx_lm_s_and_shares_every_array():
    src = source.describe(None, "mini")
    model = source.build(src, mx.float32)
    stock = source.mlx_lm_model(model, src.config)
    assert type(stock) is gpt_oss.Model and type(stock.layers[0].mlp) is gpt_oss.MLPBlock
    ours, theirs = dict(tree_flatten(model.parameters())), dict(tree_flatten(stock.parameters()))
    assert ours.keys() == theirs.keys()
    assert all(theirs[k] is v for k, v in ours.items())  # the same arrays: no second copy in memory
    tokens = mx.array([[1, 2, 3, 4, 5, 6, 7, 8]])
    theirs, ours = np.array(stock(tokens)), np.array(model(tokens))
    np.testing.assert_allclose(theirs[:, 0], ours[:, 0], rtol=1e-5, atol=1e-5)  # position 0: RoPE is the identity
    # later positions differ by mlx-lm's rounded YaRN ramp: 6e-4 of the logit scale at 8 tokens (README)
    assert np.abs(theirs - ours).max() < 1e-2 * np.abs(ours).max()


def test_shared_experts_are_one_set_of_arrays_in_memory():
    src = source.describe(None, "mini", "float32", "float32", shared_experts=True)
    assert src.shared_experts and not src.mxfp4 and "experts shared by all layers" in src.label
    gc.collect()  # arrays earlier tests left to the collector would be freed in the middle
    mx.synchronize()
    before = mx.get_active_memory()
    model = source.build(src, mx.float32)
    shared = model.layers[3].mlp.experts.down_proj.weight
    assert np.array_equal(np.array(shared), np.array(model.layers[0].mlp.experts.down_proj.weight))
    distinct = source.build(source.describe(None, "mini", "float32", "float32"), mx.float32)
    expert_bytes = sum(v.nbytes for _, v in tree_flatten(distinct.layers[0].mlp.experts.parameters()))
    held = mx.get_active_memory() - before
    # the shared model holds 3 fewer layers of experts (4.8 MB) than the distinct one, give or take
    # small buffers (12 KB measured after other tests)
    assert abs(held - (2 * sum(v.nbytes for _, v in tree_flatten(distinct.parameters())) - 3 * expert_bytes)) < 2**16
