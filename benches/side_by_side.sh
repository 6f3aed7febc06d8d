#!/usr/bin/env bash
# slm-chat against llama.cpp on the same GGUF, the same two cores, in one run.
#
#   LLAMA_PY=/path/to/venv/bin/python [MODEL=catalogue-name] benches/side_by_side.sh [OUT_DIR]
#
# MODEL is a name from `slm-chat models` (default smollm2-135m); it is fetched if missing.
# LLAMA_PY is a Python with llama-cpp-python==0.3.36 (see ../shared/anchors/README.md for
# the install line). Prints a Markdown table; raw JSON and /usr/bin/time output go to OUT_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${LLAMA_PY:?set LLAMA_PY to a python with llama-cpp-python}
OUT=${1:-target/side-by-side}
REPS=${REPS:-3}
# Prompt lengths for the prefill figures (SIZES=512 for the quick check the Qwen bars use).
SIZES=${SIZES:-512,2048,8000}
mkdir -p "$OUT"
cargo build --release --quiet
BIN=./target/release/slm-chat
NAME=${MODEL:-smollm2-135m}
# The path is printed on the line after the model's name.
MODEL=$($BIN models --fetch "$NAME" 2>/dev/null | awk -v n="$NAME" 'take {print $1; exit} $1 == n {take = 1}')
TEXT=../shared/corpus/books/pride_and_prejudice.txt
ANCHOR=../shared/anchors/llamacpp_bench.py

echo "slm-chat bench ($REPS reps)..." >&2
/usr/bin/time -v "$BIN" --model "$MODEL" bench --json --reps "$REPS" --prefill "$SIZES" \
  >"$OUT/slm.json" 2>"$OUT/slm.time"
for fa in 1 0; do
  echo "llama.cpp flash_attn=$fa ($REPS reps)..." >&2
  /usr/bin/time -v "$PY" "$ANCHOR" "$MODEL" "$TEXT" "$OUT/llama-fa$fa.json" \
    --reps "$REPS" --flash-attn "$fa" --sizes "$SIZES" >"$OUT/llama-fa$fa.log" 2>"$OUT/llama-fa$fa.time"
done
python3 benches/side_by_side.py "$OUT"
