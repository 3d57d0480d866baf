"""Command-line choices as enums that say what is allowed when given something else.

>>> class Colour(Choice):
...     __flag__ = "--colour"
...     RED = "red"
>>> Colour.parse("blue")
ValueError: --colour must be one of red, got 'blue'
"""

from __future__ import annotations

import enum


class Choice(str, enum.Enum):
    """Subclasses list their values and set ``__flag__`` to the flag that takes them."""

    @classmethod
    def parse(cls, value):
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(choice.value for choice in cls)
            raise ValueError(f"{cls.__flag__} must be one of {allowed}, got {value!r}") from None
