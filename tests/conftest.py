"""Shared fixtures. Miniature checkpoints are built once per test session, on the same code
paths a real user's 13 GB download takes (synth writes the exact Hugging Face layout)."""

from __future__ import annotations

from pathlib import Path

import pytest

from relief_mlx.blas import ensure_fast_blas


def pytest_configure(config):
    """Run the suite with OpenBLAS preloaded on Linux's CPU backend (matmuls ~30x faster), by the
    same re-exec every `relief` command does; before any test module imports mlx. pytest's output
    capture is suspended first, so the re-executed run writes to the real terminal."""
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        capture.suspend_global_capture(in_=True)
    ensure_fast_blas()  # returns only when no re-exec is needed
    if capture is not None:
        capture.resume_global_capture()


# --- checkpoints (lead) -------------------------------------------------------------------
@pytest.fixture(scope="session")
def mini_hf(tmp_path_factory) -> Path:
    """A `mini` gpt-oss checkpoint in the Hugging Face layout (MXFP4 experts, bf16 rest)."""
    from relief_mlx.checkpoint.synth import synth

    return synth("mini", tmp_path_factory.mktemp("ckpt") / "mini-hf", seed=0)


@pytest.fixture(scope="session")
def mini_mlx(mini_hf, tmp_path_factory) -> Path:
    """`mini_hf` converted with the defaults (experts stay MXFP4)."""
    from relief_mlx.checkpoint.convert import convert

    return convert(mini_hf, tmp_path_factory.mktemp("ckpt") / "mini-mlx")


@pytest.fixture(scope="session")
def mini_mlx_f32(mini_hf, tmp_path_factory) -> Path:
    """`mini_hf` converted with float32 experts (what MLX's CPU gather_mm and LoRA training need)."""
    from relief_mlx.checkpoint.convert import convert

    return convert(mini_hf, tmp_path_factory.mktemp("ckpt") / "mini-mlx-f32", experts="float32", dtype="float32")
# --- end checkpoints ------------------------------------------------------------------------


# --- tokenizer and Harmony data (relief_mlx.checkpoint.tokenizer, relief_mlx.data) ----------
# The tokenizer build is cached in $RELIEF_CACHE (default ~/.cache/relief-mlx): the first
# session builds tokenizer.json (about 5 s), later ones copy it.
@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """gpt-oss's tokenizer files (o200k_harmony), as write_tokenizer_files writes them."""
    from relief_mlx.checkpoint.tokenizer import write_tokenizer_files

    out = tmp_path_factory.mktemp("o200k_harmony")
    write_tokenizer_files(out)
    return out


@pytest.fixture(scope="session")
def harmony_tokenizer():
    """relief_mlx's tokenizer wrapper, the default one (the cached tokenizer.json that
    `tokenizer_dir` copies), shared with code that falls back to it: loaded once."""
    from relief_mlx.data.harmony import default_tokenizer

    return default_tokenizer()


@pytest.fixture(scope="session")
def harmony_encoding():
    """openai-harmony's o200k_harmony encoding, reading the same offline ranks (the reference)."""
    harmony = pytest.importorskip("openai_harmony")
    from relief_mlx.checkpoint.tokenizer import o200k_ranks_path

    # openai-harmony reads the ranks from here when the encoding loads (else it downloads).
    patch = pytest.MonkeyPatch()
    patch.setenv("TIKTOKEN_ENCODINGS_BASE", str(o200k_ranks_path().parent))
    yield harmony.load_harmony_encoding(harmony.HarmonyEncodingName.HARMONY_GPT_OSS)
    patch.undo()


@pytest.fixture(scope="session")
def hf_tokenizer(tokenizer_dir):
    """transformers' AutoTokenizer over `tokenizer_dir`."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
# --- end tokenizer and Harmony data ---------------------------------------------------------


# --- fuzzing (hypothesis; relief_mlx.io and the readers, issue #16) --------------------------
# `ci` (the default) keeps the property tests within the suite's time budget; a soak run tries
# many more inputs: `python -m pytest tests/safety/test_fuzz.py --hypothesis-profile=soak`.
try:
    from hypothesis import HealthCheck, settings

    settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    settings.register_profile("soak", max_examples=20_000, deadline=None, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    settings.load_profile("ci")
except ImportError:  # hypothesis is a test dependency; tests/safety/test_fuzz.py needs it
    pass
# --- end fuzzing -----------------------------------------------------------------------------
