"""Backbone adapters: what fastprompt knows about each model family's internals (timm ViT)."""
