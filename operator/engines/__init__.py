"""Operator orchestration: CA keeper, issuance, token reviews, policy hub, status reports, leader election, metrics."""
