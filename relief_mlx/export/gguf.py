"""`relief export --format gguf`: one GGUF file that llama.cpp (and so Ollama and LM Studio) loads,
written with the `gguf` package llama.cpp maintains, plus an Ollama `Modelfile`.

What llama.cpp's gpt-oss loader (`LLM_ARCH_OPENAI_MOE`, "gpt-oss") expects, as its
convert_hf_to_gguf.py writes it: gguf-py's names for every tensor (`blk.N.ffn_gate_exps.weight`,
`blk.N.attn_sinks.weight`, ...), gate and up experts apart (MLX already keeps them apart), 1-D
tensors in float32, the YaRN and sliding-window metadata, and the o200k_harmony tokenizer as a
"gpt2" BPE with the "gpt-4o" pre-tokenizer and the chat template.

MXFP4 experts stay MXFP4 (GGML type MXFP4): the same E8M0 scale and the same 4-bit codes, only
the nibbles reordered. A Hugging Face / MLX block of 32 values is 16 bytes with element 2b in
the low and 2b+1 in the high nibble of byte b; a GGML block is the scale byte, then 16 bytes
with element j in the low and j+16 in the high nibble of byte j. Touched experts are merged
dense (the adapter's delta never re-quantized), like every other merged weight.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import ReliefError
from ..io import write_text
from .fuse import Adapter, Merged, Progress, merge

GGUF_NAME = "model.gguf"
MODELFILE = "Modelfile"


@dataclass(frozen=True)
class _Tensor:
    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy shape of the bytes written
    dtype: type  # numpy dtype of the bytes written
    raw: object  # gguf.GGMLQuantizationType, or None when numpy's dtype says it
    make: Callable[[], np.ndarray]


def mxfp4_blocks(weight: mx.array, scales: mx.array) -> np.ndarray:
    """MLX MXFP4 (uint32 (..., out, in/8) + uint8 scales (..., out, in/32)) -> GGML MXFP4 bytes
    (..., out, in/32 * 17)."""
    blocks = np.array(weight.view(mx.uint8)).reshape(*scales.shape, 16)  # (..., out, in/32, 16)
    elements = np.stack([blocks & 0x0F, blocks >> 4], axis=-1).reshape(*scales.shape, 32)
    qs = elements[..., :16] | (elements[..., 16:] << 4)
    return np.concatenate([np.array(scales)[..., None], qs], axis=-1).reshape(*scales.shape[:-1], -1)


def _dense(name: str, value: mx.array) -> _Tensor:
    import gguf

    # llama.cpp computes 1-D tensors, every bias and the router in float32 (convert_hf_to_gguf.py's rule)
    if value.ndim == 1 or not name.endswith(".weight") or ".ffn_gate_inp." in name or value.dtype == mx.float32:
        return _Tensor(name, value.shape, np.float32, None, lambda: np.array(value.astype(mx.float32)))
    if value.dtype == mx.float16:
        return _Tensor(name, value.shape, np.float16, None, lambda: np.array(value))
    if value.dtype == mx.bfloat16:  # numpy has no bf16: write the bits
        return _Tensor(name, value.shape, np.uint16, gguf.GGMLQuantizationType.BF16,
                       lambda: np.array(value.view(mx.uint16)))
    raise ReliefError(f"tensor {name} is {value.dtype}; GGUF export writes float32, float16, bfloat16 or MXFP4")


def gguf_tensors(weights: dict[str, mx.array], config: dict) -> list[_Tensor]:
    """Every tensor of an MLX gpt-oss model (merged, lazy) as GGUF names, types and bytes."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT_OSS, config["num_hidden_layers"])
    quantization = config.get("quantization") or {}
    tensors = []
    for name in sorted(weights):
        if name.endswith((".scales", ".biases")):
            continue  # written with their weight
        key = f"{name}.weight" if name.endswith(".sinks") else name  # gguf-py maps sinks as a weight
        target = names.get_name(key, try_suffixes=(".weight", ".bias"))  # suffix kept: blk.0.attn_q.bias
        if target is None:
            raise ReliefError(f"tensor {name} has no GGUF name for gpt-oss; is this a gpt-oss checkpoint?")
        value, module = weights[name], name.removesuffix(".weight")
        if f"{module}.scales" not in weights:
            tensors.append(_dense(target, value))
            continue
        mode = (quantization.get(module) if isinstance(quantization.get(module), dict) else quantization).get("mode")
        if mode != "mxfp4":
            raise ReliefError(f"{module} is quantized in mode {mode!r}; GGUF export keeps only MXFP4 "
                              "(convert the model again with dense weights)")
        scales = weights[f"{module}.scales"]
        shape = (*scales.shape[:-1], scales.shape[-1] * 17)
        tensors.append(_Tensor(target, shape, np.uint8, gguf.GGMLQuantizationType.MXFP4,
                               lambda v=value, s=scales: mxfp4_blocks(v, s)))
    return tensors


