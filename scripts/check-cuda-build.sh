#!/usr/bin/env bash
# Proves the CUDA build on a machine without a GPU: puts CUDA toolkits into a private directory
# (nothing is installed on the system), then builds `--features cuda` in release for each toolkit
# and compute capability asked, and fails on any error, or any warning in thinkrag's own code.
#
#   scripts/check-cuda-build.sh [--cuda 13,12] [--arch 75,80,90] [--dir DIR] [--no-tests]
#
# Toolkits (downloaded once into DIR, default .work/cuda; about 4 GB unpacked):
#   13: CUDA 13.4 from NVIDIA's PyPI wheels (nvidia-cuda-nvcc, -crt, -runtime, -nvrtc, -cccl,
#       nvidia-nvvm, nvidia-cublas, nvidia-curand).
#   12: CUDA 12.4.1 from Debian's non-free packages (trixie's nvidia-cuda-toolkit and -dev), unpacked
#       with dpkg-deb, not installed. PyPI's nvidia-cuda-nvcc-cu12 wheels hold ptxas and NVVM but not
#       the nvcc driver, so they cannot compile CUDA sources.
# Linking: candle links the CUDA libraries dynamically; the driver's libcuda.so.1 comes with the
# GPU driver, so the link uses a stub (Debian's for 12, one generated from cudarc's declarations
# for 13), as NVIDIA's own toolkits do. The binaries run where a driver is installed.
#
# The first arch of each toolkit builds the whole workspace (every test, bench and example too,
# unless --no-tests: then the binary and the libraries), so every CUDA-only path is compiled; the
# other archs build candle-kernels, the one crate the arch changes (PTX and the static library of
# candle's quantized kernels). A build that prints a warning fails like one with an error.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cudas="13,12"
archs="75,80,90"
dir="$root/.work/cuda"
tests=1
while [ $# -gt 0 ]; do
  case "$1" in
    --cuda) cudas="$2"; shift 2 ;;
    --arch) archs="$2"; shift 2 ;;
    --dir) dir="$2"; shift 2 ;;
    --no-tests) tests=0; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
mkdir -p "$dir"

say() { echo "== $*" >&2; }

# CUDA 13.4 from PyPI: the wheels unpack into one CUDA_HOME (nvidia/cu13: bin, nvvm, include, lib).
toolkit_13() {
  local home="$dir/13.4/root/nvidia/cu13"
  if [ ! -x "$home/bin/nvcc" ] || [ ! -e "$home/lib/stubs/libcuda.so" ]; then
    say "fetching CUDA 13.4 from PyPI into $dir/13.4"
    local wheels="$dir/13.4/wheels"
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary :all: \
      --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
      --python-version 3.11 -d "$wheels" \
      nvidia-cuda-nvcc==13.4.92 nvidia-cuda-crt==13.4.92 nvidia-cuda-runtime==13.4.92 \
      nvidia-cuda-nvrtc==13.4.92 nvidia-nvvm==13.4.92 nvidia-cuda-cccl==13.3.5.0.6 \
      nvidia-cublas==13.4.3.11 nvidia-curand==10.4.2.66 >&2 || return 1
    for w in "$wheels"/*.whl; do python3 -m zipfile -e "$w" "$dir/13.4/root/" || return 1; done
    # Wheels keep no file modes, and ship only versioned libraries.
    chmod +x "$home"/bin/* "$home"/bin/crt/* "$home"/nvvm/bin/* 2>/dev/null
    (cd "$home/lib" && for l in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
      ln -sf "$l" "${l%%.so*}.so"; done)
    # The driver library is not on PyPI: a stub with every entry point cudarc declares.
    local cudarc
    cudarc="$(cargo metadata --format-version 1 --manifest-path "$root/Cargo.toml" 2>/dev/null |
      python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="cudarc").rsplit("/",1)[0])')" || return 1
    mkdir -p "$home/lib/stubs"
    python3 - "$cudarc/src/driver/sys/mod.rs" > "$dir/13.4/libcuda_stub.c" <<'EOF' || return 1
import re, sys
names = sorted(set(re.findall(r'extern "C" \{\s*fn (cu\w+)\(', open(sys.argv[1]).read())))
print("/* Link-time stand-in for the driver's libcuda.so.1 (generated from cudarc's declarations). */")
for n in names:
    print(f"void {n}(void) {{}}")
EOF
    gcc -shared -fPIC -o "$home/lib/stubs/libcuda.so" -Wl,-soname,libcuda.so.1 "$dir/13.4/libcuda_stub.c" || return 1
  fi
  echo "$home"
}

