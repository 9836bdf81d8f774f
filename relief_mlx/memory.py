"""How much memory a LoRA training step needs, by component, from the config alone.

`train_forecast` runs before anything is loaded (`relief train` prints it and refuses a recipe the
machine cannot hold; `relief bench` prints it next to the measured peak). Its parts:

- weights: exact, parameter counts times their storage (MXFP4 experts are 4.25 bits a value).
- lora_state: exact, the LoRA parameters, their gradient, the accumulated gradient and AdamW's
  two moments (five copies).
- activations: what the forward keeps for the backward. With gradient checkpointing, every
  layer's input plus one layer's activations (and as much again for their gradients) while
  that layer is recomputed; without it, every layer's activations. Per token and layer a
  gpt-oss block keeps about `_LAYER_VALUES` values of the model's dtype (projections, rotated
  q/k, expert inputs and the three expert projections of each chosen expert) and two float32
  attention maps of `heads x tokens` (scores and probabilities).
- loss_head: relief's chunked head: two chunks' (loss_chunk, vocab) arrays alive at once, each
  the logits in float32, their shifted copy and exp (and in bf16 the logits and exp in bf16
  too): 24 bytes a logit in float32, 32 in bf16 (measured at the real widths), plus the hidden
  states of the trained positions; with loss_chunk = 0, the full logits in the model's dtype and
  float32 plus the softmax and its gradient.

`total` is the forecast peak of active memory. MLX also keeps freed buffers for reuse (its
allocator cache: `allocator_cache`, not in the total), and releases them when an allocation
would pass its limit, so they do not decide whether a run fits. The per-token constants are
checked against measured peaks at the real widths (`benchmarks/realsize.py`); the forecast is an
estimate, and `train.memory_check = false` turns the refusal off.
"""

from __future__ import annotations

from dataclasses import dataclass

from .checkpoint.limits import weight_bytes
from .errors import ReliefError

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_LORA_COPIES = 5  # parameters, gradient, accumulated gradient, AdamW m and v


