"""Entrypoints for ``ray job submit`` and the ``binllm`` CLI: parse, connect, call stages."""
