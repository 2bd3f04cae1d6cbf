"""The token data: shard format and manifest (format.py), tokenizer interface (tokenizer.py)."""
