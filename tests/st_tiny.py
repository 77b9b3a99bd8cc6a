"""A tiny SentenceTransformer built inside the tests, with no download: a random 2-layer BERT, a vocabulary made
here, and a labelled toy corpus (four topics) for it."""
from __future__ import annotations

import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing below may reach a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TOPICS = {
    "animals": "cat dog horse bird fish cow sheep goat mouse lion".split(),
    "colours": "red blue green yellow black white purple orange pink grey".split(),
    "food": "bread cheese apple rice soup cake milk egg pasta salad".split(),
    "weather": "rain snow wind storm cloud sun fog frost thunder heat".split(),
}
FILLER = "the a of and is was very some".split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def corpus(per_topic: int, seed: int = 0):
    """(texts, labels): `per_topic` sentences of 3-6 topic words with filler, label = the topic's index."""
    rng = random.Random(seed)
    texts, labels = [], []
    for label, words in enumerate(TOPICS.values()):
        for _ in range(per_topic):
            sentence = rng.sample(words, rng.randint(3, 6)) + rng.sample(FILLER, 2)
            rng.shuffle(sentence)
            texts.append(" ".join(sentence))
            labels.append(label)
    return texts, labels


def tiny_model(path, seed: int = 0, dropout: float = 0.1, max_seq_length: int = 16):
    """A SentenceTransformer (Transformer + mean Pooling) over a random BERT with hidden size 32, saved to and
    loaded from `path`. transformers 5 ignores a tokenizer's `vocab_file=`, so the vocabulary is passed itself."""
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    try:
        from sentence_transformers.base.modules import Transformer
        from sentence_transformers.sentence_transformer.modules import Pooling
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Pooling, Transformer

    words = sorted({w for ws in TOPICS.values() for w in ws} | set(FILLER))
    vocab = {token: i for i, token in enumerate(SPECIAL + words)}
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout)
    BertModel(config).save_pretrained(str(path))
    BertTokenizerFast(vocab=vocab).save_pretrained(str(path))
    transformer = Transformer(str(path), max_seq_length=max_seq_length)
    pooling = Pooling(transformer.get_embedding_dimension(), "mean")
    return SentenceTransformer(modules=[transformer, pooling], device="cpu")


def features(model, texts):
    """The model's input features for `texts`, as the trainer's collator gives them."""
    prep = getattr(model, "preprocess", None) or model.tokenize
    return dict(prep(texts))
