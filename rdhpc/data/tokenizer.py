"""The tokenizer behind one small interface: HF `tokenizers` is the exact reference.

Two encoders give the same ids: HF `tokenizers` (the reference, always available) and `gigatoken`
(about 20x faster on these machines). `backend="auto"` takes gigatoken when it can read the
tokenizer and agrees with HF on a probe of awkward text at load time, else HF. The outcome of that
check is kept in rdhpc's cache folder (`RDHPC_CACHE_DIR`, else `~/.cache/rdhpc`), named by the
tokenizer file's sha256 and both libraries' versions, so later processes skip it and load HF only
when they decode.

Special tokens occupy the last 32 ids of the vocabulary, as in the released model (vocabulary
65536: <|begin_text|> = 65504 is BOS, <|end_text|> = 65505 EOS, <|end_turn|> = 65508, <|pad|> = 65509).
Special-token strings that appear inside a document are encoded as the text they are, never as
the special token: documents must round-trip exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from rdhpc.errors import UserError

NUM_SPECIAL_SLOTS = 32
NAMED_SPECIAL_TOKENS = ["<|begin_text|>", "<|end_text|>", "<|begin_header|>", "<|end_header|>", "<|end_turn|>",
                        "<|pad|>"]
SPECIAL_TOKENS = NAMED_SPECIAL_TOKENS + [f"<|reserved_special_token_{i}|>"
                                         for i in range(NUM_SPECIAL_SLOTS - len(NAMED_SPECIAL_TOKENS))]
BOS, EOS, PAD, END_TURN = "<|begin_text|>", "<|end_text|>", "<|pad|>", "<|end_turn|>"
MAX_TOKEN_LENGTH = 32
# Pre-tokenizer split (the Qwen2 / Llama-3 family pattern): letters with one leading non-letter,
# EVERY DIGIT ON ITS OWN (the paper splits digits), punctuation runs, newlines, spaces. ByteLevel then
# maps bytes to symbols without a regex of its own. gigatoken recognises this exact pattern.
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
BACKENDS = ("auto", "hf", "gigatoken")
# Text on which the fast encoder must agree with HF before it is used.
_PROBE = ["", "plain text, digits 1234567890 and 3.14", "  indented  12\n\tx = 1_000\r\n", "日本語 中文 한국어 🙂👩‍👩‍👧",
          "control \x00\x1b[31m \x7f \u2028 \ufeff", "<|begin_text|> <|end_text|> <|pad|> stay text", "½ ² ٣ 〇"]


class TokenizerError(UserError, ValueError):
    pass


def tokenizer_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def cache_dir() -> Path:
    """Where rdhpc keeps what it can recompute: RDHPC_CACHE_DIR, else XDG_CACHE_HOME/rdhpc, else ~/.cache/rdhpc."""
    if os.environ.get("RDHPC_CACHE_DIR"):
        return Path(os.environ["RDHPC_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rdhpc"


class _EncoderCheck:
    """The outcome of checking the fast encoder against HF for one tokenizer file, kept on disk.

    Loading HF, re-writing the JSON without its added tokens and encoding the probe costs ~0.15 s,
    paid by every process of every prep run. The outcome is a pure function of the file's bytes,
    the two libraries' versions and the probe text, which together name the entry, so a stored
    outcome is as good as a fresh one. An unreadable or unwritable cache only costs that time."""

    def __init__(self, tokenizer_sha256: str):
        from importlib.metadata import PackageNotFoundError, version

        try:
            versions = f"gigatoken {version('gigatoken')}, tokenizers {version('tokenizers')}"
        except PackageNotFoundError:
            versions = "no gigatoken"
        key = hashlib.sha256(f"{tokenizer_sha256}\0{versions}\0{json.dumps(_PROBE)}".encode()).hexdigest()[:32]
        folder = cache_dir() / "encoder-checks"
        self.record_path, self.stripped_path = folder / f"{key}.json", folder / f"{key}.tokenizer.json"

    def load(self) -> tuple[dict, str | None] | None:
        """(the record, the stripped tokenizer JSON when the fast encoder passed), or None."""
        try:
            record = json.loads(self.record_path.read_text())
            stripped = self.stripped_path.read_text(encoding="utf-8") if record["fast_ok"] else None
            return record, stripped
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def store(self, record: dict, stripped: str | None) -> None:
        try:
            self.record_path.parent.mkdir(parents=True, exist_ok=True)
            for path, text in ((self.stripped_path, stripped), (self.record_path, json.dumps(record))):
                if text is not None:  # the record last: it is what load() looks for first
                    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
                    tmp.write_text(text, encoding="utf-8")
                    os.replace(tmp, path)
        except OSError:
            pass


class TextTokenizer:
    """Encode documents to token ids and back. `backend` names the encoder; "hf" is the reference
    and every other backend must give identical ids (tests check it on varied text)."""

    def __init__(self, path: str | Path, backend: str = "auto"):
        self.path = Path(path)
        if not self.path.is_file():
            raise TokenizerError(f"{self.path}: tokenizer file not found")
        if backend not in BACKENDS:
            raise TokenizerError(f"unknown tokenizer backend {backend!r}; choose one of {list(BACKENDS)}")
        self.sha256 = tokenizer_sha256(self.path)
        self._hf_tokenizer = None
        self.backend, self.fallback_reason = "hf", None
        self._fast = None
        check = _EncoderCheck(self.sha256) if backend != "hf" else None
        stored = check.load() if check else None
        if stored is not None:  # HF is loaded later, only if something needs it (decoding)
            record, stripped = stored
            self.vocab_size, ids = record["vocab_size"], record["ids"]
            self.fallback_reason = record["fallback_reason"]
            if stripped is not None:
                import gigatoken

                self._fast = gigatoken.Tokenizer.from_json(stripped)
        else:
            ids = self._read_with_hf()
            if check is not None:
                self._fast, stripped, self.fallback_reason = self._load_gigatoken()
                check.store({"vocab_size": self.vocab_size, "ids": ids, "fast_ok": self._fast is not None,
                             "fallback_reason": self.fallback_reason}, stripped)
        self.bos_id, self.eos_id, self.pad_id, self.end_turn_id = ids[BOS], ids[EOS], ids[PAD], ids[END_TURN]
        if self._fast is not None:
            self.backend = "gigatoken"
        elif backend == "gigatoken":
            raise TokenizerError(f"{self.path}: the gigatoken backend cannot be used: {self.fallback_reason}")

    @property
    def _hf(self):
        """The HF tokenizer, the reference: loaded on first use."""
        if self._hf_tokenizer is None:
            from tokenizers import Tokenizer

            try:
                hf = Tokenizer.from_file(str(self.path))
            except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
                raise TokenizerError(f"{self.path}: not a tokenizers JSON file ({exc})") from None
            # Special-token strings inside documents stay text.
            hf.encode_special_tokens = True
            self._hf_tokenizer = hf
        return self._hf_tokenizer

    def _read_with_hf(self) -> dict[str, int]:
        """Vocabulary size and special-token ids, from HF; a tokenizer without them is refused."""
        self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
        ids = {name: self._hf.token_to_id(name) for name in (BOS, EOS, PAD, END_TURN)}
        missing = [name for name, i in ids.items() if i is None]
        if missing:
            raise TokenizerError(f"{self.path}: lacks the special tokens {missing} (train it with `rdhpc prep tokenizer`)")
        return ids

    def _load_gigatoken(self):
        """(gigatoken with the added tokens removed from its copy of the JSON, so special-token
        strings in a document are plain text as HF does with encode_special_tokens; that copy;
        None) when it agrees with HF on the probe, else (None, None, why not)."""
        try:
            import gigatoken
        except ImportError:
            return None, None, "gigatoken is not installed"
        config = json.loads(self.path.read_text(encoding="utf-8"))
        config["added_tokens"] = []
        stripped = json.dumps(config)
        try:
            fast = gigatoken.Tokenizer.from_json(stripped)
        except Exception as exc:  # e.g. a pre-tokenizer it does not support
            return None, None, f"gigatoken cannot read it ({exc})"
        if _flat_to_list(*_gigatoken_flat(fast, _PROBE)) != _flat_to_list(*self._hf_encode_flat(_PROBE)):
            return None, None, "gigatoken disagrees with HF tokenizers on the probe text"
        return fast, stripped, None

    def _hf_encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        encodings = self._hf.encode_batch_fast(texts, add_special_tokens=False)
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
        offsets = np.zeros(len(encodings) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = np.fromiter((i for e in encodings for i in e.ids), dtype=np.uint32, count=int(offsets[-1]))
        return values, offsets

    def encode_batch_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """All ids of all texts in one uint32 array, and offsets (len(texts) + 1): text i is
        values[offsets[i]:offsets[i + 1]]. No BOS/EOS (packing adds them)."""
        if self._fast is not None:
            return _gigatoken_flat(self._fast, texts)
        return self._hf_encode_flat(texts)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        values, offsets = self.encode_batch_flat(texts)
        return [values[offsets[i]:offsets[i + 1]] for i in range(len(texts))]

    def encode(self, text: str) -> np.ndarray:
        return self.encode_batch([text])[0]

    def decode(self, ids) -> str:
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_strings(self, ids) -> list[str]:
        return [self._hf.id_to_token(int(i)) for i in ids]


def _gigatoken_flat(fast, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    layout = fast.encode_batch(texts).layout
    offsets = np.asarray(layout.offsets, dtype=np.int64)
    values = np.asarray(layout.content.data, dtype=np.uint32)[offsets[0]:offsets[-1]]
    return values, offsets - offsets[0]


def _flat_to_list(values: np.ndarray, offsets: np.ndarray) -> list[list[int]]:
    return [values[offsets[i]:offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]
