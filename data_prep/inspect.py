"""`rdhpc prep verify DIR` and `rdhpc prep inspect DIR --rows N`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rdhpc.data.format import ShardError, open_shard, read_manifest, verify_folder


def verify(folder: str | Path, checksums: bool = True, log=print) -> int:
    manifest, problems = verify_folder(folder, checksums=checksums)
    for problem in problems:
        log(f"[verify] {problem}")
    train, val = manifest.totals("train"), manifest.totals("val")
    if problems:
        log(f"[verify] {folder}: {len(problems)} problem(s)")
        return 1
    log(f"[verify] {folder}: OK - {len(manifest.shards)} shards, format v{manifest.format_version}, seq_len "
        f"{manifest.seq_len}, {manifest.dtype}, pack {manifest.pack}; train {train['rows']} rows "
        f"{train['real_tokens']:,} tokens, val {val['rows']} rows {val['real_tokens']:,} tokens"
        + ("; checksums match" if checksums else ""))
    return 0


def inspect(folder: str | Path, rows: int = 3, split: str = "train", log=print) -> int:
    from rdhpc.data.tokenizer import TextTokenizer

    folder = Path(folder)
    manifest = read_manifest(folder)
    shards = manifest.split_shards(split)
    if not shards:
        raise ShardError(f"{folder}: no {split} shards")
    tokenizer = None
    if Path(manifest.tokenizer.path).is_file():
        tokenizer = TextTokenizer(manifest.tokenizer.path)
        if tokenizer.sha256 != manifest.tokenizer.sha256:
            log(f"[inspect] {manifest.tokenizer.path} changed since the shards were made: showing ids only")
            tokenizer = None
    vocab = manifest.tokenizer.vocab_size
    reader = open_shard(folder, shards[0], manifest)
    for index in range(min(rows, len(reader))):
        row = reader.row(index)
        if int(row.max()) >= vocab:
            raise ShardError(f"{reader.path}: row {index} holds token id {int(row.max())}, beyond the vocabulary of "
                             f"{vocab}: a corrupted or foreign shard (`rdhpc prep verify` checks every row)")
        log(f"--- {shards[0].file} row {index}: {len(row)} tokens, {int((row == manifest.tokenizer.bos_id).sum())} "
            f"document start(s), {int((row == manifest.tokenizer.pad_id).sum())} pad")
        log(tokenizer.decode(row) if tokenizer else " ".join(map(str, row[:200])))
    counts = np.zeros(vocab, dtype=np.int64)
    for entry in shards:
        tokens = open_shard(folder, entry, manifest).all_rows().reshape(-1)
        if tokens.size and int(tokens.max()) >= vocab:
            raise ShardError(f"{folder / entry.file}: holds token id {int(tokens.max())}, beyond the vocabulary of "
                             f"{vocab}: a corrupted or foreign shard")
        counts += np.bincount(tokens.astype(np.int64), minlength=vocab)
    used = int((counts > 0).sum())
    log(f"--- token histogram over {split}: {used} of {manifest.tokenizer.vocab_size} ids used; most frequent:")
    for token in np.argsort(-counts)[:10]:
        shown = repr(tokenizer.token_strings([token])[0]) if tokenizer else ""
        log(f"  {int(token):6d} {shown:24s} {int(counts[token]):,}")
    return 0