# CUDA 12.4.1 from Debian trixie non-free, through a private apt configuration (no system change),
# arranged as a CUDA_HOME: bin (nvcc with a profile pointing here), nvvm, include, lib64.
toolkit_12() {
  local base="$dir/12.4" home="$dir/12.4/home"
  if [ ! -x "$home/bin/nvcc" ]; then
    say "fetching CUDA 12.4.1 from Debian (trixie non-free) into $base"
    local apt="$base/apt"
    mkdir -p "$apt/lists/partial" "$apt/archives/partial" "$apt/debs" "$base/root"
    echo "deb http://deb.debian.org/debian trixie main contrib non-free" > "$apt/sources.list"
    local opts=(-o Dir::Etc::sourcelist="$apt/sources.list" -o Dir::Etc::sourceparts=/dev/null
      -o Dir::State::Lists="$apt/lists" -o Dir::Cache="$apt" -o Dir::Cache::Archives="$apt/archives"
      -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
    apt-get "${opts[@]}" update >&2 || return 1
    (cd "$apt/debs" && apt-get "${opts[@]}" download nvidia-cuda-toolkit nvidia-cuda-dev libcudart12 \
      libnvrtc12 libnvrtc-builtins12.4 libnvvm4 libcublas12 libcublaslt12 libcurand10 \
      libcu++-dev libcub-dev libthrust-dev >&2) || return 1
    for d in "$apt"/debs/*.deb; do dpkg-deb -x "$d" "$base/root" || return 1; done
    local r="$base/root"
    mkdir -p "$home/bin" "$home/nvvm/bin"
    cp "$r/usr/lib/nvidia-cuda-toolkit/bin/nvcc" "$home/bin/nvcc"
    ln -sfn "$r/usr/lib/nvidia-cuda-toolkit/bin/crt" "$home/bin/crt"
    for t in ptxas fatbinary nvlink cudafe++ bin2c nvdisasm cuobjdump; do ln -sf "$r/usr/bin/$t" "$home/bin/$t"; done
    ln -sf "$r/usr/lib/nvidia-cuda-toolkit/bin/cicc" "$home/nvvm/bin/cicc"
    ln -sfn "$r/usr/lib/nvidia-cuda-toolkit/libdevice" "$home/nvvm/libdevice"
    ln -sfn "$r/usr/include" "$home/include"
    ln -sfn "$r/usr/lib/x86_64-linux-gnu" "$home/lib64"
    # Debian's profile names /usr paths; this one names the private tree.
    cat > "$home/bin/nvcc.profile" <<'EOF'
TOP              = $(_HERE_)/..
CICC_PATH        = $(TOP)/nvvm/bin
NVVMIR_LIBRARY_DIR = $(TOP)/nvvm/libdevice
PATH            += $(CICC_PATH):$(_HERE_):
INCLUDES        +=  "-I$(TOP)/include" $(_SPACE_)
LIBRARIES        =+ $(_SPACE_) "-L$(TOP)/lib64/stubs" "-L$(TOP)/lib64"
EOF
  fi
  echo "$home"
}

# Sourced (scripts/gpu-check.sh does) it only defines the toolkit functions.
if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then
  return 0
fi

status=0
results=()
for cuda in ${cudas//,/ }; do
  case "$cuda" in
    12) home="$(toolkit_12)" ;;
    13) home="$(toolkit_13)" ;;
    *) echo "unknown --cuda $cuda (12 or 13)" >&2; exit 2 ;;
  esac
  if [ -z "$home" ] || [ ! -x "$home/bin/nvcc" ]; then
    results+=("CUDA $cuda: toolkit could not be fetched"); status=1; continue
  fi
  libdir="$home/lib"; [ -d "$home/lib64" ] && libdir="$home/lib64"
  version="$("$home/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')"
  first="${archs%%,*}"
  for arch in ${archs//,/ }; do
    # The arch changes only candle's kernels (their PTX and the static library of its quantized
    # kernels), not a line of Rust: the first arch builds everything, the others the kernels and
    # the engine crate over them.
    if [ "$arch" = "$first" ]; then
      what=(--release --features cuda --locked)
      label="bin + libs"
      if [ "$tests" = 1 ]; then
        what+=(--workspace --all-targets); label="workspace, all targets"
      fi
    else
      # candle-kernels is an optional dependency: it is in the build only through a package
      # whose `cuda` feature pulls it in, and thinkrag-llm is the nearest.
      what=(--release --locked -p thinkrag-llm --features thinkrag-llm/cuda)
      label="candle-kernels and thinkrag-llm"
    fi
    log="$dir/build-cuda$cuda-sm$arch.log"
    say "CUDA $version, sm_$arch: cargo build ${what[*]} (log: $log)"
    start=$(date +%s)
    # One target directory: switching arch or toolkit rebuilds candle's kernels and what depends
    # on them, and reuses the rest. RUSTFLAGS replaces .cargo/config.toml's flags, so they are
    # repeated, and stays the same for every toolkit (library paths go in LIBRARY_PATH) so that
    # nothing else rebuilds; -D warnings applies to the workspace's crates only (cargo caps
    # dependencies' lints).
    env CUDA_HOME="$home" CUDA_PATH="$home" PATH="$home/bin:$PATH" CUDA_COMPUTE_CAP="$arch" \
      CARGO_TARGET_DIR="$root/target/cuda" LIBRARY_PATH="$libdir:$libdir/stubs" \
      RUSTFLAGS="-C target-cpu=native -D warnings" \
      cargo build "${what[@]}" --manifest-path "$root/Cargo.toml" > "$log" 2>&1
    rc=$?
    secs=$(( $(date +%s) - start ))
    if [ $rc -ne 0 ]; then
      tail -40 "$log" >&2
      results+=("CUDA $version sm_$arch ($label): FAILED after ${secs}s, see $log"); status=1
    elif grep -q "^warning" "$log"; then
      grep -A5 "^warning" "$log" | head -40 >&2
      results+=("CUDA $version sm_$arch ($label): warnings, see $log"); status=1
    else
      results+=("CUDA $version sm_$arch ($label): ok in ${secs}s")
    fi
  done
done
echo
printf '%s\n' "${results[@]}"
exit $status
