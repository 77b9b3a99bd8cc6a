"""What is built on the losses: the memory bank (xbm), the losses across processes (distributed), gradient
caching (cached), exact retrieval metrics (retrieval, with _topk and _duplicates) and the sentence-transformers
losses (sentence_transformers, imported only on demand)."""
