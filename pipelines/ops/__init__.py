"""Ray workers that stages and commands share: scoring, retrieval, re-ranking, prompt selection."""
