"""The only operator code that talks to the Kubernetes API."""
