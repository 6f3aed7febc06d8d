#!/usr/bin/env python3
"""Write eval/passkey.jsonl: exact-recall cases in the format of ../shared/eval/niah_dev.jsonl.

One case per (size, depth) on Dracula: a passphrase sentence with a fresh random value (seeded, so the
file is reproducible) inside the first words of a corpus book, materialized by
../shared/eval/materialize.py's rule (`slm-chat eval` does it in Rust).

    python3 benches/make_passkeys.py > eval/passkey.jsonl
"""
import json
import random

SIZES = [8192, 16384, 32768, 65536, 131072]
DEPTHS = [0.1, 0.3, 0.5, 0.7, 0.9]
BOOKS = ["dracula"]
WORDS = ["BLUE", "AMBER", "CEDAR", "DELTA", "EMBER", "FROST", "GRANITE", "HARBOR", "IVORY",
         "JUNIPER", "KESTREL", "LANTERN", "MARBLE", "NORTH", "OPAL", "PINE", "QUARTZ", "RIVER",
         "SILVER", "TIMBER", "UMBER", "VIOLET", "WILLOW", "ZEPHYR"]


def main():
    rng = random.Random(20261130)
    for i, size in enumerate(SIZES):
        for j, depth in enumerate(DEPTHS):
            a, b = rng.sample(WORDS, 2)
            key = f"{a}-{b}-{rng.randint(1000, 9999)}"
            book = BOOKS[(i + j) % len(BOOKS)]
            print(json.dumps({
                "id": f"passkey-{size // 1024}k-d{int(depth * 100)}",
                "book": book,
                "context_tokens_approx": size,
                "depth": depth,
                "needle_sentence": f"The secret passphrase for the vault is {key}.",
                "question": "What is the secret passphrase for the vault?",
                "answer": key,
            }))


if __name__ == "__main__":
    main()
