"""Measurement: bits per byte, tokenizer statistics, comparison reports."""
