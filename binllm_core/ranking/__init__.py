"""Top-K lists: Hamming retrieval, ranking metrics, the evaluated lists."""
