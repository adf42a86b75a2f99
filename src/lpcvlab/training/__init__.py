"""Lightning fine-tuning for Track 2."""
