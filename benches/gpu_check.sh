#!/usr/bin/env bash
# The GPU device check (issue 16): one run on a lent NVIDIA machine, on synthetic weights
# (no model file travels: the default GGUF alone is over the 64 MiB a call may carry).
#
#   bash benches/gpu_check.sh prepare   # here: build the CUDA binary, pack it into .gpu/
#   # then, with the device tool: command "bash benches/gpu_check.sh run", carry [".gpu"]
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_BIN=target/release/slm-chat bash benches/gpu_check.sh run
#                                       # the same run on this machine's CPU (the CPU build)
#
# `run` checks, for the 135M (SmolLM2) and 1.5B (Qwen2.5) shapes:
#   (a) parity: `bench --parity` of the device against the CPU over a 512-token prompt —
#       the best token must agree at >= 99 % of positions;
#   (b) the tree: a long document ingested on the device into a fresh store, found stored
#       (not rebuilt) by the CPU, and answered on the device and on the CPU — the first
#       answer token must be the same;
#   (c) speed: `bench` on the device (prefill, encode, decode) and the GPU memory it held.
# It prints one table (also written to $OUT/gpu_check.md when $OUT is set) and exits 1 when
# a parity check fails, 2 when a step could not run.
#
# Knobs: GPU_CHECK_DEVICE (cuda), GPU_CHECK_BIN (the binary; default .gpu/slm-chat.xz
# unpacked, else target/release/slm-chat), GPU_CHECK_DOC_BYTES (document size; one token per
# byte with the synthetic tokenizer; default 131072, 8192 on the CPU), GPU_CHECK_BENCH
# (bench flags; default "--reps 3", "--reps 1 --prefill 512" on the CPU), GPU_CHECK_SHAPES.
set -uo pipefail
cd "$(dirname "$0")/.."

prepare() {
  set -e
  local env
  env="$(.ci/cuda-env.sh)"
  eval "$env"
  CARGO_TARGET_DIR=target/cuda cargo build --release --locked --features cuda
  mkdir -p .gpu   # ignored (.gitignore): it travels only as a carried path
  xz -T0 -6 -c target/cuda/release/slm-chat >.gpu/slm-chat.xz
  local packed tracked
  packed=$(stat -c %s .gpu/slm-chat.xz)
  tracked=$(git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s}')
  echo "packed: .gpu/slm-chat.xz $((packed / 1048576)) MiB + tracked files $((tracked / 1048576)) MiB (a call carries at most 64 MiB)"
  echo 'device call: command "bash benches/gpu_check.sh run", carry [".gpu"], timeout_s 420'
}

# Put the NVIDIA libraries the CUDA binary links (cuBLAS, cuRAND, the CUDA runtime) on the
# library path: from a CUDA toolkit or from the pip wheels of a PyTorch install.
find_cuda_libs() {
  local lib dir libs="libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libcudart.so.13"
  # The driver's libcuda is normally known to the loader; never a toolkit's stub.
  ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1 ' || libs="$libs libcuda.so.1"
  for lib in $libs; do
    dir=$(find /usr/local/nvidia /usr/local/cuda*/ /usr/lib /opt /usr/local/lib -name "$lib" \
      -not -path '*/stubs/*' -print -quit 2>/dev/null | xargs -r dirname)
    [ -n "$dir" ] && LD_LIBRARY_PATH="$dir:${LD_LIBRARY_PATH:-}"
  done
  export LD_LIBRARY_PATH
}

