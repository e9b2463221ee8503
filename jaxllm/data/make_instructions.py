"""Write the small Alpaca-format instruction data set the project ships (``assets/instructions.json``).

Every record is made from a template and its answer is computed (sums, unit conversions, sorted
or reversed words, passive voice built from a verb's forms ...), so the answers are right by
construction. Some tasks carry their data in ``input``, others inline it in the instruction, as
Alpaca does. The output is deterministic for a seed: ``python -m jaxllm.data.make_instructions``
rewrites the shipped file byte for byte.

    python -m jaxllm.data.make_instructions [--out PATH] [--seed 0] [--per-kind 30]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Callable

from jaxllm.data.instruct import SHIPPED_PATH


WORDS = ["apple", "river", "garden", "window", "cloud", "horse", "candle", "bridge", "forest", "pencil",
         "table", "mountain", "letter", "orange", "winter", "silver", "basket", "castle", "dragon", "flower",
         "island", "kettle", "lemon", "market", "needle", "ocean", "planet", "rabbit", "shadow", "tiger"]
NOUNS_IRREGULAR = {"child": "children", "mouse": "mice", "foot": "feet", "tooth": "teeth", "man": "men",
                   "woman": "women", "goose": "geese", "person": "people", "ox": "oxen", "sheep": "sheep",
                   "fish": "fish", "leaf": "leaves", "knife": "knives", "wolf": "wolves", "life": "lives"}
NOUNS_REGULAR = ["box", "church", "bush", "city", "baby", "day", "toy", "cat", "bus", "glass", "fox",
                 "story", "key", "watch", "dish", "lady", "boy", "book", "car", "party", "brush", "kiss"]
ANTONYMS = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
            ("early", "late"), ("open", "closed"), ("full", "empty"), ("strong", "weak"), ("rich", "poor"),
            ("young", "old"), ("high", "low"), ("hard", "soft"), ("wet", "dry"), ("loud", "quiet"),
            ("near", "far"), ("thick", "thin"), ("clean", "dirty"), ("up", "down"), ("win", "lose")]
# (subject, verb past tense, past participle, object): both voices are built from these forms
CLAUSES = [("the chef", "cooked", "cooked", "the meal"), ("the dog", "chased", "chased", "the cat"),
           ("the girl", "wrote", "written", "the letter"), ("the boy", "broke", "broken", "the window"),
           ("the teacher", "graded", "graded", "the tests"), ("the wind", "moved", "moved", "the boat"),
           ("the artist", "painted", "painted", "the wall"), ("the farmer", "planted", "planted", "the seeds"),
           ("the king", "built", "built", "the castle"), ("the children", "ate", "eaten", "the cake"),
           ("the storm", "destroyed", "destroyed", "the bridge"), ("the baker", "made", "made", "the bread"),
           ("the police", "caught", "caught", "the thief"), ("the cat", "found", "found", "the mouse"),
           ("the students", "read", "read", "the book"), ("the queen", "opened", "opened", "the gate")]
UNITS = [("kilometer", "meter", 1000), ("meter", "centimeter", 100), ("kilogram", "gram", 1000),
         ("hour", "minute", 60), ("minute", "second", 60), ("day", "hour", 24), ("week", "day", 7),
         ("liter", "milliliter", 1000), ("year", "month", 12)]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def plural(noun: str) -> str:
    """English plural: irregular table, else -es after s/x/z/ch/sh, -ies after consonant + y, else -s."""
    if noun in NOUNS_IRREGULAR:
        return NOUNS_IRREGULAR[noun]
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def quantity(n: int, unit: str) -> str:
    return f"{n} {unit if n == 1 else plural(unit)}"


def sentence(rng: random.Random, low: int = 3, high: int = 6) -> list[str]:
    return rng.sample(WORDS, rng.randint(low, high))


def _record(instruction: str, output: str, input: str = "") -> dict[str, str]:
    return {"instruction": instruction, "input": input, "output": output}


# --------------------------------------------------------------------------- one maker per kind


def addition(rng):
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    if rng.random() < 0.5:
        return _record(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.")
    return _record("Add the two numbers.", str(a + b), f"{a} and {b}")


def subtraction(rng):
    a = rng.randint(10, 99)
    b = rng.randint(1, a)
    if rng.random() < 0.5:
        return _record(f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}.")
    return _record("Subtract the second number from the first.", str(a - b), f"{a} and {b}")


def multiplication(rng):
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    if rng.random() < 0.5:
        return _record(f"Multiply {a} by {b}.", f"{a} times {b} is {a * b}.")
    return _record("What is the product of the two numbers?", str(a * b), f"{a} and {b}")


def comparison(rng):
    a, b = rng.sample(range(1, 100), 2)
    if rng.random() < 0.5:
        return _record(f"Which number is larger: {a} or {b}?", f"{max(a, b)} is larger than {min(a, b)}.")
    return _record("Which of the two numbers is smaller?", str(min(a, b)), f"{a} or {b}")


def conversion(rng):
    big, small, factor = rng.choice(UNITS)
    n = rng.randint(1, 20)
    if rng.random() < 0.5:
        return _record(f"Convert {quantity(n, big)} to {plural(small)}.",
                       f"{quantity(n, big)} is {quantity(n * factor, small)}.")
    return _record(f"How many {plural(small)} are in the given amount?", quantity(n * factor, small),
                   quantity(n, big))


def plurals(rng):
    noun = rng.choice(sorted(NOUNS_IRREGULAR) + NOUNS_REGULAR)
    if rng.random() < 0.5:
        return _record(f'What is the plural of "{noun}"?', f'The plural of "{noun}" is "{plural(noun)}".')
    return _record("Give the plural form of the word.", plural(noun), noun)


def antonyms(rng):
    word, opposite = rng.choice(ANTONYMS)[::rng.choice([1, -1])]
    if rng.random() < 0.5:
        return _record(f'What is the opposite of "{word}"?', f'The opposite of "{word}" is "{opposite}".')
    return _record("Give the antonym of the word.", opposite, word)


def reverse_words(rng):
    words = sentence(rng)
    return _record("Reverse the order of the words.", " ".join(reversed(words)), " ".join(words))


def sort_words(rng):
    words = sentence(rng)
    return _record("Sort these words alphabetically.", ", ".join(sorted(words)), ", ".join(words))


def count_words(rng):
    if rng.random() < 0.5:
        words = sentence(rng, 2, 7)
        return _record("How many words are in this text?", f"There are {len(words)} words.", " ".join(words))
    word = rng.choice(WORDS)
    return _record(f'How many letters are in the word "{word}"?', f'The word "{word}" has {len(word)} letters.')


def capitals(rng):
    words = sentence(rng, 2, 5)
    text = " ".join(words)
    if rng.random() < 0.5:
        return _record("Rewrite the text in capital letters.", text.upper(), text)
    return _record("Capitalize the first letter of each word.", " ".join(w.capitalize() for w in words), text)


def voice(rng):
    subject, past, participle, obj = rng.choice(CLAUSES)
    plural_object = obj in ("the tests", "the seeds")
    active = f"{subject} {past} {obj}.".capitalize()
    passive = f"{obj} {'were' if plural_object else 'was'} {participle} by {subject}.".capitalize()
    if rng.random() < 0.5:
        return _record("Rewrite the sentence in the passive voice.", passive, active)
    return _record("Rewrite the sentence in the active voice.", active, passive)


def parity(rng):
    n = rng.randint(1, 999)
    kind = "even" if n % 2 == 0 else "odd"
    if rng.random() < 0.5:
        return _record(f"Is {n} even or odd?", f"{n} is {kind}.")
    return _record("Classify the number as even or odd.", kind, str(n))


def spelling(rng):
    word = rng.choice(WORDS)
    if rng.random() < 0.5:
        return _record(f'Spell the word "{word}" backwards.', word[::-1])
    return _record("What is the first letter of the word?", word[0], word)


def next_day(rng):
    i = rng.randrange(7)
    if rng.random() < 0.5:
        return _record(f"What day comes after {DAYS[i]}?", f"The day after {DAYS[i]} is {DAYS[(i + 1) % 7]}.")
    return _record("Name the day before the given day.", DAYS[i - 1], DAYS[i])


KINDS: dict[str, Callable[[random.Random], dict[str, str]]] = {
    "addition": addition, "subtraction": subtraction, "multiplication": multiplication,
    "comparison": comparison, "conversion": conversion, "plural": plurals, "antonym": antonyms,
    "reverse_words": reverse_words, "sort_words": sort_words, "count": count_words, "capitals": capitals,
    "voice": voice, "parity": parity, "spelling": spelling, "next_day": next_day,
}


def make_instructions(seed: int = 0, per_kind: int = 30) -> list[dict[str, str]]:
    """``per_kind`` distinct records of every kind in ``KINDS`` (fewer where a kind has fewer
    distinct records), shuffled together; the same seed gives the same list."""
    if per_kind < 1:
        raise ValueError(f"per_kind must be >= 1, got {per_kind}")
    rng = random.Random(seed)
    records, seen = [], set()
    for make in KINDS.values():
        made = 0
        for _ in range(per_kind * 20):  # distinct records are drawn at random; give up on exhausted kinds
            record = make(rng)
            key = (record["instruction"], record["input"])
            if key not in seen:
                seen.add(key)
                records.append(record)
                made += 1
                if made == per_kind:
                    break
    rng.shuffle(records)
    return records


def write_instructions(path: str | Path = SHIPPED_PATH, seed: int = 0, per_kind: int = 30) -> int:
    """Write ``make_instructions(seed, per_kind)`` as JSON to ``path``; returns the record count."""
    records = make_instructions(seed, per_kind)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return len(records)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(SHIPPED_PATH))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-kind", type=int, default=30)
    args = parser.parse_args(argv)
    print(f"wrote {write_instructions(args.out, args.seed, args.per_kind)} records to {args.out}")


if __name__ == "__main__":
    main()
