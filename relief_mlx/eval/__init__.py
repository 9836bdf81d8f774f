"""`relief eval`: scenario testing of a base model against LoRA adapters.

`score` (score.py) is the pure scorer of one answer on one test item; `evaluate` (run.py) runs
the model over a split and writes the report (report.py).
"""

from .score import Score, Violation, normalize, score

__all__ = ["Score", "Violation", "normalize", "score"]
