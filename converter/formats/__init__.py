"""Input formats: one reader per format, each yielding tensors under canonical slim names."""
