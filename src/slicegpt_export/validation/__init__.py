"""Validation: runners for each artifact, perplexity and agreement with the reference, the report."""
