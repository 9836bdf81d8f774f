"""safetensors files, read only after their header is checked, and written through a file object.

`read_header` checks a header without loading tensors, the way the `safetensors` library
validates one (and more strictly than MLX's loader, which trusts it): a length field within the
file and under 100 MB, a JSON object of tensors with a known dtype, a shape of non-negative
integers, and data offsets that lie in the file, match the dtype and shape exactly, and tile
the data section with no overlap or gap. A truncated download, random bytes or a hostile
header fails here in one line naming the file and the tensor, before MLX maps anything.
`check` is the same for callers that only want the file vetted before `mx.load`.

`save` writes through a Python file object: a full disk then raises OSError (MLX given a path
raises a bare RuntimeError) and MLX adds no `.safetensors` to a temporary name.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from ..errors import ReliefError, shown

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
               "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8, "C64": 8}


def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (safetensors dtype, shape). Raises ReliefError for a missing, corrupt, truncated or
    inconsistent file."""
    path = Path(path)
    if not path.is_file():
        raise ReliefError(f"{path} is missing; download it again or write it again")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _bad(path, f"it is {size} bytes long, too short for a header")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise _bad(path, f"its header length field says {n:,} bytes, but the file holds {size:,}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _bad(path, f"its header is not JSON ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise _bad(path, "its header is not a JSON object")
    header.pop("__metadata__", None)
    tensors = {name: _tensor(path, shown(name), entry) for name, entry in header.items()}
    end = 0
    for name, (_, _, (start, stop)) in sorted(tensors.items(), key=lambda t: (t[1][2], t[0])):
        if start != end:
            raise _bad(path, f"tensor {shown(name)} starts at byte {start} of the data, but the previous one ends "
                             f"at {end} (overlapping or a gap)")
        end = stop
    if 8 + n + end != size:
        what = "truncated" if 8 + n + end > size else "longer than its tensors"
        raise ReliefError(f"{path} is {what} ({size:,} bytes, its header describes {8 + n + end:,}); "
                          "download it again or write it again")
    return {name: (dtype, shape) for name, (dtype, shape, _) in tensors.items()}


def _tensor(path: Path, name: str, entry: Any) -> tuple[str, tuple[int, ...], tuple[int, int]]:
    if not isinstance(entry, dict):
        raise _bad(path, f"tensor {name}'s entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise _bad(path, f"tensor {name} has dtype {dtype!r}, not one of {', '.join(DTYPE_BYTES)}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise _bad(path, f"tensor {name} has shape {shape!r}, not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)):
        raise _bad(path, f"tensor {name} has data_offsets {offsets!r}, not two non-negative integers")
    start, stop = offsets
    if stop - start != math.prod(shape) * DTYPE_BYTES[dtype]:
        raise _bad(path, f"tensor {name} is {dtype} {tuple(shape)}, {math.prod(shape) * DTYPE_BYTES[dtype]:,} bytes, "
                         f"but its data_offsets span {stop - start:,}")
    return dtype, tuple(shape), (start, stop)


def _bad(path: Path, problem: str) -> ReliefError:
    return ReliefError(f"{path} is not a valid safetensors file: {problem}; download it again or write it again")


MLX_CANNOT_LOAD = ("F64", "F8_E5M2")  # MLX 0.32's safetensors reader raises on these


def check(path: Path) -> Path:
    """`path`, once its header has passed `read_header` and holds only dtypes MLX loads (for
    callers about to `mx.load` it)."""
    for name, (dtype, _) in read_header(path).items():
        if dtype in MLX_CANNOT_LOAD:
            raise _bad(path, f"tensor {name} is {dtype}, a dtype MLX cannot load")
    return path


def save(path: Path, arrays: dict, metadata: dict[str, str] | None = None) -> None:
    """`mx.save_safetensors` through a file object (see the module doc)."""
    import mlx.core as mx

    with open(path, "wb") as f:
        mx.save_safetensors(f, arrays, metadata=metadata)
