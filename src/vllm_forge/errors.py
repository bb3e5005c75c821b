"""The one error type of vllm-forge: a message naming the thing, and what to do next."""

from __future__ import annotations


class ForgeError(Exception):
    """A refusal: printed as one line on stderr, exit status 2."""

    def __init__(self, what: str, hint: str = "") -> None:
        self.what = what
        self.hint = hint
        super().__init__(f"{what}" + (f" -- {hint}" if hint else ""))
