"""Validation: the PyTorch reference model of a sliced checkpoint, perplexity, and runners for each artifact."""
