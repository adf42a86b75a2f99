"""Data readers, writers and generators for both tracks (one module per format)."""
