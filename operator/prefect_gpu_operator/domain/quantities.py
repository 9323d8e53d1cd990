"""Kubernetes resource quantities as whole device counts."""

from __future__ import annotations

import re
from decimal import Decimal

__all__ = ["QuantityError", "parse_quantity"]


class QuantityError(ValueError):
    """A resource quantity that is not a whole, non-negative number."""


_QUANTITY = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+))(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?\d+)?$")
# Suffix → power of ten (SI) or of two (binary).
_DECIMAL_SUFFIXES = dict(zip("numkMGTPE", (-9, -6, -3, 3, 6, 9, 12, 15, 18), strict=True)) | {"": 0}
_BINARY_SUFFIXES = {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}


def parse_quantity(quantity: str) -> int:
    """A Kubernetes quantity as a whole count: "4" → 4, "1k" → 1000, "2000m" → 2.

    Extended resources such as GPUs are whole devices, so "500m" or "1.5" is an error, as is a
    negative count.
    """
    if quantity.isdigit():  # the usual case ("4"): skip the general parser
        return int(quantity)
    match = _QUANTITY.match(quantity.strip())
    if match is None:
        raise QuantityError(f"{quantity!r} is not a Kubernetes quantity")
    number, suffix = match.group(1), match.group(2) or ""
    value = Decimal(number)  # the regex admits only valid decimals
    if suffix in _BINARY_SUFFIXES:
        value *= 2 ** _BINARY_SUFFIXES[suffix]
    elif suffix[:1] in ("e", "E"):
        value = value.scaleb(int(suffix[1:]))
    else:
        value = value.scaleb(_DECIMAL_SUFFIXES[suffix])
    if value != value.to_integral_value():
        raise QuantityError(f"{quantity!r} is fractional; GPUs are counted in whole devices")
    if value < 0:
        raise QuantityError(f"{quantity!r} is negative")
    return int(value)
