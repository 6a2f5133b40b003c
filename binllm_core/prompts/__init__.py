"""Prompts in words (torch-free): templates, rendering, user pairs, auxiliary rows, token lengths,
truncation."""
