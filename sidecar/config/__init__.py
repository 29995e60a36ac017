"""The sidecar config schema: the versioned contract between the operator and the agent."""
