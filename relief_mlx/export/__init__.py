"""Take an adapter anywhere: fused into an MLX model (`fuse.fuse`), or exported (`export`) to the
Hugging Face layout, a PEFT adapter or one GGUF file. Every output is a folder built under a
temporary name (nothing appears at `out` on an error) with a model card and a sha256 manifest;
a GGUF may instead go to a file (`out` ending in .gguf), its Modelfile, card and manifest beside
it under the file's stem (`relief.gguf`: `relief.Modelfile`, `relief.md`, `relief.manifest.json`),
each moved into place when all are complete, the GGUF last."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from ..checkpoint.layout import DTYPES
from ..errors import ReliefError
from ..io import MANIFEST, atomic_dir, atomic_files, write_manifest
from .card import CARD, write_card
from .fuse import KEPT_ADAPTER, Progress, base_and_adapter, rounding_notes

FORMATS = ("hf", "peft", "gguf")


def export(model: str | Path, out: str | Path, format: str, adapter: str | Path | None = None,  # noqa: A002
           dtype: str | None = None, overwrite: bool = False, eval_summary: Path | None = None,
           progress: Progress | None = None) -> dict:
    """Write `model` (+ `adapter`, merged for hf and gguf) to the folder `out` in `format`; returns
    what was written."""
    from .gguf import GGUF_NAME, MODELFILE, export_gguf
    from .hf import export_hf
    from .peft import _base_name, export_peft

    if format not in FORMATS:
        raise ReliefError(f"--format must be one of {', '.join(FORMATS)}, not {format!r}")
    kept = Path(model) / KEPT_ADAPTER
    if adapter is None and kept.is_dir():
        raise ReliefError(f"{model} keeps part of its LoRA in {kept} (relief fuse --keep-adapter-for-experts); "
                          f"pass --adapter {kept} so that it is exported too")
    base, config, weights, lora = base_and_adapter(model, adapter)
    target = DTYPES[dtype] if dtype else None
    out = Path(out)
    # a .gguf --out is one file with its companions beside it, named after its stem
    names = ({GGUF_NAME: out.name, MODELFILE: f"{out.stem}.Modelfile", CARD: f"{out.stem}.md",
              MANIFEST: f"{out.stem}.manifest.json"} if format == "gguf" and out.suffix == ".gguf" else {})
    writer = (atomic_files(out.parent, [*names.values()][::-1], overwrite) if names
              else atomic_dir(out, overwrite=overwrite))
    with writer as tmp:
        records = []
        if format == "hf":
            details, records = export_hf(tmp, base, weights, lora, config, target, progress)
        elif format == "peft":
            details = export_peft(tmp, base, lora)
        else:
            details, records = export_gguf(tmp, base, weights, lora, config, target, out.stem if names else out.name,
                                           progress, gguf_name=names.get(GGUF_NAME, GGUF_NAME))
        result = {"format": format, "base": str(base), "adapter": str(lora.path) if lora else None,
                  "merged": [asdict(r) for r in records], "notes": rounding_notes(records), **details}
        write_card(tmp, str(out), format, base, lora, result, eval_summary=eval_summary, base_hf=_base_name(base))
        for built, final in names.items():
            if built != MANIFEST:  # written last, below
                (tmp / built).rename(tmp / final)
        write_manifest(tmp, {"format": f"relief-mlx-export-{format}/1",
                             **{k: v for k, v in result.items() if k != "merged"}})
        if names:
            (tmp / MANIFEST).rename(tmp / names[MANIFEST])
    return result | {"out": str(out)}
