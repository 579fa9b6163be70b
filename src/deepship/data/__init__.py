"""Data layer: read sources, split, and turn samples into model inputs (image or text)."""
