"""What runs after training: KV-cache decoding (decode.py), evaluation (evaluate.py), the lm-eval adapter
(harness.py), int8 quantization and pruning (compress.py). Imports core, data_pipeline, training.model and
training.checkpoint."""
