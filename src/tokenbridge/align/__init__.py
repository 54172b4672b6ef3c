"""Vocabulary alignment: every token as exact bytes, and the match between two vocabularies."""
