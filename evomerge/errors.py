"""The user-facing error types, kept free of heavy imports so the command line can name them (and answer
`--help` or an argument error) without loading torch. Each one means "bad input": the CLI prints its
message on one line and exits with status 2."""

from __future__ import annotations

from typing import Any


class EvomergeError(ValueError):
    """Base of every error caused by what the user asked for (not by a bug)."""


class CheckpointError(EvomergeError):
    """A checkpoint cannot be read, or cannot be merged with the others. The message names the file and tensor."""


class RecipeError(EvomergeError):
    """A recipe file is malformed or asks for something evomerge or mergekit cannot do."""


class MethodError(EvomergeError):
    """A merge method or one of its parameters is unknown or out of range."""


class TaskError(EvomergeError):
    """A task file or spec is malformed."""


class HeldOutError(RuntimeError):
    """A held-out split was requested while a search is running."""


def one_line(error: BaseException) -> str:
    """The message of `error` on one line (pydantic and other libraries write several)."""
    return "; ".join(part.strip() for part in str(error).splitlines() if part.strip())


def validation_summary(error: Any) -> str:
    """A pydantic ValidationError as one line, `location: reason` per field. A value that failed every
    alternative of a union (pydantic reports one error per alternative) is named once, with what was given."""
    reasons: dict[str, str] = {}
    for err in error.errors():
        loc = []
        for part in err["loc"]:
            if isinstance(part, str) and ("[" in part or part in _UNION_TAGS):
                break  # the rest names one alternative of a union, not a place in the file
            loc.append(str(part))
        where = ".".join(loc)
        reason = err["msg"].removeprefix("Value error, ")
        if where in reasons and reasons[where] != reason:
            reason = f"{_short(err.get('input'))} is not a valid value here"
        reasons[where] = reason
    return "; ".join(f"{where}: {reason}" if where else reason for where, reason in reasons.items())


_UNION_TAGS = ("bool", "int", "float", "str", "list", "dict", "none")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
