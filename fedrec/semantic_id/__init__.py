"""Semantic IDs: item content embeddings → RQ-VAE codes → generative retrieval over codes."""
