#!/usr/bin/env bash
# Runs thinkrag's cargo-fuzz targets (fuzz/fuzz_targets) for a while each and prints, per
# target, the executions, the corpus it grew and what it found. Not run by CI: every crash a run
# finds becomes a regression test in the normal suite.
#
#   scripts/fuzz.sh [--seconds N] [--parallel P] [TARGET...]
#
# Defaults: 600 s per target, two targets at a time (one per core), every target. Needs the
# nightly toolchain (`rustup toolchain install nightly`) and cargo-fuzz (`cargo install
# cargo-fuzz`); the server and chat targets also need the test models (the MiniLM embedder is
# fetched by scripts/fetch-test-models.sh). Seeds come from fuzz/seeds plus files generated
# here (a GGUF header, an index's files); the grown corpora stay in fuzz/corpus, findings in
# fuzz/artifacts/TARGET.
#
# Targets run in libFuzzer's fork mode and go on after a crash, so one known crash (the stack
# overflow a self-drawing XObject causes in pdf-extract, which ingest's per-file process
# isolation contains) does not hide the rest.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
seconds=600
parallel=2
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds="$2"; shift 2 ;;
    --parallel) parallel="$2"; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) targets+=("$1"); shift ;;
  esac
done
if [ ${#targets[@]} -eq 0 ]; then
  targets=(pdf gguf chat_template index_open server_requests eventstream)
fi
cd "$root" || exit 1
export THINKRAG_TEST_MINILM="${THINKRAG_TEST_MINILM:-$root/.work/models/all-minilm-l6-v2}"
[ -f "$THINKRAG_TEST_MINILM/model.safetensors" ] || bash scripts/fetch-test-models.sh || exit 1

cargo +nightly fuzz build -s none || exit 1
bin="$root/fuzz/target/x86_64-unknown-linux-gnu/release"

# Seeds that are generated, not committed.
seed_dir="$root/fuzz/target/seeds"
mkdir -p "$seed_dir/gguf" "$seed_dir/index_open"
if [ ! -s "$seed_dir/gguf/tiny-q8_0.header" ]; then
  cargo build -q --bin thinkrag || exit 1
  "$root/target/debug/thinkrag" quantize --model tests/fixtures/tiny-qwen2 --to q8_0 \
    --out "$seed_dir/tiny-q8_0.gguf" >/dev/null || exit 1
  # The header (metadata with the tokenizer, tensor directory) is what the target parses.
  head -c 65536 "$seed_dir/tiny-q8_0.gguf" > "$seed_dir/gguf/tiny-q8_0.header"
fi
if [ ! -s "$seed_dir/index_open/0" ]; then
  idx="$seed_dir/index"
  rm -rf "$idx"
  HF_HUB_OFFLINE=1 THINKRAG_EMBEDDER="$THINKRAG_TEST_MINILM" "$root/target/debug/thinkrag" \
    ingest --index "$idx" --in-process samples/population >/dev/null || exit 1
  gen="$(ls -d "$idx"/gen-* | tail -1)"
  i=0
  for f in "$idx/index.json" "$gen/manifest.json" "$gen/chunks.jsonl" "$gen/documents.json" "$gen/vectors.f32"; do
    { printf "\\x$(printf %02x $i)"; cat "$f"; } > "$seed_dir/index_open/$i"
    i=$((i + 1))
  done
fi

run_one() {
  local t="$1" corpus="$root/fuzz/corpus/$1" artifacts="$root/fuzz/artifacts/$1"
  local log="$root/fuzz/target/fuzz-$1.log"
  mkdir -p "$corpus" "$artifacts"
  local seeds=()
  for d in "$root/fuzz/seeds/$t" "$seed_dir/$t"; do [ -d "$d" ] && seeds+=("$d"); done
  local start=$SECONDS
  # Fork mode: a crash is saved and the run goes on, so every target runs its full time and
  # reports all it found, not just the first.
  "$bin/$t" "$corpus" "${seeds[@]}" -artifact_prefix="$artifacts/" \
    -max_total_time="$seconds" -timeout=30 -rss_limit_mb=4096 -max_len=65536 \
    -fork=1 -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1 > "$log" 2>&1
  local rc=$?
  local runs
  # Fork mode's progress lines read "#RUNS: cov: ... exec/s: ...".
  runs="$(grep -o '^#[0-9]*' "$log" | tail -1 | tr -d '#')"
  local found
  found="$(find "$artifacts" -type f | wc -l)"
  echo "$t: ${runs:-?} executions in $((SECONDS - start))s, corpus $(ls "$corpus" | wc -l) inputs, $found findings in $artifacts (exit $rc; log $log)"
}

pids=()
for t in "${targets[@]}"; do
  run_one "$t" &
  pids+=($!)
  if [ ${#pids[@]} -ge "$parallel" ]; then
    wait "${pids[0]}"
    pids=("${pids[@]:1}")
  fi
done
wait
