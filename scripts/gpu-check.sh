#!/usr/bin/env bash
# The one command to run on a machine with an NVIDIA GPU: builds thinkrag with `cuda` for this
# GPU, runs the parity tests on it (f32; bf16 where the GPU has it; the Q8_0 GGUF), benchmarks the
# 1.5B shape (random weights: pp512 and tg128 in f32, bf16, Q8_0 and Q4_K_M) and prints one table
# with tokens/s and the fraction of the GPU's memory bandwidth decode reaches (weight bytes read
# per token x tokens/s, against the card's published bandwidth). Every step runs even when an
# earlier one failed; what could not be done is listed at the end. Meant to finish within 10
# minutes on one data-centre GPU.
#
#   scripts/gpu-check.sh [OUT_DIR]        (default .work/gpu-check; $OUT when set)
#
# The CUDA toolkit: nvcc on PATH or in $CUDA_HOME; otherwise CUDA 13.4 from PyPI into .work/cuda
# (scripts/check-cuda-build.sh), which needs the network once.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-${OUT:-$root/.work/gpu-check}}"
mkdir -p "$out"
cd "$root"
missed=()
started=$(date +%s)
say() { echo "== [$(( $(date +%s) - started ))s] $*" >&2; }
step() { # step NAME SECONDS CMD...: runs CMD with a time limit, logs it, records a failure
  local name="$1" limit="$2"; shift 2
  say "$name"
  if timeout "$limit" "$@" > "$out/$name.log" 2>&1; then return 0; fi
  local rc=$?
  tail -15 "$out/$name.log" >&2
  missed+=("$name (exit $rc$([ $rc = 124 ] && echo ", over ${limit}s"); $out/$name.log)")
  return 1
}

# The GPU.
if ! gpu="$(nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)" || [ -z "$gpu" ]; then
  echo "no NVIDIA GPU visible (nvidia-smi failed): nothing to check here; scripts/check-cuda-build.sh proves the build without one" >&2
  exit 1
fi
IFS=',' read -r name cap mem driver <<< "$gpu"
name="$(echo "$name" | xargs)"; cap="$(echo "$cap" | xargs)"; arch="${cap/./}"
say "GPU: $name, compute capability $cap, $mem, driver $driver"
# Published memory bandwidth, GB/s.
bandwidth=""
case "$name" in
  *H200*) bandwidth=4800 ;;
  *H100*PCIe*) bandwidth=2000 ;;
  *H100*NVL*) bandwidth=3900 ;;
  *H100*) bandwidth=3350 ;;
  *GH200*) bandwidth=4000 ;;
  *A100*80GB*PCIe*) bandwidth=1935 ;;
  *A100*80GB*) bandwidth=2039 ;;
  *A100*) bandwidth=1555 ;;
  *L40S*) bandwidth=864 ;;
  *L40*) bandwidth=864 ;;
  *L4*) bandwidth=300 ;;
  *A10G*|*A10*) bandwidth=600 ;;
  *T4*) bandwidth=320 ;;
  *V100*) bandwidth=900 ;;
  *"RTX 4090"*) bandwidth=1008 ;;
  *"RTX 3090"*) bandwidth=936 ;;
  *"RTX 6000 Ada"*) bandwidth=960 ;;
  *B200*) bandwidth=8000 ;;
esac
[ -z "$bandwidth" ] && missed+=("bandwidth fraction: $name is not in the script's table; add it")

# The toolkit.
if command -v nvcc >/dev/null 2>&1; then
  home="$(dirname "$(dirname "$(command -v nvcc)")")"
