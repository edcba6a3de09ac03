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


def tiny_distilbert(seed: int = 0):
    """A small DistilBertModel (no token types: ``input_ids, attention_mask``)."""
    import torch
    from transformers import DistilBertConfig, DistilBertModel

    torch.manual_seed(seed)
    cfg = DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64)
    return DistilBertModel(cfg).eval()


def tiny_gpt2(seed: int = 0):
    """A small GPT2Model without a KV cache (``use_cache=False``: the outputs are the hidden states)."""
    import torch
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64, use_cache=False)
    return GPT2Model(cfg).eval()


def tiny_vit(seed: int = 0):
    """A small ViTModel over 32x32 RGB images (patches of 8)."""
    import torch
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=64)
    return ViTModel(cfg, add_pooling_layer=False).eval()


def tiny_t5_encoder(seed: int = 0):
    """A small T5EncoderModel (relative-position attention buckets; ``input_ids, attention_mask``)."""
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                   relative_attention_num_buckets=8, relative_attention_max_distance=16)
    return T5EncoderModel(cfg).eval()


WHISPER_MEL_BINS, WHISPER_FRAMES = 16, 64  # input_features float32[batch, mel, 2*max_source_positions]


def tiny_whisper_encoder(seed: int = 0):
    """The encoder of a small WhisperModel (two strided convolutions over log-mel frames, then
    attention over ``max_source_positions`` positions): ``input_features`` in, hidden states out."""
    import torch
    from transformers import WhisperConfig, WhisperModel

    torch.manual_seed(seed)
    cfg = WhisperConfig(vocab_size=100, num_mel_bins=WHISPER_MEL_BINS, d_model=32, encoder_layers=2,
                        encoder_attention_heads=2, encoder_ffn_dim=64, decoder_layers=1,
                        decoder_attention_heads=2, decoder_ffn_dim=64,
                        max_source_positions=WHISPER_FRAMES // 2, max_target_positions=16,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=3)
    return WhisperModel(cfg).get_encoder().eval()


def tiny_resnet(seed: int = 0):
    """A small transformers ResNetForImageClassification (basic blocks, 16-128 channels, 10
    classes: ``logits``), BatchNorm statistics set by a few training-mode passes on
    standard-normal 64x64 images (random-init statistics give near-constant outputs)."""
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    cfg = ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                       layer_type="basic", num_labels=10)
    model = ResNetForImageClassification(cfg).train()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a cumulative average over the passes below
    with torch.no_grad():
        for step in range(4):
            model(pixel_values=torch.from_numpy(images(16, 100 + step)))
    return model.eval()


def blobs(batch: int, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """A learnable 10-class image task: a bright 8x5 patch at one of 2x5 places (the class) on noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, batch)
    x = rng.standard_normal((batch, 3, size, size)).astype(np.float32) * 0.5
    for i, label in enumerate(labels):
        row, col = divmod(int(label), 5)
        x[i, :, 4 + row * 14:12 + row * 14, 1 + col * 6:6 + col * 6] += 2.0
    return x, labels


def trained_resnet(steps: int = 120) -> tuple[object, float]:
    """:func:`tiny_resnet` trained on :func:`blobs` (about 6 s on 2 cores): a classifier whose
    answers are confident (top-2 logit margins of several units), unlike a random-init one whose
    logits sit in near ties. Returns the model and its accuracy on 256 held-out images."""
    import torch

    model = tiny_resnet().train()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 0.1
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for step in range(steps):
        x, y = blobs(32, 1000 + step)
        loss = torch.nn.functional.cross_entropy(model(pixel_values=torch.from_numpy(x)).logits, torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x, y = blobs(256, 2)
    with torch.no_grad():
        accuracy = float((model(pixel_values=torch.from_numpy(x)).logits.argmax(1).numpy() == y).mean())
    return model, accuracy


def images(batch: int, seed: int, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)
