"""Thin Kopf handlers: parse the object, call a pure function, apply the result through a client."""
