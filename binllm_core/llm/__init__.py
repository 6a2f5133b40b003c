"""The LLM recommender: backbone files and tokenizer, loading, objectives, batches, prefix sharing,
soft tokens, scoring, tuning and its strategies."""
