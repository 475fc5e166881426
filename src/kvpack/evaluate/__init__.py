"""Evaluation: perplexity, results files and tables."""
