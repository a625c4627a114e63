"""Offline data preparation: raw files -> deterministic WebDataset shards + manifest."""
