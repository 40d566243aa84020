"""LSTM and GRU language models: the simplest baselines, data-parallel only (ZeRO through DeepSpeed).

Built as the same kind of layer list as the GPT (embedding, recurrent core, head) so the trainer, checkpoints and
DeepSpeed wrapping treat both alike. Shapes: tokens (B, S) -> [B, S, H] -> logits [S, B, V] (like the GPT's).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from core.config import ModelConfig
from core.prompt_tokens import trained
from training.model.gpt import padded_vocab


class RNNEmbedding(nn.Module):
    def __init__(self, m: ModelConfig, vocab: int):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, m.hidden_size)
        self.dropout = nn.Dropout(m.dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.word_embeddings(tokens))


class RNNCore(nn.Module):
    def __init__(self, m: ModelConfig):
        super().__init__()
        cls = nn.LSTM if m.arch == "lstm" else nn.GRU
        self.rnn = cls(
            m.hidden_size,
            m.hidden_size,
            num_layers=m.num_layers,
            batch_first=True,
            dropout=m.dropout if m.num_layers > 1 else 0.0,
        )
        self.norm = nn.LayerNorm(m.hidden_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(h)
        return self.norm(out)


class RNNHead(nn.Module):
    def __init__(self, m: ModelConfig, vocab: int):
        super().__init__()
        self.output_layer = nn.Linear(m.hidden_size, vocab, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.output_layer(h).transpose(0, 1)  # [S, B, V], as the GPT head returns


def rnn_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; logits [S, B, V], labels (B, S)."""
    flat = labels.transpose(0, 1).reshape(-1)
    flat = torch.where(trained(flat), flat, -100)  # prompt tokens of fine-tuning data are not trained
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), flat, ignore_index=-100)


def rnn_layer_specs(m: ModelConfig, vocab_size: int) -> list[tuple[type, tuple]]:
    vocab = padded_vocab(vocab_size)
    return [(RNNEmbedding, (m, vocab)), (RNNCore, (m,)), (RNNHead, (m, vocab))]