run() {
  DEVICE="${GPU_CHECK_DEVICE:-cuda}"
  W="$(mktemp -d)"
  mkdir -p "$W/out"
  if [ -n "${GPU_CHECK_BIN:-}" ]; then
    BIN="$GPU_CHECK_BIN"
  elif [ -f .gpu/slm-chat.xz ]; then
    BIN="$W/slm-chat"
    xz -dc .gpu/slm-chat.xz >"$BIN" && chmod +x "$BIN"
  else
    BIN="$PWD/target/release/slm-chat"
  fi
  [ "$DEVICE" = cuda ] && find_cuda_libs
  if ldd "$BIN" | grep -q 'not found'; then
    echo "gpu_check: $BIN cannot load (no NVIDIA libraries here?):"; ldd "$BIN" | grep 'not found'
    echo "  on a machine without them: LD_LIBRARY_PATH=\$SLM_CUDA_CPU_ONLY_LD_LIBRARY_PATH (.ci/cuda-env.sh), or GPU_CHECK_BIN=target/release/slm-chat"
    exit 2
  fi
  local doc_bytes bench_flags shapes
  if [ "$DEVICE" = cpu ]; then
    doc_bytes="${GPU_CHECK_DOC_BYTES:-8192}"
    bench_flags="${GPU_CHECK_BENCH:---reps 1 --prefill 512}"
  else
    doc_bytes="${GPU_CHECK_DOC_BYTES:-131072}"
    bench_flags="${GPU_CHECK_BENCH:---reps 3}"
  fi
  shapes="${GPU_CHECK_SHAPES:-smollm2-135m qwen2.5-1.5b}"
  # A fresh store and settings that make both devices' answers comparable: greedy, BM25
  # (the dense embedder is a download), no abstaining (random weights have no evidence).
  export XDG_CACHE_HOME="$W/cache" XDG_CONFIG_HOME="$W/config"
  export SLM_CHAT_GENERATE_TEMPERATURE=0 SLM_CHAT_SEARCH_SCORER=bm25 SLM_CHAT_ANSWER_ABSTAIN=false
  local sample=assets/sherlock_holmes_adventures_1-3.txt
  while [ "$(stat -c %s "$W/doc.txt" 2>/dev/null || echo 0)" -lt "$doc_bytes" ]; do cat "$sample" >>"$W/doc.txt"; done
  head -c "$doc_bytes" "$W/doc.txt" >"$W/document.txt"

  {
    echo "binary: $BIN ($(stat -c %s "$BIN") bytes), device: $DEVICE, $(nproc) CPU cores"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  } | tee "$W/out/machine.txt"

  local mem_pid=""
  mem_start() {
    mem_pid=""
    if [ "$DEVICE" = cuda ] && command -v nvidia-smi >/dev/null; then
      nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$W/out/mem.$1" 2>/dev/null &
      mem_pid=$!
    fi
  }
  mem_stop() { [ -n "$mem_pid" ] && { kill "$mem_pid"; wait "$mem_pid"; } 2>/dev/null; true; }
  # step NAME CMD...: stdout to $W/out/NAME.json, stderr to NAME.log, exit code to NAME.rc
  step() {
    local name="$1"; shift
    echo "== $name: $*" >&2
    local t0=$SECONDS
    mem_start "$name"
    timeout 600 "$@" >"$W/out/$name.json" 2>"$W/out/$name.log"
    echo $? >"$W/out/$name.rc"
    mem_stop
    echo "   exit $(cat "$W/out/$name.rc") in $((SECONDS - t0)) s" >&2
    [ "$(cat "$W/out/$name.rc")" = 0 ] || tail -n 3 "$W/out/$name.log" | sed 's/^/   /' >&2
  }

  for s in $shapes; do
    step "model-$s" "$BIN" models --synthetic "$s" --out "$W/$s.gguf"
    step "parity-$s" "$BIN" bench --model "$W/$s.gguf" --parity "$DEVICE" --json
  done
  local m="$W/smollm2-135m.gguf" q="Who is Irene Adler?"
  step ingest-device "$BIN" ingest --json --model "$m" --device "$DEVICE" "$W/document.txt"
  step ingest-cpu "$BIN" ingest --json --model "$m" --device cpu "$W/document.txt"
  local devices="$DEVICE cpu"
  [ "$DEVICE" = cpu ] && devices=cpu
  for d in $devices; do
    step "ask1-$d" "$BIN" ask --json --model "$m" --device "$d" --max-tokens 1 "$W/document.txt" "$q"
    step "ask32-$d" "$BIN" ask --json --model "$m" --device "$d" --max-tokens 32 "$W/document.txt" "$q"
  done
  for s in $shapes; do
    # shellcheck disable=SC2086
    step "bench-$s" "$BIN" bench --model "$W/$s.gguf" --device "$DEVICE" --json $bench_flags
  done

  python3 - "$W/out" "$DEVICE" "$doc_bytes" "$shapes" <<'PY'
import json, os, sys
out, device, doc_bytes, shapes = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].split()

def get(name):
    try:
        rc = int(open(f"{out}/{name}.rc").read())
    except OSError:
        return None, None
    try:
        return rc, json.loads(open(f"{out}/{name}.json").read())
    except ValueError:
        return rc, None

def why(name):
    try:
        lines = [l for l in open(f"{out}/{name}.log").read().splitlines() if l.strip()]
    except OSError:
        return "no log"
    return lines[-1][:200] if lines else "no output"

