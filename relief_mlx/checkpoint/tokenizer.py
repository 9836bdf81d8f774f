"""The o200k_harmony tokenizer of gpt-oss, built offline from the real o200k_base ranks.

The ranks come from `$TIKTOKEN_ENCODINGS_BASE/o200k_base.tiktoken` (the file openai-harmony and
tiktoken read) or from the gzip the `bpe-openai` wheel ships, so no download is ever needed.
`write_tokenizer_files` writes what the `openai/gpt-oss-20b` Hub repo holds: `tokenizer.json`,
`tokenizer_config.json`, `special_tokens_map.json` and `chat_template.jinja`.

Deriving 200k BPE merges takes seconds, so `tokenizer.json` is built once into the cache folder
(`$RELIEF_CACHE` or `~/.cache/relief-mlx`), keyed by the ranks' sha256 and `FORMAT_VERSION`,
and copied from there afterwards.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

from .. import io
from ..errors import ReliefError

O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
O200K_FILE = "o200k_base.tiktoken"
# Bump when the tokenizer.json we build changes, so stale caches are not reused.
FORMAT_VERSION = 1

# The pre-tokenizer regex of tiktoken's o200k_base (and so of o200k_harmony), verbatim.
O200K_PATTERN = "|".join(
    [
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)

NUM_BASE_TOKENS = 199_998
VOCAB_SIZE = 201_088
MODEL_MAX_LENGTH = 131_072  # max_position_embeddings of gpt-oss-20b

# Harmony's named special tokens; every other id from 199998 up is `<|reserved_N|>`.
HARMONY_SPECIAL_TOKENS = {
    199_998: "<|startoftext|>",
    199_999: "<|endoftext|>",
    200_002: "<|return|>",
    200_003: "<|constrain|>",
    200_005: "<|channel|>",
    200_006: "<|start|>",
    200_007: "<|end|>",
    200_008: "<|message|>",
    200_012: "<|call|>",
}
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|return|>"
PAD_TOKEN = "<|endoftext|>"


def cache_dir() -> Path:
    """Where built artefacts are kept between runs: `$RELIEF_CACHE` or `~/.cache/relief-mlx`."""
    env = os.environ.get("RELIEF_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "relief-mlx"


def special_tokens() -> dict[int, str]:
    """Every id from 199998 to 201087 with its token text (named or `<|reserved_N|>`)."""
    return {
        i: HARMONY_SPECIAL_TOKENS.get(i, f"<|reserved_{i}|>")
        for i in range(NUM_BASE_TOKENS, VOCAB_SIZE)
    }


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _env_ranks() -> Path | None:
    base = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    if not base or not (Path(base) / O200K_FILE).is_file():
        return None
    path = Path(base) / O200K_FILE
    if _sha256(path.read_bytes()) != O200K_SHA256:
        raise ReliefError(
            f"{path} (from $TIKTOKEN_ENCODINGS_BASE) is not the o200k_base ranks (sha256 differs); "
            "replace it with the real file or unset TIKTOKEN_ENCODINGS_BASE"
        )
    return path


def _wheel_ranks() -> bytes:
    # find_spec locates the package without importing it: bpe_openai's __init__ builds its
    # encoders, which costs seconds, and only its data file is wanted here.
    spec = importlib.util.find_spec("bpe_openai")
    gz = Path(spec.submodule_search_locations[0]) / "data" / f"{O200K_FILE}.gz" if spec else None
    if gz is None or not gz.is_file():
        raise ReliefError(
            f"the o200k_base ranks were found neither in $TIKTOKEN_ENCODINGS_BASE/{O200K_FILE} "
            "nor in the bpe-openai wheel; run `pip install bpe-openai` or point "
            "TIKTOKEN_ENCODINGS_BASE at a folder holding o200k_base.tiktoken"
        )
    data = gzip.decompress(gz.read_bytes())
    if _sha256(data) != O200K_SHA256:
        raise ReliefError(
            f"the {O200K_FILE}.gz shipped by bpe-openai is not the o200k_base ranks (sha256 "
            "differs); reinstall bpe-openai or set TIKTOKEN_ENCODINGS_BASE"
        )
    return data


def o200k_ranks_path() -> Path:
    """The uncompressed, sha256-checked `o200k_base.tiktoken`, from the env or the wheel."""
    env = _env_ranks()
    if env is not None:
        return env
    cached = cache_dir() / O200K_FILE
    if cached.is_file() and _sha256(cached.read_bytes()) == O200K_SHA256:
        return cached
    data = _wheel_ranks()
    with io.atomic_path(cached) as tmp:
        tmp.write_bytes(data)
    return cached


def load_ranks(path: Path) -> dict[bytes, int]:
    """Read a `.tiktoken` file: one `base64(token) rank` per line."""
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _derive_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """BPE merges equivalent to tiktoken's rank-ordered merging.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank; listing every
    split (left, right) of each token at that token's rank gives HF's BPE the same priority
    order. Same algorithm as transformers' TikTokenConverter, which needs tiktoken to read files.
    """
    merges = []
    for token, rank in ranks.items():
        splits = [
            (token[:i], token[i:])
            for i in range(1, len(token))
            if token[:i] in ranks and token[i:] in ranks
        ]
        splits.sort(key=lambda s: (ranks[s[0]], ranks[s[1]]))
        merges.extend((rank, left, right) for left, right in splits)
    merges.sort(key=lambda m: m[0])
    return [(left, right) for _, left, right in merges]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map that byte-level BPE vocabularies are written in.

    The same table as `transformers.convert_slow_tokenizer.bytes_to_unicode`; kept here so that
    building a tokenizer does not import transformers.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    table = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in table)
    table.update({b: chr(256 + n) for n, b in enumerate(shifted)})
    return table


def _build_tokenizer_json(ranks_path: Path, out: Path) -> None:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    byte_encoder = _bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(byte_encoder[x] for x in b)

    ranks = load_ranks(ranks_path)
    if len(ranks) != NUM_BASE_TOKENS or sorted(ranks.values()) != list(range(NUM_BASE_TOKENS)):
        raise ReliefError(f"{ranks_path} does not hold ranks 0..{NUM_BASE_TOKENS - 1}; replace it")
    vocab = {to_str(t): r for t, r in ranks.items()}
    merges = [(to_str(a), to_str(b)) for a, b in _derive_merges(ranks)]
    # ignore_merges: a whole pre-token found in the vocab is one token, as in tiktoken.
    tok = Tokenizer(BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(O200K_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # Ids are assigned in order, so adding 199998..201087 in id order lands each at its real id.
    tok.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t in special_tokens().values()]
    )
    if tok.get_vocab_size() != VOCAB_SIZE or tok.token_to_id(EOS_TOKEN) != 200_002:
        raise RuntimeError("built tokenizer has the wrong vocabulary layout")
    tok.save(str(out))


def cached_tokenizer_json() -> Path:
    """Path of the built `tokenizer.json` in the cache, building it on first use."""
    ranks_path = o200k_ranks_path()
    key = f"o200k_harmony-{O200K_SHA256[:16]}-v{FORMAT_VERSION}"
    path = cache_dir() / key / "tokenizer.json"
    if not path.is_file():
        with io.atomic_path(path) as tmp:
            _build_tokenizer_json(ranks_path, tmp)
    return path


def _added_tokens_decoder() -> dict[str, dict]:
    entry = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    return {str(i): {"content": t, **entry, "special": True} for i, t in special_tokens().items()}


def tokenizer_config() -> dict:
    """The `tokenizer_config.json` of gpt-oss, less the chat template (kept in its own file)."""
    return {
        "added_tokens_decoder": _added_tokens_decoder(),
        "bos_token": BOS_TOKEN,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "extra_special_tokens": {},
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": PAD_TOKEN,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


# Harmony chat template, written for relief-mlx. For conversations without tools it renders
# exactly what openai-harmony (and `relief_mlx.data.harmony`) renders; tests check that token for
# token. Extra kwargs: `reasoning_effort` (low|medium|high, default medium), `model_identity`,
# `current_date` (YYYY-MM-DD, default today: pass it to reproduce training tokens).
# Assistant messages carry their analysis in `thinking`; it is rendered only for the last message
# of a training render (no generation prompt), as openai-harmony drops earlier analysis.
CHAT_TEMPLATE = r"""
{%- if model_identity is not defined -%}
  {%- set model_identity = "You are ChatGPT, a large language model trained by OpenAI." -%}
{%- endif -%}
{%- if reasoning_effort is not defined -%}{%- set reasoning_effort = "medium" -%}{%- endif -%}
{%- if current_date is not defined -%}
  {%- set current_date = strftime_now("%Y-%m-%d") -%}
{%- endif -%}
{%- if tools -%}
  {{- raise_exception("this gpt-oss chat template renders no tools; leave tools out") -}}
{%- endif -%}
<|start|>system<|message|>{{ model_identity }}
Knowledge cutoff: 2024-06
Current date: {{ current_date }}

