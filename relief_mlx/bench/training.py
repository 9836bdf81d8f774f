"""LoRA training speed: tokens per optimizer step per second and peak memory, for our trainer's
step on relief's model and mlx-lm's step on mlx-lm's model (the same weight arrays, each with
the same LoRA), and where relief's memory goes.

Ours is the trainer's own micro-step (`train.trainer.make_micro_step`: the masked, chunked loss of
`train.loss`, compiled when the recipe says so) on a micro-batch built by `train.data.micro_batch`,
then what `train()` does with its gradients: normalize by trained tokens, clip, AdamW update.
mlx-lm's is `mlx_lm.tuner.trainer`'s `default_loss` inside the compiled step its `train()`
defines (rebuilt here: it is a closure there), with the same optimizer settings and without
gradient checkpointing (`mlx_lm.lora`'s default).

Every position of every sequence is trained in both (the worst case for the loss head).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from ..memory import StepShape
from ..recipe import LoraSection, TrainSection, load_recipe
from .generation import Say, random_prompt
from .stats import summarize

# The seed replica (recipes/seed-replica.toml): LoRA r8, alpha 16 on q_proj and v_proj of every
# layer; batch 1 of 512 tokens, gradient checkpointing, chunked loss head, no compile, AdamW 1e-4.
SEED_REPLICA_LORA = LoraSection(targets=("self_attn.q_proj", "self_attn.v_proj"), rank=8, alpha=16.0)
SEED_REPLICA_TRAIN = TrainSection(batch_size=1, grad_accumulation=8, learning_rate=1e-4, schedule="linear",
                                  grad_checkpoint=True, compile=False, loss_chunk=128, seed=42)
SEED_REPLICA_SEQ = 512


@dataclass(frozen=True)
class TrainShape:
    """What one training step processes."""

    lora: LoraSection
    train: TrainSection
    """batch_size, loss_chunk, compile, grad_checkpoint, pad_multiple and the optimizer are read."""
    seq: int
    """Tokens per sequence."""
    source: str
    """Where the shape came from: the seed replica's defaults or a recipe file."""

    @property
    def tokens(self) -> int:
        return self.train.batch_size * self.seq

    def step_shape(self, model: nn.Module) -> StepShape:
        """The shape `memory.train_forecast` takes; every position trained, as in the bench."""
        from ..train.targets import count_trainable

        return StepShape(tokens=self.tokens, sequence=self.seq, trained=self.tokens,
                         trainable=count_trainable(model), grad_checkpoint=self.train.grad_checkpoint,
                         loss_chunk=self.train.loss_chunk)

    def to_dict(self) -> dict:
        return {"source": self.source, "targets": list(self.lora.targets), "rank": self.lora.rank,
                "alpha": self.lora.alpha, "layers": self.lora.layers, "batch_size": self.train.batch_size,
                "seq": self.seq, "loss_chunk": self.train.loss_chunk, "compile": self.train.compile,
                "grad_checkpoint": self.train.grad_checkpoint}


def train_shape(recipe: str | None = None, seq: int | None = None) -> TrainShape:
    """The recipe's [lora] and [train] with data.max_length tokens per sequence (or `seq`);
    without a recipe, the seed replica's LoRA shape."""
    if recipe is None:
        return TrainShape(SEED_REPLICA_LORA, SEED_REPLICA_TRAIN, seq or SEED_REPLICA_SEQ, "seed replica (built in)")
    r = load_recipe(recipe)
    return TrainShape(r.lora, r.train, seq or r.data.max_length, recipe)


def _sequences(shape: TrainShape, seed: int) -> np.ndarray:
    """(B, seq) random ordinary token ids."""
    return np.stack([np.array(random_prompt(shape.seq, seed + b)) for b in range(shape.train.batch_size)])


def relief_step(model: nn.Module, shape: TrainShape, seed: int = 0) -> Callable[[], None]:
    """One optimizer step of `relief train` on a fixed micro-batch."""
    from ..data.dataset import Example
    from ..train.data import micro_batch
    from ..train.trainer import grad_norm, make_micro_step, update

    tc = shape.train
    tokens = _sequences(shape, seed)
    examples = [Example(t.astype(np.int32), np.ones(len(t), bool), None, len(t), "kept") for t in tokens]
    mb = micro_batch(examples, list(range(len(examples))), shape.seq, tc.pad_multiple)
    arrays = [mx.array(a) for a in (mb.inputs, mb.positions, mb.targets, mb.weights, mb.targets_full, mb.mask_full)]
    optimizer = optim.AdamW(learning_rate=tc.learning_rate, betas=list(tc.betas), eps=tc.eps,
                            weight_decay=tc.weight_decay, bias_correction=True)
    optimizer.init(model.trainable_parameters())
    micro_step = make_micro_step(model, tc)

    def step() -> None:
        grads = tree_map(mx.zeros_like, model.trainable_parameters())
        loss, grads = micro_step(grads, *arrays)
        mx.eval(loss, grads)
        grads = tree_map(lambda g: g / mb.trained, grads)
        update(model, optimizer, grads, grad_norm(grads), tc.max_grad_norm)

    return step


