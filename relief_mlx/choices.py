"""The lists of names a user chooses from, each defined once: recipes are validated against
them, the CLI offers them as choices, and the code that acts on a name reads the same tuple."""

REASONING_EFFORTS = ("low", "medium", "high")
"""The `Reasoning:` line of the Harmony system message."""
MASK_MODES = ("final", "last", "final+analysis", "all")
"""Which tokens of a conversation are trained (`data.mask`, `relief data check --mask`)."""
DTYPES = ("float32", "bfloat16", "float16")
"""Float weight dtypes, by MLX's names (`getattr(mlx.core, name)` is the dtype)."""
EXPERT_FORMATS = ("auto", "mxfp4", "bfloat16", "float32")
"""Expert weights: MXFP4 as published, or dequantized to a dtype; auto keeps what the source has."""
