#!/bin/sh
# Time bar: the 290-page book PDF in <= 2x pdftotext's time, same run, medians of 10 runs.
# Needs hyperfine and pdftotext. Usage: benches/pdf_speed.sh [path/to/slm-chat]
set -eu
cd "$(dirname "$0")/.."
BIN="${1:-target/release/slm-chat}"
PDF=../shared/corpus/pdf/pride_and_prejudice_enscript_290p.pdf
OUT="$(mktemp -d)"
hyperfine -N -w 2 -r 10 --export-json "$OUT/times.json" \
  "pdftotext $PDF $OUT/pp.txt" "$BIN extract $PDF"
python3 - "$OUT/times.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["results"]
ref, ours = r[0]["median"], r[1]["median"]
print(f"median pdftotext {ref*1000:.0f} ms, slm-chat {ours*1000:.0f} ms, ratio {ours/ref:.2f} (bar <= 2.00)")
sys.exit(0 if ours <= 2 * ref else 1)
PY
