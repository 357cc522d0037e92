"""Pieces of the distributed trainer: the DeepSpeed config, the embedded default, the per-worker loop."""