Reasoning: {{ reasoning_effort }}

# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>
{%- if messages and messages[0].role in ["system", "developer"] -%}
  <|start|>developer<|message|># Instructions

{{ messages[0].content }}<|end|>
  {%- set messages = messages[1:] -%}
{%- endif -%}
{%- for message in messages -%}
  {%- if message.role == "user" -%}
    <|start|>user<|message|>{{ message.content }}<|end|>
  {%- elif message.role == "assistant" -%}
    {%- if loop.last and not add_generation_prompt -%}
      {%- if message.thinking -%}
        <|start|>assistant<|channel|>analysis<|message|>{{ message.thinking }}<|end|>
      {%- endif -%}
      <|start|>assistant<|channel|>final<|message|>{{ message.content }}<|return|>
    {%- else -%}
      <|start|>assistant<|channel|>final<|message|>{{ message.content }}<|end|>
    {%- endif -%}
  {%- else -%}
    {{- raise_exception("this chat template renders system (first), user and assistant "
                        + "messages, not " + message.role) -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}<|start|>assistant{%- endif -%}
"""


def chat_template() -> str:
    """The Harmony chat template written as `chat_template.jinja`."""
    return CHAT_TEMPLATE.lstrip("\n")


def write_tokenizer_files(out_dir: Path) -> None:
    """Write gpt-oss's tokenizer files into `out_dir` (created if missing), each atomically."""
    out_dir = Path(out_dir)
    src = cached_tokenizer_json()
    with io.atomic_path(out_dir / "tokenizer.json") as tmp:
        shutil.copyfile(src, tmp)
    io.write_json(out_dir / "tokenizer_config.json", tokenizer_config())
    io.write_json(
        out_dir / "special_tokens_map.json",
        {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN},
    )
    io.write_text(out_dir / "chat_template.jinja", chat_template())
