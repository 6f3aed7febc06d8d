#!/usr/bin/env bash
# Installs (once) a CUDA 13.0 build toolchain from PyPI wheels into a cache dir and prints
# the environment `cargo build --release --features cuda` needs. No GPU, no system CUDA.
#
#   eval "$(.ci/cuda-env.sh)"   # then: CARGO_TARGET_DIR=target/cuda cargo build --release --features cuda
#
# Knobs (all optional):
#   SLM_CUDA_DIR      cache dir (default ${XDG_CACHE_HOME:-~/.cache}/slm-chat/cuda)
#   SLM_CUDA_LIBS     stub (default): link against generated stub libcublas/libcublasLt/libcurand/libnvrtc
#                     (build only; ~100 MB of wheels). real: download the real libraries (~650 MB of wheels).
#   CUDA_COMPUTE_CAP  one value, default 90 (H100/H200 -> sm_90a). 80 = portable Ampere+ PTX (see notes).
# stdout carries only `export` lines; progress goes to stderr.
set -euo pipefail

CUDA_VER=13.0
TOOL_WHEELS=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
             nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85)
LIB_WHEELS=(nvidia-cublas==13.1.0.3 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88)

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${SLM_CUDA_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/slm-chat/cuda}"
mode="${SLM_CUDA_LIBS:-stub}"
root="$dir/$CUDA_VER-$mode"

log() { echo "cuda-env: $*" >&2; }

# Symbols cudarc references (dynamic-linking, cfg cuda-13000) in one of its sys/mod.rs files.
cudarc_syms() {
  python3 - "$1" <<'PY'
import re, sys
lines = open(sys.argv[1]).read().split('\n')
for i, l in enumerate(lines):
    m = re.match(r'pub unsafe fn (\w+)\(', l)
    if not m or m.group(1) in ('culib', 'is_culib_present'):
        continue
    prev = lines[i - 1].strip()
    if prev.startswith('#[cfg(') and 'feature = "cuda-' in prev and '"cuda-13000"' not in prev:
        continue
    print(m.group(1))
PY
}

# make_stub SONAME RETURN_CODE OUTDIR < symbol-list
make_stub() {
  local soname="$1" rc="$2" out="$3" c
  c="$(mktemp --suffix=.c)"
  sort -u | awk -v rc="$rc" '{print "int " $1 "(void) { return " rc "; }"}' >"$c"
  gcc -shared -fPIC -w -Wl,-soname,"$soname" -o "$out/$soname" "$c"
  rm -f "$c"
  ln -sfn "$soname" "$out/${soname%%.so*}.so"
}

if [ ! -e "$root/.complete" ]; then
  command -v gcc >/dev/null || { log "gcc/g++ needed (nvcc host compiler)"; exit 1; }
  mkdir -p "$dir"
  tmp="$(mktemp -d "$dir/.tmp.XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT
  wheels=("${TOOL_WHEELS[@]}")
  [ "$mode" = real ] && wheels+=("${LIB_WHEELS[@]}")
  log "downloading ${#wheels[@]} wheels into $tmp"
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$tmp/w" "${wheels[@]}" >&2
  mkdir -p "$tmp/x"
  for w in "$tmp"/w/*.whl; do python3 -m zipfile -e "$w" "$tmp/x"; done
  r="$tmp/x/nvidia/cu13"            # every CUDA 13 wheel installs into nvidia/cu13/{bin,include,lib,nvvm}
  chmod +x "$r"/bin/nvcc "$r"/bin/ptxas "$r"/bin/fatbinary "$r"/bin/nvlink "$r"/bin/cudafe++ \
           "$r"/bin/bin2c "$r"/nvvm/bin/cicc   # zip extraction drops the exec bits
  rm -rf "$r/.metadata" "$r"/lib/*.alt.so* "$r"/lib/libnvblas.so* "$r"/lib/libnvvm.so*  # unused by nvcc/candle
  ln -sfn lib "$r/lib64"            # nvcc.profile / tools that expect lib64
  ln -sfn libcudart.so.13 "$r/lib/libcudart.so"   # candle-kernels: rustc-link-lib=dylib=cudart
  mkdir -p "$r/lib/stubs"
  # libcuda (the driver) is in no wheel: a stub with every cu* entry point of cuda.h,
  # each returning CUDA_ERROR_STUB_LIBRARY (34). Link-time only; never put it in front
  # of a real driver at run time.
  { gcc -E -P -x c "$r/include/cuda.h" | grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | tr -d ' ('
    printf '%s\n' cuProfilerInitialize cuProfilerStart cuProfilerStop; } | make_stub libcuda.so.1 34 "$r/lib/stubs"
  if [ "$mode" = real ]; then
    for p in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
      ln -sfn "$p" "$r/lib/${p%%.so*}.so"
    done
  else
    ver="$(awk '$0=="name = \"cudarc\"" {getline; gsub(/"/, "", $3); print $3; exit}' "$repo/Cargo.lock")"
    home="${CARGO_HOME:-$HOME/.cargo}"
    crate="$(ls "$home"/registry/cache/*/"cudarc-$ver.crate" 2>/dev/null | head -n1 || true)"
    if [ -z "$crate" ]; then
      (cd "$repo" && cargo fetch --locked >&2)
      crate="$(ls "$home"/registry/cache/*/"cudarc-$ver.crate" | head -n1)"
    fi
    tar -xzf "$crate" -C "$tmp" "cudarc-$ver/src"
    s="$tmp/cudarc-$ver/src"
    cudarc_syms "$s/cublas/sys/mod.rs"   | make_stub libcublas.so.13   1 "$r/lib/stubs"
    cudarc_syms "$s/cublaslt/sys/mod.rs" | make_stub libcublasLt.so.13 1 "$r/lib/stubs"
    cudarc_syms "$s/curand/sys/mod.rs"   | make_stub libcurand.so.10   1 "$r/lib/stubs"
    cudarc_syms "$s/nvrtc/sys/mod.rs"    | make_stub libnvrtc.so.13    1 "$r/lib/stubs"
  fi
  "$r/bin/nvcc" --version >&2
  rm -rf "$root"
  mv "$r" "$root"
  touch "$root/.complete"
  log "installed into $root"
fi

cat <<EOF
export CUDA_ROOT='$root'
export CUDA_HOME='$root'
export CUDA_PATH='$root'
export PATH='$root/bin':"\$PATH"
export CUDA_COMPUTE_CAP="\${CUDA_COMPUTE_CAP:-90}"
export CUDARC_CUDA_VERSION=13000
# Only for running a cuda-feature binary on a machine WITHOUT an NVIDIA driver (it then falls back):
export SLM_CUDA_CPU_ONLY_LD_LIBRARY_PATH='$root/lib:$root/lib/stubs'
EOF
