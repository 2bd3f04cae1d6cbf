"""The tokenizer behind one small interface: HF `tokenizers` is the exact reference.

Special tokens occupy the last 32 ids of the vocabulary, as in the released model (vocabulary
65536: <|begin_text|> = 65504 is BOS, <|end_text|> = 65505 EOS, <|end_turn|> = 65508, <|pad|> = 65509).
Special-token strings that appear inside a document are encoded as the text they are, never as
the special token: documents must round-trip exactly.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

NUM_SPECIAL_SLOTS = 32
NAMED_SPECIAL_TOKENS = ["<|begin_text|>", "<|end_text|>", "<|begin_header|>", "<|end_header|>", "<|end_turn|>",
                        "<|pad|>"]
SPECIAL_TOKENS = NAMED_SPECIAL_TOKENS + [f"<|reserved_special_token_{i}|>"
                                         for i in range(NUM_SPECIAL_SLOTS - len(NAMED_SPECIAL_TOKENS))]
BOS, EOS, PAD, END_TURN = "<|begin_text|>", "<|end_text|>", "<|pad|>", "<|end_turn|>"
MAX_TOKEN_LENGTH = 32


class TokenizerError(ValueError):
    pass


def tokenizer_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class TextTokenizer:
    """Encode documents to token ids and back. `backend` names the encoder; "hf" is the reference
    and every other backend must give identical ids (tests check it on varied text)."""

    def __init__(self, path: str | Path, backend: str = "hf"):
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
        self.backend = backend
        self._encode_batch = self._hf_encode_batch
        if backend != "hf":
            raise TokenizerError(f"unknown tokenizer backend {backend!r}; choose 'hf'")

    def _hf_encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.uint32) for e in self._hf.encode_batch(texts, add_special_tokens=False)]

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each text, without BOS/EOS (packing adds them)."""
        return self._encode_batch(texts)

    def encode(self, text: str) -> np.ndarray:
        return self.encode_batch([text])[0]

    def decode(self, ids) -> str:
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_strings(self, ids) -> list[str]:
        return [self._hf.id_to_token(int(i)) for i in ids]
