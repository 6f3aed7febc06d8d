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
ft = lambda m: [a["timings"]["first_token_ms"] for a, _ in res[m]]
t, r = med(ft("tree")), med(ft("rag"))
a = res["tree"][0][0]
runs_tree = ", ".join("%.0f" % x for x in ft("tree"))
runs_rag = ", ".join("%.0f" % x for x in ft("rag"))
part = lambda k: med([x[0]["timings"][k] for x in res["tree"]])
print("document tokens %d; answer (tree): %r; (rag): %r" % (a["document_tokens"], a["answer"][:80], res["rag"][0][0]["answer"][:80]))
print("time to first token, median of %d: tree %.0f ms (%s; open %.0f ms, search %.0f ms, inject %.0f ms), rag %.0f ms (%s): **%.1fx**"
      % (runs, t, runs_tree, part("open_ms"), part("search_ms"), part("inject_ms"), r, runs_rag, r / t))
m = a["memory"]
print("memory (tree): injected KV %d entries = %.1f MB; full attention over the document would need %.2f GB (f16): %.0fx more; peak RSS tree %.0f MB, rag %.0f MB"
      % (m["injected_entries"], m["injected_bytes"] / 1e6, m["full_attention_kv_bytes"] / 1e9, m["full_attention_kv_bytes"] / m["injected_bytes"],
         med([x[1] for x in res["tree"]]) / 1e6, med([x[1] for x in res["rag"]]) / 1e6))
PY
