"""`rdhpc prep tokenizer`: train the byte-level BPE tokenizer of the paper with HF tokenizers.

    rdhpc prep tokenizer --input data/ --vocab-size 65536 --out tokenizer.json --sample-bytes 2e9

Byte-level BPE with digits split into single tokens (rdhpc.data.tokenizer.SPLIT_PATTERN) and tokens
of at most 32 characters; the 32
special tokens take the last 32 ids (for 65536: <|begin_text|> 65504, <|end_text|> 65505,
<|end_turn|> 65508, <|pad|> 65509), as in the released tokenizer. Training reads a bounded,
seeded sample of the documents (each document is taken with probability sample_bytes / input bytes).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from data_prep.packing import document_keys, unit_interval
from data_prep.sources import InputError, parse_sources, plan_pieces, read_piece
from rdhpc.data.tokenizer import MAX_TOKEN_LENGTH, NUM_SPECIAL_SLOTS, SPECIAL_TOKENS, SPLIT_PATTERN, TextTokenizer


def sample_documents(inputs: list[str], sample_bytes: int, seed: int, text_field: str, stats: dict):
    sources = parse_sources(inputs)
    total = sum(os.path.getsize(f) for s in sources for f in s.files)
    probability = min(1.0, sample_bytes / max(total, 1))
    taken = 0
    for piece in plan_pieces(sources, 64 << 20):
        result = read_piece(piece, text_field)
        stats["skipped"] = stats.get("skipped", 0) + len(result.problems)
        source = sources[piece.source]
        keys = document_keys(seed, source.name, source.key_names[piece.file], np.asarray(result.records, dtype=np.uint64))
        for text, u in zip(result.texts, unit_interval(keys)):
            if u < probability:
                taken += len(text.encode("utf-8"))
                stats["documents"] = stats.get("documents", 0) + 1
                stats["bytes"] = taken
                yield text
                if taken >= sample_bytes:
                    return


def train_tokenizer(inputs: list[str], vocab_size: int, out: str | Path, sample_bytes: int = 1 << 30,
                    seed: int = 0, text_field: str = "text", min_frequency: int = 2, log=print) -> TextTokenizer:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size <= 256 + NUM_SPECIAL_SLOTS:
        raise InputError(f"--vocab-size {vocab_size}: must exceed 256 bytes + {NUM_SPECIAL_SLOTS} special tokens")
    out = Path(out)
    if out.is_dir():
        raise InputError(f"--out {out}: is a folder; give the tokenizer file to write, e.g. {out / 'tokenizer.json'}")
    tokenizer = Tokenizer(models.BPE())
    # No normalizer: every document must round-trip byte for byte.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),  # digits one by one
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - NUM_SPECIAL_SLOTS, min_frequency=min_frequency, special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), max_token_length=MAX_TOKEN_LENGTH,
        show_progress=False)
    stats = {}
    tokenizer.train_from_iterator(sample_documents(inputs, sample_bytes, seed, text_field, stats), trainer)
    learned = tokenizer.get_vocab_size()
    if learned < vocab_size - NUM_SPECIAL_SLOTS:
        raise InputError(f"the sample ({stats.get('bytes', 0):,} bytes) only supports {learned} BPE tokens, fewer "
                         f"than --vocab-size {vocab_size} - {NUM_SPECIAL_SLOTS} special; give more text or a smaller size")
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.is_dir():
        raise InputError(f"--out {out}: {tmp}, where it is written first, is a folder: move it away")
    tokenizer.save(str(tmp))
    os.replace(tmp, out)
    loaded = TextTokenizer(out)
    assert loaded.vocab_size == vocab_size and loaded.bos_id == vocab_size - NUM_SPECIAL_SLOTS
    log(f"[prep] tokenizer {out}: vocabulary {vocab_size} (BOS {loaded.bos_id}, EOS {loaded.eos_id}, "
        f"pad {loaded.pad_id}; encoder {loaded.backend}), "
        f"trained on {stats.get('documents', 0):,} documents / {stats.get('bytes', 0):,} bytes"
        + (f", {stats['skipped']} malformed records skipped" if stats.get("skipped") else ""))
    return loaded
