"""The suite's own shape: pytest imports test modules by basename (no __init__.py), so two
test_x.py in different folders break the collection of the whole suite."""

from collections import Counter
from pathlib import Path


def test_test_module_basenames_are_unique():
    names = Counter(p.name for p in Path(__file__).parent.rglob("test_*.py"))
    assert [name for name, n in names.items() if n > 1] == []