def mlx_lm_step(model: nn.Module, shape: TrainShape, seed: int = 0) -> Callable[[], None]:
    """One optimizer step of mlx-lm's LoRA trainer (`mlx_lm.tuner.trainer.train`) on a fixed batch."""
    from mlx_lm.tuner.trainer import default_loss

    tc = shape.train
    batch = mx.array(_sequences(shape, seed))  # (B, seq)
    lengths = mx.array([[0, shape.seq]] * shape.train.batch_size)  # (offset, length): all trained
    optimizer = optim.AdamW(learning_rate=tc.learning_rate, betas=list(tc.betas), eps=tc.eps,
                            weight_decay=tc.weight_decay, bias_correction=True)
    loss_value_and_grad = nn.value_and_grad(model, default_loss)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def compiled(batch, lengths):
        (loss, tokens), grad = loss_value_and_grad(model, batch, lengths)
        optimizer.update(model, grad)
        return loss, tokens

    def step() -> None:
        loss, tokens = compiled(batch, lengths)
        mx.eval(state, loss, tokens)

    return step


STEPS: dict[str, Callable[[nn.Module, TrainShape, int], Callable[[], None]]] = {
    "relief": relief_step, "mlx-lm": mlx_lm_step}


def bench_training(models: dict[str, nn.Module], shape: TrainShape, trials: int, seed: int = 0,
                   say: Say | None = None) -> dict[str, dict]:
    """{runner: {"tokens_per_s", "step_s", "peak_memory_bytes", "cache_bytes"}} for the LoRA step
    of `shape`, each runner ("relief", "mlx-lm") on its model.

    The models must already carry the LoRA layers (`train.targets.apply_lora`). Each runner takes
    one untimed step first (compilation); then the runners alternate for `trials` timed steps, in
    an order that flips every trial.
    Their trainable weights move, which does not change the work of a step.
    """
    say = say or (lambda message: None)
    runners = list(models)
    steps = {}
    for name, model in models.items():
        model.train()
        say(f"training: {name} LoRA step, first (untimed) step")
        steps[name] = STEPS[name](model, shape, seed)
        steps[name]()
    say(f"training: LoRA step, {shape.tokens} tokens x {trials} trials")
    times: dict[str, list[float]] = {name: [] for name in runners}
    peaks, caches = dict.fromkeys(runners, 0), dict.fromkeys(runners, 0)
    for trial in range(trials):
        for name in runners if trial % 2 == 0 else runners[::-1]:  # neither always runs first
            mx.synchronize()
            mx.reset_peak_memory()
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
            peaks[name] = max(peaks[name], mx.get_peak_memory())
            caches[name] = max(caches[name], mx.get_cache_memory())
    for model in models.values():
        model.eval()
    return {name: {"tokens_per_s": summarize([shape.tokens / t for t in times[name]]),
                   "step_s": summarize(times[name]), "peak_memory_bytes": peaks[name],
                   "cache_bytes": caches[name]} for name in runners}


def memory_breakdown(model: nn.Module, shape: TrainShape, seed: int = 0) -> dict[str, int]:
    """Where relief's LoRA step puts its memory besides the weights, each part measured alone (bytes):

    lora_state (LoRA parameters, gradient, accumulated gradient and AdamW's two moments: five
    copies), activations (the body's peak above what was held before, with its LoRA gradients
    but no loss head: hidden states into a random probe), and loss_head (the chunked head's peak
    on `tokens` trained rows, value and gradient). The model carries the LoRA layers."""
    from ..train.loss import chunked_cross_entropy, chunked_value_and_grad, hidden_states, layerwise_value_and_grad

    tc = shape.train
    trainable = sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters()))
    inputs = mx.array(_sequences(shape, seed))  # (B, seq)
    probe = mx.random.normal((*inputs.shape, model.args.hidden_size), key=mx.random.key(seed)).astype(
        model.lm_head.weight.dtype)
    mx.eval(probe)

    def body():  # what the trainer's step does without the loss head
        loss = lambda h: (h * probe).astype(mx.float32).sum()  # noqa: E731
        if tc.grad_checkpoint and tc.loss_chunk and not tc.compile:
            return layerwise_value_and_grad(model, inputs, mx.value_and_grad(loss))
        return nn.value_and_grad(model, lambda m: loss(hidden_states(m, inputs, tc.grad_checkpoint)))(model)

    def head():  # as the trainer's step computes it
        h, targets = probe.reshape(-1, probe.shape[-1]), inputs.reshape(-1)
        weights, chunk = mx.ones(len(targets)), tc.loss_chunk or shape.tokens
        if tc.grad_checkpoint and tc.loss_chunk and not tc.compile:
            return chunked_value_and_grad(model.lm_head, h, targets, weights, chunk)
        return mx.value_and_grad(lambda h: chunked_cross_entropy(model.lm_head, h, targets, weights, chunk))(h)

    out = {"lora_state": 5 * trainable}
    model.train()
    for name, run in (("activations", body), ("loss_head", head)):
        mx.synchronize()
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        mx.eval(run())
        out[name] = mx.get_peak_memory() - before
    model.eval()
    return out