def _layer_values(config: dict) -> int:
    """Values (of the model's dtype) one block keeps per token for its backward, attention maps aside."""
    d, i, k = config["hidden_size"], config["intermediate_size"], config["num_experts_per_tok"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    attention = 4 * d + 3 * q + 4 * kv  # norm in/out, residuals; q, rotated q, sdpa out; k, v, rotated k
    moe = 4 * d + k * (3 * d + 3 * i)  # norm, router, sum; per expert: input, output, weighted, up, gate, act
    return attention + moe


@dataclass(frozen=True)
class StepShape:
    """What one micro-batch of a LoRA step processes."""

    tokens: int
    """Tokens per micro-batch (batch_size x max_length)."""
    sequence: int
    """Tokens per sequence (attention maps grow with its square)."""
    trained: int
    """Trained positions the loss head sees (at most `tokens`)."""
    trainable: int
    """LoRA parameters."""
    grad_checkpoint: bool
    loss_chunk: int


def train_forecast(config: dict, dtype_bytes: int, mxfp4: bool, shape: StepShape) -> dict[str, int]:
    """Bytes of each component of a LoRA step's peak (see the module doc) and their `total`."""
    n, d, v = config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]
    heads = config["num_attention_heads"]
    batch = max(shape.tokens // shape.sequence, 1)
    layer = shape.tokens * _layer_values(config) * dtype_bytes + 2 * batch * heads * shape.sequence**2 * 4
    saved_inputs = n * shape.tokens * d * dtype_bytes
    activations = saved_inputs + 2 * layer if shape.grad_checkpoint else n * layer
    if shape.loss_chunk:
        per_logit = 2 * (12 + (2 * dtype_bytes if dtype_bytes < 4 else 0))  # two chunks alive
        head = min(shape.loss_chunk, shape.trained) * v * per_logit + shape.trained * d * dtype_bytes
    else:
        head = shape.tokens * v * (dtype_bytes + 12)
    parts = {
        "weights": weight_bytes(config, dtype_bytes, mxfp4),
        "lora_state": _LORA_COPIES * shape.trainable * dtype_bytes,
        "activations": activations,
        "loss_head": head,
    }
    parts["total"] = sum(parts.values())
    parts["allocator_cache"] = layer + head  # freed transients MLX may keep; not in the total
    return parts


def describe(parts: dict[str, int]) -> str:
    """`13.6 GiB: weights 12.8 + activations 0.5 + loss head 0.3 + LoRA state 0.0`"""
    names = ("weights", "activations", "loss_head", "lora_state")
    body = " + ".join(f"{k.replace('_', ' ').replace('lora', 'LoRA')} {parts[k] / GIB:.1f}" for k in names)
    return f"{parts['total'] / GIB:.1f} GiB: {body}"


def recipe_forecast(recipe, config: dict, dtype_bytes: int) -> dict[str, int]:
    """`train_forecast` for a Recipe on the model of `config` (every position assumed trained)."""
    from .train.targets import trainable_parameters

    tc, length = recipe.train, recipe.data.max_length
    rows = 1 if tc.pack else tc.batch_size  # a packed micro-batch is one row
    shape = StepShape(tokens=rows * length, sequence=length, trained=rows * length,
                      trainable=trainable_parameters(config, recipe), grad_checkpoint=tc.grad_checkpoint,
                      loss_chunk=tc.loss_chunk)
    mxfp4 = (config.get("quantization") or {}).get("mode") == "mxfp4"
    return train_forecast(config, dtype_bytes, mxfp4, shape)


def check_recipe_fits(recipe, config: dict, dtype_bytes: int, available: tuple[int | None, str],
                      where: str) -> dict[str, int]:
    """The forecast of `recipe`; a one-line ReliefError naming what would fit when it exceeds `available`."""
    from dataclasses import replace

    parts = recipe_forecast(recipe, config, dtype_bytes)
    limit, source = available
    if limit is None or parts["total"] <= limit:
        return parts

    def total(**changes) -> int:
        sections = {name: replace(getattr(recipe, name), **values) for name, values in changes.items()}
        return recipe_forecast(replace(recipe, **sections), config, dtype_bytes)["total"]

    fixes = []
    if not recipe.train.grad_checkpoint:
        fixes.append(("train.grad_checkpoint = true", total(train={"grad_checkpoint": True})))
    for length in range(recipe.data.max_length - 64, 15, -64):
        if total(data={"max_length": length}) <= limit:
            fixes.append((f"data.max_length = {length}", total(data={"max_length": length})))
            break
    batch = recipe.train.batch_size // 2
    while batch >= 1 and not recipe.train.pack:
        if total(train={"batch_size": batch}) <= limit:
            fixes.append((f"train.batch_size = {batch}", total(train={"batch_size": batch})))
            break
        batch //= 2
    qv = ("self_attn.q_proj", "self_attn.v_proj")
    if set(recipe.lora.targets) != set(qv):
        fixes.append(("lora.targets = [\"self_attn.q_proj\", \"self_attn.v_proj\"]", total(lora={"targets": qv})))
    fits = [f"{change} ({size / GIB:.1f} GiB)" for change, size in fixes if size <= limit]
    advice = ("; it would fit with " + " or ".join(fits)) if fits else (
        "; no recipe change fits: use MXFP4 experts (`relief convert --experts mxfp4`) or a larger machine")
    raise ReliefError(
        f"{where}: the training step needs about {describe(parts)} but this machine has {limit / GIB:.1f} GiB "
        f"({source}){advice}; --set train.memory_check=false trains anyway"
    )


def forecast_run(recipe) -> dict:
    """What `relief train` prints before it starts: the recipe's forecast on its model (config.json
    only, nothing loaded) and the memory available; raises when it does not fit (unless
    `train.memory_check` is false or RELIEF_MEMORY_CHECK=off)."""
    import mlx.core as mx

    from .bench.memory import available_memory
    from .checkpoint.inspect import model_config
    from .checkpoint.limits import memory_check_off

    config, source = model_config(recipe.model.path)
    dtype = recipe.model.dtype
    if dtype == "auto":
        dtype = "float32" if mx.default_device() == mx.cpu else "bfloat16"
    available = available_memory()
    if recipe.train.memory_check and not memory_check_off():
        parts = check_recipe_fits(recipe, config, DTYPE_BYTES[dtype], available, f"{source}, {dtype}")
    else:
        parts = recipe_forecast(recipe, config, DTYPE_BYTES[dtype])
    return {"parts": parts, "dtype": dtype, "available_bytes": available[0], "available_source": available[1]}
