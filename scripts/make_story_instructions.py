#!/usr/bin/env python3
"""Writes data/story_instructions.json: the built-in default training set of `peft train`.

Instruction records in the domain and vocabulary of the built-in model (stories260k, trained on
TinyStories): "Write a story about a <animal> named <name> who <likes something>." with a short story
that uses exactly that animal, name and object. The base model writes TinyStories but ignores the
instruction (it makes up its own characters); an adapter trained on these records learns to take the
characters from the instruction, which a held-out loss and a before/after generation show within a
minute on two CPU cores. Deterministic (no randomness beyond a fixed permutation).

    python3 scripts/make_story_instructions.py
"""

import itertools
import json
from pathlib import Path

NAMES = ["Tim", "Lily", "Sam", "Mia", "Ben", "Sue", "Max", "Anna", "Tom", "Lucy", "Jack", "Amy"]
ANIMALS = ["cat", "dog", "bird", "fish", "frog", "bunny", "bear", "duck"]
THINGS = ["ball", "kite", "hat", "box", "toy", "car", "cake", "book"]
FRIENDS = ["mom", "dad", "friend"]


def story(name, animal, thing, friend):
    return (
        f"Once upon a time, there was a little {animal} named {name}. "
        f"{name} loved to play with a {thing}. "
        f"One day, {name} lost the {thing}. {name} was very sad. "
        f"Then {name}'s {friend} came and helped {name} look for the {thing}. "
        f"They found the {thing} under a big tree. {name} was happy again."
    )


def main():
    combos = list(itertools.product(NAMES, ANIMALS, THINGS))
    # A fixed stride walks all 768 combinations in an order that mixes names, animals and things.
    order = [(i * 331) % len(combos) for i in range(len(combos))]
    assert len(set(order)) == len(combos)
    records = []
    for k, index in enumerate(order[:320]):
        name, animal, thing = combos[index]
        friend = FRIENDS[k % len(FRIENDS)]
        records.append(
            {
                "instruction": f"Write a story about a {animal} named {name} who loves a {thing}.",
                "input": "",
                "output": story(name, animal, thing, friend),
            }
        )
    path = Path(__file__).resolve().parent.parent / "data" / "story_instructions.json"
    path.write_text(json.dumps(records, indent=1) + "\n")
    print(f"{len(records)} records written to {path}")


if __name__ == "__main__":
    main()
