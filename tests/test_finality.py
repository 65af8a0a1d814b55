"""An answer called final is final: for every prefix of random texts that MatchFinal calls final, the text it grows
into has the same n-th regex match (span and groups) as Python's re finds in the prefix."""

import random
import re

import pytest

from evomerge.evaluate.finality import MatchFinal, Unsupported, settled

PATTERNS = [
    (r"#### (\-?[0-9\.\,]+)", 0),  # lm-eval gsm8k strict-match
    (r"The answer is (\-?[0-9\.\,]+).", 0),  # gsm8k-cot
    (r"(-?[$0-9.,]{2,})|(-?[0-9]+)", 0),
    (r"(-?[$0-9.,]{2,})|(-?[0-9]+)", 1),
    (r"([0-9])", 0),
    (r"(\d+)", 0),  # \d: Python's includes non-ASCII digits
    (r"(?i)answer: (\w+)", 0),
    (r"a|ab", 0),
    (r"x.y", 0),
    (r"[^#\n]+#", 0),
]
PIECES = ["#### ", "The answer is ", "answer: ", "ANSWER: ", "1", "2", "0", ".", ",", "-", "$", " ", "\n",
          "a", "b", "x", "y", "#", "٣", "é", "ab"]  # fmt: skip


def _key(m):
    return None if m is None else (m.span(), m.groups())


def _nth(regex, text, n):
    return next((m for k, m in enumerate(regex.finditer(text)) if k == n), None)


@pytest.mark.parametrize("pattern,nth", PATTERNS)
def test_a_match_called_final_is_the_match_of_every_longer_text(pattern, nth):
    final, regex, rng = MatchFinal(pattern, nth), re.compile(pattern), random.Random(0)
    called = 0
    for _ in range(400):
        whole = "".join(rng.choice(PIECES) for _ in range(rng.randrange(1, 16)))
        for end in range(len(whole) + 1):
            prefix = whole[:end]
            if final(prefix):
                called += 1
                assert _key(_nth(regex, whole, nth)) == _key(_nth(regex, prefix, nth)), (prefix, whole)
    assert called > 20  # the property was exercised, not vacuous


def test_the_common_answers_are_called_final_as_soon_as_they_are():
    strict = MatchFinal(r"#### (\-?[0-9\.\,]+)")
    assert not strict("so #### 12")  # "123" may follow
    assert not strict("so #### 12.")  # "12.5" may follow
    assert strict("so #### 12\n") and strict("so #### 12 and more")
    assert not strict("#### ")
    assert MatchFinal(r"([0-9])")("the 4")  # one digit is a whole match
    # \d matches Arabic-Indic digits in Python: a non-ASCII character keeps the answer open
    assert not MatchFinal(r"(\d+)")("12٣ and")
    assert MatchFinal(r"(\d+)")("12 and")


@pytest.mark.parametrize("pattern,nth", [(r"^(\d+)", 0), (r"(\d+)\b", 0), (r"(\d+)(?= )", 0), (r"(a)\1", 0),
                                         (r"(\d*)", 0), (r"(\d+)", -1)])  # fmt: skip
def test_patterns_whose_matches_need_the_whole_text_are_refused(pattern, nth):
    with pytest.raises(Unsupported):
        MatchFinal(pattern, nth)


def test_the_settled_part_leaves_out_a_possible_stop_string_and_a_partial_character():
    assert settled("#### 12\nQues", ["Question:"]) == "#### 12\n"
    assert settled("#### 12\nQuestion", ["Question:", "\n\n"]) == "#### 12\n"
    assert settled("#### 12\n", ["\n\n"]) == "#### 12"
    assert settled("#### 12 \ufffd", []) == "#### 12 "
    assert settled("#### 12 and", ["Question:"]) == "#### 12 and"
