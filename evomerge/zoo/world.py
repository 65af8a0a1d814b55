"""The synthetic world of the demo zoo: two "languages" and the tasks written in them.

Language A is lowercase English-like text. Language B is the same grammar and vocabulary pushed through a
fixed letter cipher into uppercase letters: new tokens, same meaning, digits shared. This mirrors the
evolutionary-merging setup (a Japanese LM + English math LMs → Japanese math): the composed task,
arithmetic asked in language B, needs both the math expert's skill and the language-B expert's reading.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

ANIMALS = [
    "cat",
    "dog",
    "cow",
    "fox",
    "owl",
    "bee",
    "rat",
    "pig",
    "hen",
    "eel",
    "ant",
    "yak",
    "elk",
    "emu",
    "bat",
    "ram",
]
FOODS = [
    "fish",
    "bone",
    "grass",
    "mice",
    "moth",
    "honey",
    "cheese",
    "corn",
    "seed",
    "worm",
    "leaf",
    "moss",
    "hay",
    "bug",
    "fruit",
    "root",
]
PLACES = [
    "barn",
    "den",
    "field",
    "tree",
    "hive",
    "hole",
    "pen",
    "sea",
    "lake",
    "cave",
    "hill",
    "nest",
    "farm",
    "wood",
    "sky",
    "yard",
]
OPS = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "max": max, "min": min}
MAX_OPERAND = 49
ALPHABET = string.ascii_lowercase + string.ascii_uppercase + string.digits + " .=-"


@dataclass(frozen=True)
class World:
    seed: int
    eats: dict[str, str]
    lives: dict[str, str]
    cipher: dict[str, str]  # lowercase letter -> uppercase letter
    pair_split: dict[str, list[tuple[int, int]]]  # train / search / test operand pairs

    def to_b(self, text: str) -> str:
        return "".join(self.cipher.get(c, c) for c in text)


def make_world(seed: int) -> World:
    rng = random.Random(seed)
    foods, places = FOODS[:], PLACES[:]
    rng.shuffle(foods)
    rng.shuffle(places)
    upper = list(string.ascii_uppercase)
    rng.shuffle(upper)
    # split unordered pairs, so (a, b) and (b, a) — which `sub` turns into the same prompt — never
    # land in different splits
    unordered = [(a, b) for a in range(MAX_OPERAND + 1) for b in range(a, MAX_OPERAND + 1)]
    rng.shuffle(unordered)
    n_eval = 250

    def both(pairs):
        out = []
        for a, b in pairs:
            out.append((a, b) if rng.random() < 0.5 else (b, a))
        return out

    split = {"search": both(unordered[:n_eval]), "test": both(unordered[n_eval : 2 * n_eval])}
    split["train"] = [p for a, b in unordered[2 * n_eval :] for p in {(a, b), (b, a)}]
    split["train"].sort()
    return World(
        seed, dict(zip(ANIMALS, foods)), dict(zip(ANIMALS, places)), dict(zip(string.ascii_lowercase, upper)), split
    )


# ---- text generators (training streams) ----------------------------------------------------------
def sentence(world: World, rng: random.Random) -> str:
    a = rng.choice(ANIMALS)
    kind = rng.random()
    if kind < 0.4:
        return f"the {a} eats {world.eats[a]}."
    if kind < 0.8:
        return f"the {a} lives in the {world.lives[a]}."
    b = rng.choice(ANIMALS)
    return f"the {a} and the {b} are friends."


def math_example(world: World, rng: random.Random, split: str = "train", op: str | None = None) -> tuple[str, str]:
    a, b = rng.choice(world.pair_split[split])
    op = op or rng.choice(list(OPS))
    if op == "sub" and a < b:
        a, b = b, a
    return f"{op} {a} and {b} =", str(OPS[op](a, b))


def reverse_word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))


def reverse_example(word: str) -> tuple[str, str]:
    return f"reverse {word} =", word[::-1]


# ---- evaluation sets -----------------------------------------------------------------------------
def math_items(world: World, split: str, in_b: bool, ops_per_pair: int = 1) -> list[dict]:
    """Each held-out operand pair asked with `ops_per_pair` operations (cycling through them), so search
    and test never share a pair. More ops per pair make a larger split from the same held-out pairs
    (training data unchanged): 4 gives 1000 items, halving the sampling noise of a score."""
    items = []
    ops = list(OPS)
    for i, (a0, b0) in enumerate(world.pair_split[split]):
        for j in range(ops_per_pair):
            op = ops[(i + j) % len(ops)]
            a, b = (b0, a0) if op == "sub" and a0 < b0 else (a0, b0)
            prompt = f"{op} {a} and {b} ="
            items.append({"prompt": world.to_b(prompt) if in_b else prompt, "answer": str(OPS[op](a, b))})
    return items


def reverse_items(seed: int, n: int, exclude: set[str]) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed + 7919)
    words: list[str] = []
    seen = set(exclude)
    while len(words) < 2 * n:
        w = reverse_word(rng)
        if w not in seen:
            seen.add(w)
            words.append(w)
    items = [dict(zip(("prompt", "answer"), reverse_example(w))) for w in words]
    return items[:n], items[n:]


def fact_items(world: World, in_b: bool, n_choices: int = 4) -> tuple[list[dict], list[dict]]:
    """Multiple choice: complete 'the cow eats' / 'the cow lives in the' with the right noun."""
    rng = random.Random(world.seed + 104729)
    items = []
    for a in ANIMALS:
        for rel, table, pool, prefix in (
            ("eats", world.eats, FOODS, f"the {a} eats"),
            ("lives", world.lives, PLACES, f"the {a} lives in the"),
        ):
            wrong = rng.sample([x for x in pool if x != table[a]], n_choices - 1)
            choices = wrong + [table[a]]
            rng.shuffle(choices)
            tr = world.to_b if in_b else (lambda s: s)
            items.append(
                {"prompt": tr(prefix), "choices": [" " + tr(c) for c in choices], "label": choices.index(table[a])}
            )
    rng.shuffle(items)
    half = len(items) // 2
    return items[:half], items[half:]
