"""The Meshward API: CRD schemas, pure data (the single source of truth for crds/)."""
