"""Where a LoRA step's time goes at gpt-oss-20b's real widths, part by part.

    python benchmarks/profile.py                    # -> benchmarks/results/profile-BACKEND.json
    python benchmarks/profile.py --tokens 512 --trials 3 --experts dense --skip-gather

One transformer block at the real shapes (hidden 2880, 64 heads, 32 experts of 2880, top 4;
random weights, float32 on the CPU, experts dense or MXFP4), LoRA r8 on q_proj and v_proj as the
seed replica, and the 201,088-token loss head, each timed alone (median of --trials after one
untimed run): attention, router, experts (relief's path and mlx-lm's gather_mm path), the block
forward, forward + backward with and without gradient checkpointing, the loss head (relief's
fused chunks at several chunk sizes, mlx-lm's full-logit cross-entropy) and the AdamW update of
24 layers' LoRA. A model of L layers costs about L x block + head + update per step. Memory:
one block (3.3 GB with dense float32 experts) and the head (2.3 GB), so it runs beside other work.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from relief_mlx.blas import ensure_fast_blas  # noqa: E402

ensure_fast_blas()

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from mlx.utils import tree_flatten, tree_map  # noqa: E402


def timed(fn, trials: int) -> dict:
    """Median, min and max seconds of `fn()` (evaluated) over `trials`, after one untimed run."""
    mx.eval(fn())
    times = []
    for _ in range(trials):
        mx.synchronize()
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "trials": times}


def build_block(args, experts: str):
    """One gpt-oss block of relief's model at `args`' shapes, q/v LoRA r8, random weights."""
    from mlx_lm.models.gpt_oss import TransformerBlock
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear

    from relief_mlx.bench.source import _mxfp4_scale
    from relief_mlx.model.moe import MLPBlock
    from relief_mlx.recipe import LoraSection
    from relief_mlx.train.targets import apply_lora

    block = TransformerBlock(args)
    block.mlp = MLPBlock(args)
    if experts == "mxfp4":
        glu, (h, i, e) = block.mlp.experts, (args.hidden_size, args.intermediate_size, args.num_local_experts)
        for name, (n_in, n_out) in {"gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}.items():
            q = QuantizedSwitchLinear.__new__(QuantizedSwitchLinear)
            nn.Module.__init__(q)
            q.group_size, q.bits, q.mode, q.global_scale, q.biases = 32, 4, "mxfp4", None, None
            q.weight = mx.random.randint(0, 2**31, (e, n_out, n_in // 8)).astype(mx.uint32)
            q.scales = mx.full((e, n_out, n_in // 32), _mxfp4_scale(n_in), dtype=mx.uint8)
            q.bias = 0.02 * mx.random.normal((e, n_out))
            setattr(glu, name, q)
    mx.eval(block.parameters())

    class Holder(nn.Module):  # apply_lora wants a model with .layers and .args
        def __init__(self):
            super().__init__()
            self.args = args
            self.layers = [block]

    holder = Holder()
    apply_lora(holder, LoraSection(targets=("self_attn.q_proj", "self_attn.v_proj"), rank=8, alpha=16.0))
    holder.update(tree_map(lambda p: p + 0.01, holder.trainable_parameters()))  # nonzero LoRA B
    mx.eval(holder.parameters())
    return holder, block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=512, help="tokens per micro-batch (default 512)")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--experts", choices=["dense", "mxfp4"], default="dense")
    parser.add_argument("--skip-gather", action="store_true", help="skip mlx-lm's gather_mm path (minutes on a CPU)")
    parser.add_argument("--out", type=Path)
    args_cli = parser.parse_args()

    from mlx_lm.models.base import create_attention_mask
    from mlx_lm.models.gpt_oss import ModelArgs, mlx_topk

    from relief_mlx.checkpoint.presets import hf_config
    from relief_mlx.doctor import backend
    from relief_mlx.model.moe import gather_only, grouped_glu
    from relief_mlx.train.loss import chunked_cross_entropy

    config = hf_config("gpt-oss-20b")
    args = ModelArgs.from_dict(config)
    t, trials = args_cli.tokens, args_cli.trials
    mx.random.seed(0)
    holder, block = build_block(args, args_cli.experts)
    x = mx.random.normal((1, t, args.hidden_size)) * 0.5
    mask = create_attention_mask(x, None)
    mx.eval(x)
    out: dict[str, dict] = {}

    def record(name: str, fn, n: int = trials) -> None:
        out[name] = timed(fn, n)
        print(f"{name:<48} {out[name]['median']:9.3f} s  ({out[name]['min']:.3f}-{out[name]['max']:.3f})", flush=True)

    attn_in = block.input_layernorm(x)
    mlp = block.mlp
    router_logits = mlp.router(x)
    _, indices = mlx_topk(router_logits, k=args.num_experts_per_tok, axis=-1)
    indices = mx.stop_gradient(indices)
    mx.eval(attn_in, indices)

    # -- forward pieces
    record("attention (norm, q/k/v/o with LoRA, sdpa)", lambda: block.self_attn(attn_in, mask))
    record("router + top-k + softmax", lambda: mx.softmax(mlx_topk(mlp.router(x), k=4, axis=-1)[0], axis=-1))
    record("experts, relief (grouped by expert)", lambda: grouped_glu(mlp.experts, x, indices))
    if not args_cli.skip_gather:
        record("experts, mlx-lm (gather_mm)", lambda: mlp.experts(x, indices), 1)
    record("block forward, relief", lambda: block(x, mask))

    # -- forward + backward of the block (LoRA gradients and d/dx, as inside a model)
    probe = mx.random.normal(x.shape)

    def block_loss(params, x):
        holder.update(params)
        return (block(x, mask) * probe).sum()

    def with_checkpoint(params, x):
        def run(params, x):
            holder.update(params)
            return block(x, mask)
        return (mx.checkpoint(run)(params, x) * probe).sum()

    params = holder.trainable_parameters()
    grad_plain = mx.grad(block_loss, argnums=(0, 1))
    grad_ckpt = mx.grad(with_checkpoint, argnums=(0, 1))
    record("block forward + backward, relief", lambda: grad_plain(params, x))
    record("block forward + backward, relief, checkpointed", lambda: grad_ckpt(params, x))
    if not args_cli.skip_gather:
        def gather_grad():
            with gather_only():
                return grad_plain(params, x)
        record("block forward + backward, mlx-lm (gather_mm)", gather_grad, 1)

    # -- the loss head, all positions trained
    head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
    mx.eval(head.parameters())
    h = mx.random.normal((t, args.hidden_size))
    targets = mx.random.randint(0, args.vocab_size, (t,))
    weights = mx.ones((t,))
    mx.eval(h, targets)
    for chunk in (64, 128, 256, 512):
        grad_head = mx.value_and_grad(lambda h, c=chunk: chunked_cross_entropy(head, h, targets, weights, c))
        record(f"loss head, relief fused, chunk {chunk}", lambda g=grad_head: g(h))
    full = mx.value_and_grad(lambda h: nn.losses.cross_entropy(head(h), targets).sum())
    record("loss head, full logits (mlx-lm's loss)", lambda: full(h))

    # -- AdamW over 24 layers' q/v LoRA (1,990,656 parameters)
    model24 = nn.Module()
    model24.layers = [tree_map(mx.zeros_like, holder.trainable_parameters()) for _ in range(24)]
    grads = tree_map(lambda p: mx.ones_like(p) * 1e-3, model24.trainable_parameters())
    opt = optim.AdamW(learning_rate=1e-4)
    opt.init(model24.trainable_parameters())
    mx.eval(model24.parameters(), grads, opt.state)

    def update():
        opt.update(model24, grads)
        return model24.parameters(), opt.state

    record("AdamW update, 24 layers of q/v LoRA", update)

    result = {"tokens": t, "experts": args_cli.experts, "dtype": "float32", "backend": backend(mx),
              "lora_parameters_24_layers": sum(v.size for _, v in tree_flatten(grads)), "seconds": out}
    path = args_cli.out or ROOT / "benchmarks" / "results" / f"profile-{args_cli.experts}-{backend(mx)}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
