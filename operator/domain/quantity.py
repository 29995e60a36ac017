"""Kubernetes resource quantities ("50m", "64Mi", "1.5", "1e3"), parsed exactly, for the sidecar-resource annotations.

Why our own: the injector refuses a malformed or absurd sidecar request or limit with the annotation's name and the
fix, before the API server refuses the pod with a message about containers the app team never wrote (or accepts
"64", which is 64 bytes, and the sidecar is OOM-killed at its start). Exact (Fraction), as the API server compares
them. The grammar is apimachinery's (k8s.io/apimachinery/pkg/api/resource, quantity.go):
    <quantity> ::= <signedNumber><suffix>
    <suffix>   ::= Ki | Mi | Gi | Ti | Pi | Ei  |  m | "" | k | M | G | T | P | E  |  e<signedNumber> | E<signedNumber>
"""

from __future__ import annotations

import re
from fractions import Fraction

_QUANTITY = re.compile(r"([+-]?)([0-9]+(?:\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+|[KMGTPE]i|[mkMGTPE])?")
_SUFFIXES = {"": Fraction(1), "m": Fraction(1, 1000), "k": Fraction(10**3), "M": Fraction(10**6),
             "G": Fraction(10**9), "T": Fraction(10**12), "P": Fraction(10**15), "E": Fraction(10**18),
             "Ki": Fraction(2**10), "Mi": Fraction(2**20), "Gi": Fraction(2**30), "Ti": Fraction(2**40),
             "Pi": Fraction(2**50), "Ei": Fraction(2**60)}
# Decimal exponents beyond E's (10^18) and m's (10^-3) name no CPU or memory amount; refusing them also keeps
# "1e999999999" from computing a number of a billion digits.
_EXPONENTS = range(-3, 19)


class QuantityError(ValueError):
    """Not a Kubernetes quantity, or a negative one; the message says what is wrong."""


def parse_quantity(text: str) -> Fraction:
    """The amount `text` names (cores or bytes), exactly; raise QuantityError for anything else."""
    m = _QUANTITY.fullmatch(text)
    if m is None:
        raise QuantityError(f"{text!r} is not a Kubernetes quantity (a number and a suffix such as m, Mi or Gi)")
    sign, number, suffix = m.group(1), m.group(2), m.group(3) or ""
    if suffix[:1] in ("e", "E") and len(suffix) > 1:
        exponent = int(suffix[1:]) if len(suffix) <= 6 else _EXPONENTS.stop  # no int() of a thousand digits
        if exponent not in _EXPONENTS:
            raise QuantityError(f"{text!r}: the exponent is out of range "
                                f"({_EXPONENTS.start} to {_EXPONENTS.stop - 1})")
        scale = Fraction(10) ** exponent
    else:
        scale = _SUFFIXES[suffix]
    amount = Fraction(number if not number.endswith(".") else number[:-1]) * scale
    if sign == "-" and amount:
        raise QuantityError(f"{text!r} is negative")
    return amount
