"""The model `relief_mlx.load` builds matches transformers' GptOssForCausalLM (an independent
implementation) on the same Hugging Face checkpoint, across the 128-token sliding window."""

import mlx.core as mx
import numpy as np
import pytest

from relief_mlx import load
from relief_mlx.model.gpt_oss import _yarn_inv_freq

torch = pytest.importorskip("torch", reason="the reference needs the test extra: pip install -e '.[test]'")
transformers = pytest.importorskip("transformers")

TOKENS = 300  # well past the 128-token window of the sliding layers


@pytest.fixture(scope="module")
def hf_logits(mini_hf):
    model = transformers.GptOssForCausalLM.from_pretrained(mini_hf, dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(0, 199998, size=(1, TOKENS))
    with torch.no_grad():
        return ids, model(torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("truncate", [False, True])
def test_yarn_frequencies_match_transformers(truncate):
    """Guards the mlx-lm 0.32 YaRN bug: it rounds the correction range even with truncate: false."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
               "original_max_position_embeddings": 4096, "truncate": truncate}
    config = transformers.GptOssConfig(head_dim=64, rope_theta=150000, rope_scaling=scaling,
                                       max_position_embeddings=131072)
    want, _ = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    got = np.array(_yarn_inv_freq(64, 150000, 32.0, 4096, 32.0, 1.0, truncate))
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)


@pytest.mark.parametrize("checkpoint", ["mini_mlx", "mini_mlx_f32"])
def test_logits_match_transformers_over_300_tokens(checkpoint, hf_logits, request):
    ids, want = hf_logits
    model, _ = load(request.getfixturevalue(checkpoint), dtype=mx.float32)
    got = np.array(model(mx.array(ids)))
    relative = np.abs(got - want).max(axis=-1) / np.abs(want).max(axis=-1)
    assert relative.max() < 1e-4, f"worst position {relative.argmax()}: {relative.max():.2e}"
    assert (got.argmax(-1) == want.argmax(-1)).all()
