"""Operator orchestration: certificate issuance and, later, policy compilation and distribution."""