def _metadata(writer, config: dict, file_type: int, name: str) -> None:
    """gpt-oss hyperparameters under the keys llama.cpp's loader reads (convert_hf_to_gguf.py's)."""
    import gguf

    rope = config.get("rope_scaling") or {}
    writer.add_name(name)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_expert_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_expert_count(config["num_local_experts"])
    writer.add_expert_used_count(config["num_experts_per_tok"])
    writer.add_sliding_window(config["sliding_window"])
    if rope.get("rope_type", rope.get("type")) == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        writer.add_rope_scaling_yarn_beta_fast(rope.get("beta_fast", 32.0))
        writer.add_rope_scaling_yarn_beta_slow(rope.get("beta_slow", 1.0))
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _tokenizer(writer, model_dir: Path, vocab_size: int) -> None:
    """o200k_harmony as llama.cpp reads it: every id in order (absent ones as unused [PADn]),
    special tokens as CONTROL, the BPE merges, bos/eos/pad, the chat template."""
    import gguf
    from tokenizers import Tokenizer

    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ReliefError(f"{model_dir} has no tokenizer.json; copy the model's tokenizer files into it")
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    by_id = {i: t for t, i in tokenizer.get_vocab(with_added_tokens=True).items()}
    special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    tokens, types = [], []
    for i in range(vocab_size):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        types.append(gguf.TokenType.UNUSED if i not in by_id else
                     gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-4o")  # o200k's pre-tokenizer regex, as llama.cpp names it
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


def write_gguf(path: Path, model_dir: Path, weights: dict[str, mx.array], config: dict, name: str,
               progress: Progress | None = None) -> dict:
    """Write the GGUF file at `path`, one tensor at a time; returns its tensor types."""
    import gguf

    tensors = gguf_tensors(weights, config)
    raw = {t.raw for t in tensors}
    file_type = (gguf.LlamaFileType.MOSTLY_MXFP4_MOE if gguf.GGMLQuantizationType.MXFP4 in raw else
                 gguf.LlamaFileType.MOSTLY_BF16 if gguf.GGMLQuantizationType.BF16 in raw else
                 gguf.LlamaFileType.ALL_F32)
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT_OSS])
    _metadata(writer, config, file_type, name)
    _tokenizer(writer, model_dir, config["vocab_size"])
    for t in tensors:
        writer.add_tensor_info(t.name, t.shape, np.dtype(t.dtype), int(np.prod(t.shape)) * np.dtype(t.dtype).itemsize,
                               raw_dtype=t.raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for k, t in enumerate(tensors):
        writer.write_tensor_data(t.make())
        if progress:
            progress(k + 1, len(tensors), t.name)
    writer.close()
    types: dict[str, int] = {}
    for t in tensors:
        kind = t.raw.name if t.raw is not None else np.dtype(t.dtype).name
        types[kind] = types.get(kind, 0) + 1
    return types


def modelfile(gguf_name: str = GGUF_NAME, date: str | None = None) -> str:
    """An Ollama Modelfile: the GGUF, Harmony's prompt layout as a Go template (the same messages
    as the GGUF's Jinja chat template: system, developer instructions, turns, `<|start|>assistant`),
    Harmony's stop tokens and gpt-oss's recommended sampling."""
    date = date or datetime.date.today().isoformat()
    return f'''# ollama create relief -f Modelfile && ollama run relief
FROM ./{gguf_name}
# "Current date" is the export date: edit it, or pass your own system message.
TEMPLATE """<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.
Knowledge cutoff: 2024-06
Current date: {date}

Reasoning: medium

# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>
{{{{- if .System }}}}<|start|>developer<|message|># Instructions

{{{{ .System }}}}<|end|>
{{{{- end }}}}
{{{{- range .Messages }}}}
{{{{- if eq .Role "user" }}}}<|start|>user<|message|>{{{{ .Content }}}}<|end|>
{{{{- else if eq .Role "assistant" }}}}<|start|>assistant<|channel|>final<|message|>{{{{ .Content }}}}<|end|>
{{{{- end }}}}
{{{{- end }}}}<|start|>assistant"""
PARAMETER stop "<|return|>"
PARAMETER stop "<|call|>"
PARAMETER temperature 1
PARAMETER top_p 1
'''


def export_gguf(tmp: Path, model_dir: Path, weights: dict[str, mx.array], adapter: Adapter | None, config: dict,
                dtype: mx.Dtype | None, name: str, progress: Progress | None = None,
                gguf_name: str = GGUF_NAME) -> tuple[dict, list[Merged]]:
    """Merge (touched MXFP4 experts dequantized), write model.gguf and the Modelfile (whose FROM
    names `gguf_name`, the file's final name) into `tmp`."""
    merged, records = merge(weights, adapter, config, "dequantize", dtype)
    from ..checkpoint.layout import mlx_quantization

    config = mlx_quantization(config, [r.module for r in records if r.kind == "dequantized"])
    types = write_gguf(tmp / GGUF_NAME, model_dir, merged, config, name, progress)
    write_text(tmp / MODELFILE, modelfile(gguf_name))
    return {"tensor_types": types}, records
