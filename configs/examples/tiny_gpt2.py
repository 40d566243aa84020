"""Write a tiny randomly initialized GPT-2 folder (config.json + safetensors), as a stand-in for a downloaded one.

    .venv/bin/python configs/examples/tiny_gpt2.py runs/tiny-gpt2 4096
    .venv/bin/shardforge finetune -c configs/gpt2.yaml

The vocabulary size must be the dataset's (4096 for the quickstart data). Nothing is downloaded.
"""

import sys

import torch
from transformers import GPT2Config, GPT2LMHeadModel

out, vocab = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
config = GPT2Config(
    vocab_size=vocab, n_positions=256, n_embd=128, n_layer=2, n_head=4, n_inner=512, bos_token_id=1, eos_token_id=2
)  # the ids of Shardforge's SentencePiece tokenizers
GPT2LMHeadModel(config).save_pretrained(out)
print(f"wrote a GPT-2 ({config.n_layer} layers, hidden {config.n_embd}, vocabulary {vocab}) to {out}")
