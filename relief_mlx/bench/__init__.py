"""`relief bench`: generation and LoRA training speed and memory of a converted model or a preset
synthesized in memory, next to the machine's measured bandwidth and, on request, mlx-lm."""

from .run import BenchConfig, run_bench

__all__ = ["BenchConfig", "run_bench"]
