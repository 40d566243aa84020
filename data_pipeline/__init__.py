"""Raw text to verified webdataset shards, and the resumable loader that streams them.

Modules: ``ingest`` (inputs to documents), ``filters`` (clean, filter, dedup), ``split`` (content-hash splits),
``tokenizer`` (SentencePiece), ``pack`` (tokenize in workers, pack, write shards), ``manifest`` (counts and
hashes), ``prepare`` (the whole pipeline, atomically), ``loader`` and ``batching`` (streaming for training).
May import: ``launcher.config`` and ``launcher.errors`` only.
"""
