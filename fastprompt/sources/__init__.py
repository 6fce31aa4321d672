"""Prompt sources: where a prompted ViT's prompt tokens come from (PGN generators live here)."""
