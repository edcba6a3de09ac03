"""Builders of small random-init real models, reusable by other tests."""
from __future__ import annotations

import numpy as np


def tiny_bert(seed: int = 0):
    """A small BertModel in eval mode (random init, nothing downloaded)."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, type_vocab_size=2)
    return BertModel(cfg).eval()


def bert_feeds(batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Tokenizer-order feeds (input_ids, token_type_ids, attention_mask) with padding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 100, (batch, seq), dtype=np.int64)
    types = np.zeros((batch, seq), np.int64)
    types[:, seq // 2:] = 1
    mask = np.ones((batch, seq), np.int64)
    mask[0, seq - max(1, seq // 3):] = 0  # a padded row
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}
