"""Data: loaders for the bundled data sets and deterministic, resumable batching."""
