"""binllm_core: the BinLLM method as plain functions and torch modules (no Ray here). See
docs/ARCHITECTURE.md for its rooms."""
