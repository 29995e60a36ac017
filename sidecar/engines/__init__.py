"""Orchestration: the decision pipeline, key store, config reloads, audit and metrics."""
