"""Shared plumbing every wing imports downward: errors, storage, model sources, data formats, batching,
forward and log-probs, tracking, manifests. Imports nothing from the wings."""