elif [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
  home="$CUDA_HOME"
else
  # shellcheck source=check-cuda-build.sh
  source "$root/scripts/check-cuda-build.sh" --dir "$root/.work/cuda"
  home="$(toolkit_13)" || home=""
fi
if [ -z "$home" ] || [ ! -x "$home/bin/nvcc" ]; then
  echo "no CUDA toolkit: put nvcc on PATH (or set CUDA_HOME), or give this machine PyPI access once" >&2
  exit 1
fi
libdir="$home/lib64"; [ -d "$libdir" ] || libdir="$home/lib"
export CUDA_HOME="$home" CUDA_PATH="$home" PATH="$home/bin:$PATH" CUDA_COMPUTE_CAP="$arch"
export CARGO_TARGET_DIR="$root/target/gpu" LD_LIBRARY_PATH="$libdir:${LD_LIBRARY_PATH:-}"
# RUSTFLAGS replaces .cargo/config.toml's flags: repeat them.
export RUSTFLAGS="-C target-cpu=native -L native=$libdir -L native=$libdir/stubs"
say "toolkit: $("$home/bin/nvcc" --version | tail -1)"

# Build: the binary and the test executables the checks run.
step build 420 cargo build --release --features cuda --locked
step build-tests 300 cargo test --release --features cuda --locked --no-run \
  -p thinkrag-llm --test parity --test quantized --test batching -p thinkrag-embed --test parity
bin="$CARGO_TARGET_DIR/release/thinkrag"

# Parity on the GPU: logits against transformers (f32, every dtype the test covers), the Q8_0
# GGUF export, batched decode against single, MiniLM against sentence-transformers.
export THINKRAG_TEST_DEVICE=cuda
step parity-llm 180 cargo test --release --features cuda --locked -p thinkrag-llm --test parity --test quantized --test batching
step parity-embed 120 cargo test --release --features cuda --locked -p thinkrag-embed --test parity
unset THINKRAG_TEST_DEVICE

# Benchmarks on the 1.5B shape.
rows=()
if [ -x "$bin" ]; then
  model="$out/r1-1.5b"
  [ -f "$model/config.json" ] || step synth 120 "$bin" synth deepseek-r1-distill-qwen-1.5b --out "$model"
  bench() { # bench LABEL DTYPE [EXTRA...]: the quantized ones are quantized while loading
    local label="$1" dtype="$2"; shift 2
    [ -f "$model/config.json" ] || { missed+=("bench $label: no model"); return; }
    if step "bench-$label" 150 "$bin" bench --model "$model" --device cuda --dtype "$dtype" "$@" \
        -p 512 -n 128 --positions 100 -r 3 --json; then
      rows+=("$(python3 - "$out/bench-$label.log" "$label" "${bandwidth:-0}" <<'EOF'
import json, sys
text = open(sys.argv[1]).read()
v = json.loads(text[text.index("{"):])
r = {x["test"].split("@")[0][:2]: x["tokens_per_s"] for x in v["results"]}
gb = v.get("weights_gib", 0) * 1.073741824
tg = r.get("tg", 0.0)
bw = float(sys.argv[3])
frac = f"{gb * tg / bw:.2f}" if bw > 0 else "?"
print(f"| {sys.argv[2]} | {gb:.2f} | {r.get('pp', 0):.1f} | {tg:.1f} | {gb * tg:.0f} | {frac} |")
EOF
)")
    fi
  }
  bench f32 f32
  if [ "${arch:0:1}" -ge 8 ] 2>/dev/null; then
    bench bf16 bf16
  else
    missed+=("bench bf16: compute capability $cap has no bf16 kernels in candle (f32 is the path)")
  fi
  bench q8_0 auto --quantize q8_0
  bench q4_k_m auto --quantize q4_k_m
else
  missed+=("benchmarks: the build failed, no binary")
fi

echo
echo "GPU: $name (compute capability $cap, $mem, driver $driver); published bandwidth ${bandwidth:-unknown} GB/s"
echo "1.5B shape, random weights; pp512 from an empty cache, tg128 at position 100; median of 3"
echo
echo "| weights | GB read per token | pp512 t/s | tg128 t/s | GB/s in decode | of bandwidth |"
echo "| --- | ---: | ---: | ---: | ---: | ---: |"
printf '%s\n' "${rows[@]}"
echo
if [ ${#missed[@]} -eq 0 ]; then
  echo "everything ran ($(( $(date +%s) - started )) s)"
else
  echo "could not do ($(( $(date +%s) - started )) s):"
  printf '  - %s\n' "${missed[@]}"
  exit 1
fi
