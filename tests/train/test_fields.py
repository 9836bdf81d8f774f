"""Every recipe field reaches the code that uses it: a run reads each one (a setting that is
parsed but never used cannot hide, as one did in mlx-lm)."""

from __future__ import annotations

import dataclasses
import sys

import pytest

from relief_mlx.recipe import SECTIONS


class _Reads:
    """Records which recipe fields are read by code outside recipe.py and dataclasses."""

    def __init__(self):
        self.seen: set[str] = set()

    def spy(self, section_name: str, section):
        reads = self

        class Spy(type(section)):
            def __getattribute__(self, key):
                caller = sys._getframe(1).f_code.co_filename
                fields = {f.name for f in dataclasses.fields(type(section))}
                if key in fields and not caller.endswith(("recipe.py", "dataclasses.py", "copy.py")):
                    reads.seen.add(f"{section_name}.{key}")
                return super().__getattribute__(key)

        return Spy(**dataclasses.asdict(section))


def test_every_recipe_field_reaches_the_code_that_uses_it(make_recipe, monkeypatch):
    """Guards against a setting that is parsed but never used (mlx-lm had one)."""
    pytest.importorskip("mlx")
    from mlx.utils import tree_map

    from relief_mlx.train import trainer as trainer_module

    base = make_recipe(
        "train.iterations=0", "train.epochs=1", "train.batch_size=2", "train.grad_accumulation=2",
        "train.warmup_steps=1", "train.schedule=\"cosine\"", "train.min_learning_rate=1e-3",
        "train.grad_checkpoint=true", "train.max_grad_norm=0.5", "train.weight_decay=0.01",
        "lora.dropout=0.1", "lora.layers=2", "validation.every=1", "validation.max_batches=1",
        "validation.patience=3", "output.checkpoint_every=1", "output.report_every=1",
        "eval.enabled=true", "eval.max_tokens=2",
    )
    reads = _Reads()
    spied = dataclasses.replace(base, **{name: reads.spy(name, getattr(base, name)) for name in SECTIONS})

    real = trainer_module.make_micro_step

    def micro_step(model, tc):  # one NaN micro-step, so the NaN path reads its setting too
        step, calls = real(model, tc), []

        def poisoned(accumulated, *batch):
            loss, grads = step(accumulated, *batch)
            calls.append(1)
            return loss, tree_map(lambda g: g * float("nan"), grads) if len(calls) == 1 else grads

        return poisoned

    monkeypatch.setattr(trainer_module, "make_micro_step", micro_step)
    trainer_module.train(spied)
    every = {f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    assert every - reads.seen == set()
