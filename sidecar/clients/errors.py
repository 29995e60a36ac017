"""The client boundary's exceptions."""


class FetchError(Exception):
    """A JWKS or discovery document could not be fetched."""
