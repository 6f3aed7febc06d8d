#!/usr/bin/env bash
# Issue 5's bars in one run: ingest of a 128K-token book (the first 100,000 words of
# Dracula) against llama.cpp's prefill on the same GGUF and cores, the stored tree's size
# with and without full-resolution KV, and the time to open the stored tree.
#
#   LLAMA_PY=/path/to/venv/bin/python benches/ingest_side_by_side.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${LLAMA_PY:?set LLAMA_PY to a python with llama-cpp-python (../shared/anchors/README.md)}
OUT=${1:-target/ingest-side-by-side}
mkdir -p "$OUT"
cargo build --release --quiet
BIN=$PWD/target/release/slm-chat
MODEL=$($BIN models --fetch 2>/dev/null | awk 'take {print $1; exit} $1 == "smollm2-135m" {take = 1}')
BOOK=$OUT/dracula_100k_words.txt
python3 - "$BOOK" <<'PY'
import re, sys
t = open("../shared/corpus/books/dracula.txt", encoding="utf-8").read()
ends = [m.end() for m, _ in zip(re.finditer(r"\S+", t), range(100000))]
open(sys.argv[1], "w", encoding="utf-8").write(t[: ends[-1]] + "\n")
PY
# A fresh cache: no other tree can lend chunks.
CACHE=$(mktemp -d)
trap 'rm -rf "$CACHE"' EXIT
export SLM_CHAT_PATHS_CACHE_DIR=$CACHE
echo "slm-chat ingest (full KV kept)..." >&2
# Full KV explicitly (the default is levels only): the same ingest, plus the leaves' KV written.
export SLM_CHAT_STORE_FULL_KV=always
/usr/bin/time -v "$BIN" --model "$MODEL" ingest --json "$BOOK" >"$OUT/ingest.json" 2>"$OUT/ingest.time"
echo "opening the stored tree (3 runs)..." >&2
for i in 1 2 3; do
  "$BIN" --model "$MODEL" ask "$BOOK" "Who is Count Dracula?" --json --max-tokens 8 2>/dev/null \
    | python3 -c "import json,sys; print(json.load(sys.stdin)['timings']['open_ms'])" >>"$OUT/open_ms.txt"
done
echo "the same tree without full-resolution KV (levels only)..." >&2
SLM_CHAT_STORE_FULL_KV=never "$BIN" --model "$MODEL" ingest --json "$BOOK" >"$OUT/ingest-never.json" 2>/dev/null
echo "llama.cpp prefill (flash_attn on and off)..." >&2
for fa in 1 0; do
  /usr/bin/time -v "$PY" ../shared/anchors/llamacpp_bench.py "$MODEL" "$BOOK" "$OUT/llama-fa$fa.json" \
    --reps 3 --flash-attn "$fa" >"$OUT/llama-fa$fa.log" 2>"$OUT/llama-fa$fa.time"
done
python3 - "$OUT" <<'PY'
import json, re, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
ing = json.loads((out / "ingest.json").read_text())
never = json.loads((out / "ingest-never.json").read_text())
rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", (out / "ingest.time").read_text()).group(1)) / 1024
llama = {fa: json.loads((out / f"llama-fa{fa}.json").read_text()) for fa in (1, 0)}
opens = [float(x) for x in (out / "open_ms.txt").read_text().split()]
print(f"ingest: {ing['tokens']} tokens, {ing['chunks']} chunks, {ing['seconds']:.1f} s, "
      f"{ing['tok_s']:.1f} tok/s (lower model {ing['encode_secs']:.1f} s, writing {ing['write_secs']:.1f} s), "
      f"peak RSS {rss:.0f} MiB")
print(f"store: full KV kept {ing['store_bytes'] / 1e9:.2f} GB; levels only {never['store_bytes'] / 1e9:.2f} GB")
print(f"open the stored tree: median {statistics.median(opens):.0f} ms ({', '.join(f'{o:.0f}' for o in opens)})")
print("| llama.cpp prefill (median tok/s) | fa on | fa off | ingest ÷ best |")
print("|---|---|---|---|")
for n in ("512", "2048", "8000"):
    a, b = (llama[fa]["prefill"][n]["median_wall_tok_s"] for fa in (1, 0))
    print(f"| {n} tokens | {a:.1f} | {b:.1f} | **{ing['tok_s'] / max(a, b):.2f}×** |")
PY
