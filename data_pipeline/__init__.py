"""Raw text to verified webdataset shards, and the resumable loader that streams them.

Modules: ``ingest`` (inputs to documents), ``filters`` (clean, filter, MinHash signatures), ``dedup`` (exact and
near duplicates over tasks), ``stages`` (the tasks of a preparation, for one machine and Slurm alike), ``split``
(content-hash splits), ``tokenizer`` (SentencePiece), ``pack`` (the encoder pool, packing, shard writing),
``manifest`` (the one owner of manifest.json: write, read, verify), ``prepare`` (the whole pipeline, atomically),
``sft`` (fine-tuning data), ``slurm_stages`` (the stages of ``data prepare --slurm``), ``sample_stream`` and
``batch_loader`` (the loader pair: random access into a split's global sample order, and per-rank batches for
training). May import: ``core`` only.
"""
