"""The tokenizer behind one small interface: HF `tokenizers` is the exact reference.

Two encoders give the same ids: HF `tokenizers` (the reference, always available) and `gigatoken`
(about 20x faster on these machines). `backend="auto"` takes gigatoken when it can read the
tokenizer and agrees with HF on a probe of awkward text at load time, else HF.

Special tokens occupy the last 32 ids of the vocabulary, as in the released model (vocabulary
65536: <|begin_text|> = 65504 is BOS, <|end_text|> = 65505 EOS, <|end_turn|> = 65508, <|pad|> = 65509).
Special-token strings that appear inside a document are encoded as the text they are, never as
the special token: documents must round-trip exactly.
"""

from __future__ import annotations

import hashlib
import json
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


class TextTokenizer:
    """Encode documents to token ids and back. `backend` names the encoder; "hf" is the reference
    and every other backend must give identical ids (tests check it on varied text)."""

    def __init__(self, path: str | Path, backend: str = "auto"):
        from tokenizers import Tokenizer

        self.path = Path(path)
        if not self.path.is_file():
            raise TokenizerError(f"{self.path}: tokenizer file not found")
        try:
            self._hf = Tokenizer.from_file(str(self.path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
            raise TokenizerError(f"{self.path}: not a tokenizers JSON file ({exc})") from None
        # Special-token strings inside documents stay text.
        self._hf.encode_special_tokens = True
        self.sha256 = tokenizer_sha256(self.path)
        self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
        ids = {name: self._hf.token_to_id(name) for name in (BOS, EOS, PAD, END_TURN)}
        missing = [name for name, i in ids.items() if i is None]
        if missing:
            raise TokenizerError(f"{self.path}: lacks the special tokens {missing} (train it with `rdhpc prep tokenizer`)")
        self.bos_id, self.eos_id, self.pad_id, self.end_turn_id = ids[BOS], ids[EOS], ids[PAD], ids[END_TURN]
        if backend not in BACKENDS:
            raise TokenizerError(f"unknown tokenizer backend {backend!r}; choose one of {list(BACKENDS)}")
        self.backend, self.fallback_reason = "hf", None
        self._fast = None
        if backend in ("auto", "gigatoken"):
            self._fast, self.fallback_reason = self._load_gigatoken()
            if self._fast is not None:
                self.backend = "gigatoken"
            elif backend == "gigatoken":
                raise TokenizerError(f"{self.path}: the gigatoken backend cannot be used: {self.fallback_reason}")

    def _load_gigatoken(self):
        """gigatoken with the added tokens removed from its copy of the JSON, so special-token
        strings in a document are plain text, as HF does with encode_special_tokens."""
        try:
            import gigatoken
        except ImportError:
            return None, "gigatoken is not installed"
        config = json.loads(self.path.read_text(encoding="utf-8"))
        config["added_tokens"] = []
        try:
            fast = gigatoken.Tokenizer.from_json(json.dumps(config))
        except Exception as exc:  # e.g. a pre-tokenizer it does not support
            return None, f"gigatoken cannot read it ({exc})"
        if _flat_to_list(*_gigatoken_flat(fast, _PROBE)) != _flat_to_list(*self._hf_encode_flat(_PROBE)):
            return None, "gigatoken disagrees with HF tokenizers on the probe text"
        return fast, None

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
