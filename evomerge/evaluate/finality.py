"""When a generated answer is final: no further text can change what a regex extracts from it.

lm-eval's answer filters take a match of a regex in the generated text (gsm8k: the first match of
`#### (\\-?[0-9\\.\\,]+)`). A model that has written its answer and writes on until a stop string or the token
limit spends decode steps that cannot change its score; a search pays them on every item of every trial. This
module decides soundly when they cannot: the regex is compiled to a finite automaton (interegular) over the same
characters as Python's `re`, and the n-th match of `re.finditer` is final once every start up to it has read
text that no word of the regex's language continues. A start whose automaton died saw every match it will ever
have (there are no longer words to complete), so an extension of the text changes neither which start matches
first nor what the match at that start is.

Patterns whose matches can depend on text after them (anchors, `\\b`, lookaround, back-references) or that match
the empty string are refused (`Unsupported`): their answers are never called final, and generation runs as before.
"""

from __future__ import annotations

import re
from typing import Sequence

try:  # Python 3.11+
    from re import _constants as _sre  # type: ignore[attr-defined]
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _sre  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

# opcodes whose outcome can depend on characters after the match, or on groups: decided only with the whole text
_CONTEXT = {_sre.AT, _sre.ASSERT, _sre.ASSERT_NOT, _sre.GROUPREF, _sre.GROUPREF_EXISTS}
REPLACEMENT = "\ufffd"  # what a decoder shows for a character whose bytes are not all generated yet


class Unsupported(ValueError):
    """A regex whose matches in a growing text this module cannot call final."""


def _ops(node):
    """Every (opcode, argument) pair of a parsed pattern, nested ones (groups, repeats, classes) included."""
    for x in node:
        if isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], type(_sre.AT)):
            yield x
            x = x[1]
        if isinstance(x, (_sre_parse.SubPattern, list, tuple)):
            yield from _ops(x)


class MatchFinal:
    """Whether the `nth` match (0: the first) of `pattern` in a text, as `re.finditer` finds it, is final."""

    def __init__(self, pattern: str, nth: int = 0) -> None:
        import interegular

        if nth < 0:
            raise Unsupported(f"match {nth} counts from the end: it is known only when the text is")
        self.regex = re.compile(pattern)
        parsed = _sre_parse.parse(pattern)
        ops = list(_ops(parsed))
        if any(op in _CONTEXT for op, _ in ops):
            raise Unsupported(f"{pattern!r} has anchors, lookaround or back-references")
        # interegular's \d, \w, \s and case folding know ASCII only: past a non-ASCII character such a pattern's
        # automaton is not Python's, and a start that reads one is taken as open
        folds = parsed.state.flags & re.IGNORECASE or any(
            op is _sre.SUBPATTERN and arg[1] & re.IGNORECASE for op, arg in ops
        )
        self._ascii_only = bool(folds) or any(op is _sre.CATEGORY for op, _ in ops)
        try:
            fsm = interegular.parse_pattern(pattern).to_fsm()
        except Exception as e:  # interegular raises its own errors for what it does not implement
            raise Unsupported(f"{pattern!r}: {e}") from e
        if fsm.initial in fsm.finals:
            raise Unsupported(f"{pattern!r} matches the empty string")
        self.nth = nth
        self._alphabet, self._map, self._initial = fsm.alphabet, fsm.map, fsm.initial
        # states from which a final state can be reached (reading ≥ 0 more characters)
        into: dict[int, set[int]] = {}
        for state, moves in fsm.map.items():
            for target in moves.values():
                into.setdefault(target, set()).add(state)
        alive, todo = set(fsm.finals), list(fsm.finals)
        while todo:
            for state in into.get(todo.pop(), ()):
                if state not in alive:
                    alive.add(state)
                    todo.append(state)
        self._alive = alive
        # states from which a final state can be reached reading ≥ 1 more character: a word continues
        self._continues = {s for s in alive if any(t in alive for t in fsm.map.get(s, {}).values())}

    def _open(self, text: str, start: int) -> bool:
        """Whether some word of the pattern's language is longer than text[start:] and begins with it: only then
        can more text add a match starting at `start`."""
        state = self._initial
        for ch in text[start:]:
            if self._ascii_only and not ch.isascii():
                return True
            state = self._map.get(state, {}).get(self._alphabet[ch])
            if state is None or state not in self._alive:
                return False
        return state in self._continues

    def __call__(self, text: str) -> bool:
        scan = 0  # where finditer looks for the next match
        for k, match in enumerate(self.regex.finditer(text)):
            if any(self._open(text, s) for s in range(scan, match.start() + 1)):
                return False
            if k == self.nth:
                return True
            scan = match.end()
        return False


def settled(text: str, stop_strings: Sequence[str]) -> str:
    """The part of a growing text that its final version will begin with: without a trailing partial character
    and without a tail that may be the start of a stop string (where lm-eval's `until` could still cut it)."""
    text = text.rstrip(REPLACEMENT)
    cut = len(text)
    for s in stop_strings:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                cut = min(cut, len(text) - k)
                break
    return text[:cut]
