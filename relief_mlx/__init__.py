"""relief-mlx: fine-tune gpt-oss into an emergency-relief assistant with MLX, and run it."""

__version__ = "0.1.0"


def load(path, adapter=None, dtype=None):
    """Load a converted checkpoint folder (and optionally a LoRA adapter): `(model, tokenizer)`."""
    from .model.load import load as _load

    return _load(path, adapter=adapter, dtype=dtype)


__all__ = ["load", "__version__"]
