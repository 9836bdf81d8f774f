"""Read a safetensors header without loading tensors: names, dtypes and shapes, and
whether the file is complete (a truncated download fails here, naming the file)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from ..errors import ReliefError


def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (safetensors dtype, shape). Raises ReliefError for a missing, corrupt or truncated file."""
    if not path.is_file():
        raise ReliefError(f"shard {path} is missing; download the checkpoint again")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
    except (struct.error, ValueError) as e:
        raise ReliefError(f"shard {path} is not a valid safetensors file ({e}); download it again") from e
    header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + n + end > size:
        raise ReliefError(f"shard {path} is truncated ({size} of {8 + n + end} bytes); download it again")
    return {name: (t["dtype"], tuple(t["shape"])) for name, t in header.items()}
