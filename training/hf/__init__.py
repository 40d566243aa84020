"""Hugging Face interchange: Llama import and export (llama.py), GPT-2 import (gpt2.py), and the weights a run
starts from with model.init_from (init_from.py). Imports core, data_pipeline, training.model and
training.checkpoint."""
