"""gpt-oss shapes: the published config and smaller presets with the same structure.

`hf_config(name)` returns a `config.json` exactly as the Hub's `openai/gpt-oss-20b` has it,
with only the sizes changed for the smaller presets. `count_parameters(config)` computes
per-component parameter counts from a config alone, with no weights.
"""

from __future__ import annotations

from ..errors import ReliefError

VOCAB_SIZE = 201088
BOS_ID, PAD_ID, EOS_ID, CALL_ID = 199998, 199999, 200002, 200012

_GPT_OSS_20B = {
    "architectures": ["GptOssForCausalLM"],
    "attention_bias": True,
    "attention_dropout": 0.0,
    "eos_token_id": EOS_ID,
    "experts_per_token": 4,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2880,
    "initial_context_length": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 2880,
    "max_position_embeddings": 131072,
    "model_type": "gpt_oss",
    "num_attention_heads": 64,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 24,
    "num_key_value_heads": 8,
    "num_local_experts": 32,
    "output_router_logits": False,
    "pad_token_id": PAD_ID,
    "quantization_config": {
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
        "quant_method": "mxfp4",
    },
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "rope_type": "yarn",
        "truncate": False,
    },
    "rope_theta": 150000,
    "router_aux_loss_coef": 0.9,
    "sliding_window": 128,
    "swiglu_limit": 7.0,
    "tie_word_embeddings": False,
    "transformers_version": "4.55.0.dev0",
    "use_cache": True,
    "vocab_size": VOCAB_SIZE,
}

# name -> (overrides of the 20b config, shard size in bytes, one-line description)
PRESETS: dict[str, tuple[dict, int, str]] = {
    "mini": (
        {"num_hidden_layers": 4, "hidden_size": 128, "intermediate_size": 128,
         "num_local_experts": 8, "num_attention_heads": 4, "num_key_value_heads": 2},
        40 << 20,
        "4 layers, hidden 128, 8 experts: the test and demo model (CPU friendly)",
    ),
    "gpt-oss-20b-2l": (
        {"num_hidden_layers": 2}, 2 << 30, "the real per-layer shapes, 2 layers (one of each attention type)"),
    "gpt-oss-20b-6l": (
        {"num_hidden_layers": 6}, 2 << 30, "the real per-layer shapes, 6 layers"),
    "gpt-oss-20b": ({}, 4 << 30, "the published gpt-oss-20b shapes, 24 layers"),
}


def hf_config(preset: str) -> dict:
    """The Hugging Face `config.json` of a preset."""
    if preset not in PRESETS:
        raise ReliefError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    config = {**_GPT_OSS_20B, **PRESETS[preset][0]}
    n = config["num_hidden_layers"]
    config["layer_types"] = ["sliding_attention", "full_attention"] * (n // 2) + ["sliding_attention"] * (n % 2)
    return dict(sorted(config.items()))


def generation_config() -> dict:
    return {
        "bos_token_id": BOS_ID,
        "do_sample": True,
        "eos_token_id": [EOS_ID, PAD_ID, CALL_ID],
        "pad_token_id": PAD_ID,
        "transformers_version": "4.55.0.dev0",
    }


def count_parameters(config: dict) -> dict[str, int]:
    """Parameters per component, from the config alone."""
    h, i = config["hidden_size"], config["intermediate_size"]
    e, d = config["num_local_experts"], config["head_dim"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    n, v = config["num_hidden_layers"], config["vocab_size"]
    attention = (h * q + q) + 2 * (h * kv + kv) + (q * h + h) + config["num_attention_heads"]
    experts = e * (h * 2 * i + 2 * i) + e * (i * h + h)
    counts = {
        "embed_tokens": v * h,
        "attention": n * attention,
        "router": n * (h * e + e),
        "experts": n * experts,
        "norms": n * 2 * h + h,
        "lm_head": v * h,
    }
    counts["total"] = sum(counts.values())
    return counts


def tensor_plan(config: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """Every tensor of a Hugging Face gpt-oss checkpoint: (name, shape, dtype), in file order.

    Experts are MXFP4 (`*_blocks`, `*_scales` uint8), everything else bf16, as published.
    """
    h, i = config["hidden_size"], config["intermediate_size"]
    e, d = config["num_local_experts"], config["head_dim"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    plan = [("model.embed_tokens.weight", (config["vocab_size"], h), "bf16")]
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        plan += [
            (p + "input_layernorm.weight", (h,), "bf16"),
            (p + "self_attn.q_proj.weight", (q, h), "bf16"),
            (p + "self_attn.q_proj.bias", (q,), "bf16"),
            (p + "self_attn.k_proj.weight", (kv, h), "bf16"),
            (p + "self_attn.k_proj.bias", (kv,), "bf16"),
            (p + "self_attn.v_proj.weight", (kv, h), "bf16"),
            (p + "self_attn.v_proj.bias", (kv,), "bf16"),
            (p + "self_attn.o_proj.weight", (h, q), "bf16"),
            (p + "self_attn.o_proj.bias", (h,), "bf16"),
            (p + "self_attn.sinks", (config["num_attention_heads"],), "bf16"),
            (p + "post_attention_layernorm.weight", (h,), "bf16"),
            (p + "mlp.router.weight", (e, h), "bf16"),
            (p + "mlp.router.bias", (e,), "bf16"),
            (p + "mlp.experts.gate_up_proj_blocks", (e, 2 * i, h // 32, 16), "u8"),
            (p + "mlp.experts.gate_up_proj_scales", (e, 2 * i, h // 32), "u8"),
            (p + "mlp.experts.gate_up_proj_bias", (e, 2 * i), "bf16"),
            (p + "mlp.experts.down_proj_blocks", (e, h, i // 32, 16), "u8"),
            (p + "mlp.experts.down_proj_scales", (e, h, i // 32), "u8"),
            (p + "mlp.experts.down_proj_bias", (e, h), "bf16"),
        ]
    plan += [("model.norm.weight", (h,), "bf16"), ("lm_head.weight", (config["vocab_size"], h), "bf16")]
    return plan


def nbytes(shape: tuple[int, ...], dtype: str) -> int:
    size = 1
    for s in shape:
        size *= s
    return size * {"u8": 1, "bf16": 2, "f32": 4}[dtype]
