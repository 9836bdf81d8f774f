"""Resolve a model argument: a local folder, or a Hugging Face Hub id downloaded (or found in
the cache) with huggingface_hub. `HF_HUB_OFFLINE=1` is honoured by huggingface_hub itself."""

from __future__ import annotations

from pathlib import Path

from .errors import ReliefError

# The Hub repo of gpt-oss also holds `original/` (the reference weights) and `metal/`: skip them.
_IGNORE = ["original/*", "metal/*", "*.md", "*.png"]


def is_hub_id(src: str) -> bool:
    parts = src.split("/")
    return len(parts) == 2 and all(parts) and not src.startswith((".", "~")) and not Path(src).exists()


def resolve(src: str | Path, revision: str | None = None) -> tuple[Path, dict]:
    """Return (local folder, {"source", "revision"}); download a Hub id when needed."""
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ReliefError(f"{src} is a file, not a checkpoint folder; pass the folder that holds config.json")
        return path, {"source": str(path.resolve()), "revision": revision}
    if not is_hub_id(str(src)):
        raise ReliefError(f"{src} is neither an existing folder nor a Hub id like 'openai/gpt-oss-20b'; check the path")
    from huggingface_hub import snapshot_download

    try:
        local = Path(snapshot_download(str(src), revision=revision, ignore_patterns=_IGNORE))
    except Exception as e:  # huggingface_hub raises many types for offline, 404, auth and network
        raise ReliefError(
            f"could not get {src} from the Hugging Face Hub ({type(e).__name__}); check the id and your "
            f"network, or download it where you have one (`hf download {src}`) and pass the folder"
        ) from e
    return local, {"source": str(src), "revision": local.name}
