#!/usr/bin/env bash
# Time to first token from a stored tree against `rag` on the same question, in one run,
# alternating, with answer-time memory: injected KV, what full attention would need, and
# peak RSS of the whole process.
#
#   benches/ttft.sh BOOK "QUESTION" [RUNS]     (the book's tree must be stored already:
#                                              `slm-chat ingest BOOK`)
set -euo pipefail
cd "$(dirname "$0")/.."
BOOK=${1:?book}; Q=${2:?question}; RUNS=${3:-3}
BIN=./target/release/slm-chat
OUT=$(mktemp -d)
for i in $(seq "$RUNS"); do
  for m in tree rag; do
    /usr/bin/time -v "$BIN" ask "$BOOK" "$Q" --method "$m" --json --max-tokens 32 \
      >"$OUT/$m-$i.json" 2>"$OUT/$m-$i.time"
  done
done
python3 - "$OUT" "$RUNS" <<'PY'
import json, re, statistics, sys
out, runs = sys.argv[1], int(sys.argv[2])
def load(m, i):
    a = json.load(open(f"{out}/{m}-{i}.json"))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(f"{out}/{m}-{i}.time").read()).group(1)) * 1024
    return a, rss
res = {m: [load(m, i) for i in range(1, runs + 1)] for m in ("tree", "rag")}
med = lambda xs: statistics.median(xs)
t = med([a["timings"]["first_token_ms"] for a, _ in res["tree"]])
r = med([a["timings"]["first_token_ms"] for a, _ in res["rag"]])
a = res["tree"][0][0]
print(f"document tokens {a['document_tokens']}; answer (tree): {a['answer'][:80]!r}; (rag): {res['rag'][0][0]['answer'][:80]!r}")
print(f"time to first token, median of {runs}: tree {t:.0f} ms "
      f"({', '.join(f'{x[0][\"timings\"][\"first_token_ms\"]:.0f}' for x in res['tree'])}; "
      f"open {med([x[0]['timings']['open_ms'] for x in res['tree']]):.0f} ms, search {med([x[0]['timings']['search_ms'] for x in res['tree']]):.0f} ms, "
      f"inject {med([x[0]['timings']['inject_ms'] for x in res['tree']]):.0f} ms), "
      f"rag {r:.0f} ms ({', '.join(f'{x[0][\"timings\"][\"first_token_ms\"]:.0f}' for x in res['rag'])}): **{r / t:.1f}×**")
m = a["memory"]
print(f"memory (tree): injected KV {m['injected_entries']} entries = {m['injected_bytes'] / 1e6:.1f} MB; "
      f"full attention over the document would need {m['full_attention_kv_bytes'] / 1e9:.2f} GB (f16): "
      f"{m['full_attention_kv_bytes'] / m['injected_bytes']:.0f}× more; "
      f"peak RSS tree {med([x[1] for x in res['tree']]) / 1e6:.0f} MB, rag {med([x[1] for x in res['rag']]) / 1e6:.0f} MB")
PY
