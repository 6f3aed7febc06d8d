#!/usr/bin/env python3
"""Robustness bar over ../shared/corpus/pdf-torture (171 pdf.js test PDFs).

For each file runs `slm-chat extract --json FILE` with a 60 s outer limit and checks:
  * the main process never crashes (no signal, no panic exit 101) and never hangs (<= 60 s);
  * every failure prints exactly one stderr line starting with "slm-chat: ";
  * on files where pdftotext got > 20 visible characters (expected.tsv), slm-chat recovers at
    least half as many visible (non-whitespace) characters, on >= 95 % of them.
Usage: benches/pdf_torture.py [path/to/slm-chat]   (default target/release/slm-chat)
"""
import collections, json, os, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "..", "shared", "corpus", "pdf-torture")
BIN = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target", "release", "slm-chat")
LIMIT_S = 60

expected = {}
with open(os.path.join(CORPUS, "expected.tsv")) as tsv:
    next(tsv)
    for line in tsv:
        name, _exit, chars = line.rstrip("\n").split("\t")
        expected[name] = int(chars)

codes = collections.Counter()
crashes, hangs, unclear, slowest = [], [], [], (0.0, "")
with_text, recovered, short = 0, 0, []
for name in sorted(expected):
    start = time.monotonic()
    try:
        run = subprocess.run([BIN, "extract", "--json", os.path.join(CORPUS, name)],
                             capture_output=True, timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        hangs.append(name)
        continue
    took = time.monotonic() - start
    slowest = max(slowest, (took, name))
    code = run.returncode
    codes[code] += 1
    if code < 0 or code == 101:
        crashes.append(f"{name} (exit {code})")
    stderr = run.stderr.decode("utf-8", "replace").strip().splitlines()
    chars = 0
    if code in (0, 10):
        doc = json.loads(run.stdout)
        chars = sum(1 for c in doc["text"] if not c.isspace())
    elif len(stderr) != 1 or not stderr[0].startswith("slm-chat: "):
        unclear.append(f"{name}: {stderr!r}")
    if expected[name] > 20:
        with_text += 1
        if chars * 2 >= expected[name]:
            recovered += 1
        else:
            short.append(f"{name}: {chars} of {expected[name]} (exit {code}: {' / '.join(stderr)[:150]})")

share = recovered / with_text if with_text else 1.0
print(f"files: {len(expected)}   exit codes: {dict(sorted(codes.items()))}")
print(f"main-process crashes: {len(crashes)} {crashes}")
print(f"over {LIMIT_S} s: {len(hangs)} {hangs}   slowest: {slowest[0]:.2f} s ({slowest[1]})")
print(f"failures without exactly one clear line: {len(unclear)}")
for item in unclear:
    print("   ", item)
print(f"recovered >= half of pdftotext's characters: {recovered}/{with_text} = {share:.1%}")
for item in short:
    print("    short:", item)
ok = not crashes and not hangs and not unclear and share >= 0.95
print("all bars met" if ok else "BAR MISSED")
sys.exit(0 if ok else 1)
