"""Orchestration: pipeline, key store, reloads, certificate renewal, policy subscription, explain, audit, metrics."""
