"""The operator's admission webhooks: sidecar injection and validation of Meshward objects (HTTPS)."""