def mem(name):
    try:
        vals = [int(x) for x in open(f"{out}/mem.{name}").read().split() if x.isdigit()]
    except OSError:
        return "–"
    return f"{max(vals):,} MiB" if vals else "–"

rows, failed, broken = [], False, False
def row(check, result, bar, ok):
    global failed
    rows.append((check, result, bar, "pass" if ok else ("FAIL" if ok is False else "")))
    failed |= ok is False

def ran(name, check, bar=""):
    """The step's JSON, or None after a FAIL row saying why it did not run."""
    global broken
    rc, v = get(name)
    if v is None:
        broken = True
        row(check, f"did not run (exit {rc}: {why(name)})", bar, False)
    return v

for s in shapes:
    p = ran(f"parity-{s}", f"{s}: parity", "≥ 99 %")
    if p is None:
        continue
    row(f"{s}: best token, {p['device']} vs {p['reference']}",
        f"{p['argmax_agree']}/{p['positions']} positions ({100 * p['argmax_agreement']:.1f} %)",
        "≥ 99 %", p["passed"])
    row(f"{s}: logits max / mean abs Δ",
        f"{p['max_abs_delta']:.4f} / {p['mean_abs_delta']:.5f} (logit sd {p['logit_sd']:.2f})", "", None)

gi = ran("ingest-device", f"tree: ingest on {device}")
ci = ran("ingest-cpu", "tree: the CPU opens it") if gi is not None else None
if gi is not None and ci is not None:
    row(f"tree: ingest on {device}", f"{gi['tokens']:,} tokens in {gi['seconds']:.1f} s, "
        f"{gi['tok_s']:,.0f} tok/s (lower model {gi['encode_secs']:.1f} s), store {gi['store_bytes'] / 1e9:.2f} GB, "
        f"GPU memory {mem('ingest-device')}",
        "≥ 20,000 tok/s (135M)" if device == "cuda" else "", gi["tok_s"] >= 20000 if device == "cuda" else None)
    row("tree: the CPU finds it stored", "stored, not rebuilt" if not ci["built"] else "REBUILT", "not rebuilt",
        not ci["built"])
answers = {(n, d): ran(f"{n}-{d}", f"tree: {n} on {d}") for n in ("ask1", "ask32") for d in (device, "cpu")}
if all(a is not None for a in answers.values()):
    a1, c1 = answers[("ask1", device)]["answer_tokens"], answers[("ask1", "cpu")]["answer_tokens"]
    row(f"tree: first answer token, {device} vs cpu", f"{a1} vs {c1}", "same", len(a1) == 1 and a1 == c1)
    a32, c32 = answers[("ask32", device)]["answer_tokens"], answers[("ask32", "cpu")]["answer_tokens"]
    common = next((i for i, (x, y) in enumerate(zip(a32, c32)) if x != y), min(len(a32), len(c32)))
    row("tree: 32-token answers", f"identical ({len(a32)} tokens)" if a32 == c32 else
        f"the same for the first {common} of {len(a32)} tokens", "", None)
    t = answers[("ask32", device)]["timings"]
    row(f"tree: answer on {device}", f"first token {t['first_token_ms']:.0f} ms, decode {t['decode_tok_s']:.0f} tok/s", "", None)

for s in shapes:
    b = ran(f"bench-{s}", f"{s}: bench")
    if b is None:
        continue
    figs = ", ".join(f"{f['name']} {f['median_tok_s']:,.0f}" for f in b["figures"])
    row(f"{s}: bench on {b['device']} (tok/s, median)", f"{figs}; GPU memory {mem(f'bench-{s}')}", "", None)

lines = ["| check | result | bar | |", "|---|---|---|---|"]
lines += [f"| {c} | {r} | {b} | {o} |" for c, r, b, o in rows]
table = "\n".join(lines)
print(table)
open(f"{out}/gpu_check.md", "w").write(open(f"{out}/machine.txt").read() + "\n" + table + "\n")
sys.exit(2 if broken else (1 if failed else 0))
PY
  local status=$?
  if [ -n "${OUT:-}" ]; then
    cp "$W/out/gpu_check.md" "$OUT/" 2>/dev/null
    tar -czf "$OUT/gpu_check_files.tar.gz" -C "$W" out
  fi
  rm -rf "$W"
  return "$status"
}

case "${1:-}" in
  prepare) prepare ;;
  run) run ;;
  *) echo "usage: bash benches/gpu_check.sh prepare|run" >&2; exit 2 ;;
esac
