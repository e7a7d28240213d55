"""Preference data that raydpo makes itself, for the demo: a behaviour a program can check.

The preferred answer is terse and starts with "Answer:"; the non-preferred one is the chatty reply small instruct
models give by default. A tuned model shows the behaviour when its generation starts with "Answer:".
"""
from __future__ import annotations

import random

PREFERRED_PREFIX = "Answer:"
CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin",
            "Egypt": "Cairo", "Canada": "Ottawa", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
            "Greece": "Athens", "Chile": "Santiago", "Poland": "Warsaw", "India": "New Delhi"}
OPPOSITES = {"hot": "cold", "up": "down", "fast": "slow", "light": "dark", "happy": "sad", "early": "late",
             "big": "small", "open": "closed", "full": "empty", "hard": "soft", "loud": "quiet", "old": "new"}
CHATTY = ["Great question! {fact} Let me know if you have any other questions.",
          "Sure, I'd be happy to help with that. {fact} I hope this helps!",
          "That's an interesting question. Let me think about it step by step. {fact}",
          "Of course! {fact} Feel free to ask me anything else."]


def _question(rng: random.Random) -> tuple[str, str, str]:
    """(question, short answer, a sentence stating it)."""
    kind = rng.choice(["add", "sub", "mul", "capital", "opposite"])
    if kind in ("add", "sub", "mul"):
        a, b = rng.randint(2, 40), rng.randint(2, 12)
        op, value, word = {"add": ("+", a + b, "plus"), "sub": ("-", a - b, "minus"),
                           "mul": ("*", a * b, "times")}[kind]
        return f"What is {a} {op} {b}?", str(value), f"{a} {word} {b} equals {value}."
    if kind == "capital":
        country = rng.choice(sorted(CAPITALS))
        return (f"What is the capital of {country}?", CAPITALS[country],
                f"The capital of {country} is {CAPITALS[country]}.")
    word = rng.choice(sorted(OPPOSITES))
    return f"What is the opposite of '{word}'?", OPPOSITES[word], f"The opposite of '{word}' is '{OPPOSITES[word]}'."


def answer_format_pairs(n: int, seed: int = 0) -> list[dict]:
    """n pairs in the prompt/chosen/rejected format (TRL's standard, PAI's)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        question, answer, fact = _question(rng)
        rows.append({"prompt": question, "chosen": f"{PREFERRED_PREFIX} {answer}",
                     "rejected": rng.choice(CHATTY).format(fact=fact)})
    return rows


def shows_preferred_format(generated: str) -> bool:
    return generated.strip().startswith(PREFERRED_PREFIX)
