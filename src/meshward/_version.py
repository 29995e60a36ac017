"""The one version string all three Meshward programs report."""

__version__ = "0.1.0.dev0"
