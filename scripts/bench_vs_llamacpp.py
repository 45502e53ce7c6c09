"""thinkrag against llama.cpp on the same quantized GGUF files of the DeepSeek-R1-Distill-Qwen-1.5B shape.

Both engines run the same files with the same thread count, on the CPU, in one run: prefill of a
512-token prompt (pp512) and decode of 128 tokens after 100 cached tokens (tg128@100), Q8_0 and
Q4_K_M, several runs each, medians reported. thinkrag also reports decode after 4,000 cached tokens.

The files (random weights: speed does not depend on their values):
  1. `thinkrag synth` writes bf16 safetensors of the exact shape with the real Qwen2 tokenizer;
  2. `thinkrag quantize --to q8_0` exports the Q8_0 GGUF (so llama.cpp also checks our export);
  3. llama.cpp's own quantizer turns that into Q4_K_M (its Q4_K/Q6_K mix), which thinkrag loads.

The peer is llama.cpp through the PyPI package llama-cpp-python, built from source CPU-only with
native instructions:
  CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_CUDA=OFF" pip install llama-cpp-python --no-binary llama-cpp-python
On a VM whose CPU lists AMX but whose hypervisor does not grant the tiles, that build dies with
SIGILL (`tilezero` in ggml's AMX matmul); spell the instruction sets out instead:
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_CUDA=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON
    -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON
    -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" pip install ...

usage (from the repository root, after `cargo build --release`):
  python scripts/bench_vs_llamacpp.py --work /tmp/bench-gguf --tokenizer /tmp/qwen-tok/tokenizer.json
The tokenizer comes from ../shared/scripts/make-qwen2-tokenizer.py.

Other shapes: `--gguf FILE` (repeatable) benches the given files instead of writing the 1.5B ones,
e.g. the 8B shape's Q4_K_M and Q8_0 from `thinkrag synth deepseek-r1-distill-llama-8b` and
`thinkrag quantize --to q4_k_m|q8_0` (or `thinkrag synth ... --quantize q4_k_m --out F.gguf`):
  python scripts/bench_vs_llamacpp.py --gguf /tmp/l8b-q4km.gguf --runs 2 --positions 100
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sh(*cmd, **kw):
    print("+", " ".join(map(str, cmd)), file=sys.stderr, flush=True)
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def make_files(args, thinkrag):
    src = os.path.join(args.work, "r1-1.5b")
    if not os.path.exists(os.path.join(src, "model.safetensors")):
        sh(thinkrag, "synth", "deepseek-r1-distill-qwen-1.5b", "--out", src, "--tokenizer", args.tokenizer)
    q8 = os.path.join(args.work, "r1-1.5b-q8_0.gguf")
    if not os.path.exists(q8):
        sh(thinkrag, "quantize", "--model", src, "--to", "q8_0", "--out", q8, "--threads", args.threads)
    q4km = os.path.join(args.work, "r1-1.5b-q4_k_m.gguf")
    if not os.path.exists(q4km):
        import llama_cpp
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
        params.allow_requantize = True
        params.nthread = args.threads
        rc = llama_cpp.llama_model_quantize(q8.encode(), q4km.encode(), params)
        if rc != 0:
            raise SystemExit(f"llama.cpp quantize failed: {rc}")
    return src, {"Q8_0": q8, "Q4_K_M": q4km}


def prompt_ids(n, vocab, seed):
    # The same scheme as thinkrag's bench_tokens: ids spread over the real vocabulary (a stand-in
    # tokenizer's few ids for the files written with one).
    import random
    r = random.Random(seed)
    margin = min(1000, vocab // 4)
    return [r.randrange(margin, vocab - margin) for _ in range(n)]


def bench_llamacpp(path, args):
    import llama_cpp
    llm = llama_cpp.Llama(model_path=path, n_ctx=1024, n_batch=512, n_ubatch=512,
                          n_threads=args.threads, n_threads_batch=args.threads,
                          use_mmap=True, verbose=False)
    vocab = llm.n_vocab()
    pp, tg = [], []
    prompt = prompt_ids(512, min(vocab, 151000), 1)
    # warm-up: one prefill and a few decode steps
    llm.reset(); llm.eval(prompt[:64])
    for _ in range(args.runs):
        llm.reset()
        t = time.perf_counter(); llm.eval(prompt); pp.append(512 / (time.perf_counter() - t))
    gen = prompt_ids(128, min(vocab, 151000), 2)
    for _ in range(args.runs):
        llm.reset(); llm.eval(prompt[:100])
        t = time.perf_counter()
        for tok in gen:
            llm.eval([tok])
        tg.append(128 / (time.perf_counter() - t))
    del llm
    return {"pp512": pp, "tg128@100": tg, "vocab": vocab}


def bench_thinkrag(thinkrag, model, args, extra=()):
    out = subprocess.run([thinkrag, "bench", "--model", model, "--threads", str(args.threads),
                          "--device", "cpu", "-p", "512", "-n", "128", "--positions", args.positions,
                          "-r", str(args.runs), "--json", *extra],
                         check=True, capture_output=True, text=True).stdout
    v = json.loads(out)
    res = {}
    for r in v["results"]:
        res[r["test"]] = r["runs"]
    return res, v


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", help="where the 1.5B files are written (not with --gguf)")
    ap.add_argument("--tokenizer", help="the Qwen2 tokenizer.json for the 1.5B files")
    ap.add_argument("--gguf", action="append", default=[],
                    help="bench this GGUF file instead of writing the 1.5B ones (repeatable)")
    ap.add_argument("--positions", default="100,4000",
                    help="thinkrag's decode positions (llama.cpp's decode is at 100)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quantize-at-load", action="store_true",
                    help="also bench thinkrag quantizing the bf16 safetensors at load (q8_0)")
    ap.add_argument("--json", help="write all runs here")
    args = ap.parse_args()
    thinkrag = os.path.join(ROOT, "target", "release", "thinkrag")
    if args.gguf:
        if args.quantize_at_load:
            raise SystemExit("--quantize-at-load needs the 1.5B files: leave out --gguf")
        src, files = None, {os.path.basename(f): f for f in args.gguf}
    else:
        if not (args.work and args.tokenizer):
            raise SystemExit("give --work and --tokenizer (to write the 1.5B files), or --gguf FILE")
        os.makedirs(args.work, exist_ok=True)
        src, files = make_files(args, thinkrag)

    import llama_cpp
    print(f"llama-cpp-python {llama_cpp.__version__}; {args.threads} threads; {args.runs} runs; medians",
          file=sys.stderr)
    rows, record = [], {}
    for quant, path in files.items():
        # Alternate engines so drift on this shared machine hits both alike.
        t_res, t_meta = bench_thinkrag(thinkrag, path, args)
        l_res = bench_llamacpp(path, args)
        record[quant] = {"thinkrag": t_res, "llama.cpp": l_res, "thinkrag_weights": t_meta.get("weights"),
                         "file_bytes": os.path.getsize(path)}
        for test in ["pp512", "tg128@100"]:
            t, l = statistics.median(t_res[test]), statistics.median(l_res[test])
            rows.append((quant, test, t, l, t / l))
        if "tg128@4000" in t_res:
            t100, t4000 = statistics.median(t_res["tg128@100"]), statistics.median(t_res["tg128@4000"])
            rows.append((quant, "tg128@4000", t4000, None, t4000 / t100))
    if args.quantize_at_load:
        t_res, _ = bench_thinkrag(thinkrag, src, args, ["--quantize", "q8_0"])
        record["Q8_0 (quantize at load)"] = {"thinkrag": t_res}
        for test in ["pp512", "tg128@100"]:
            rows.append(("Q8_0 at load", test, statistics.median(t_res[test]), None, None))

    print("| weights | test | thinkrag t/s | llama.cpp t/s | ratio |")
    print("| --- | --- | ---: | ---: | ---: |")
    for quant, test, t, l, ratio in rows:
        if l is not None:
            print(f"| {quant} | {test} | {t:.2f} | {l:.2f} | {ratio:.2f}x |")
        elif ratio is not None:
            print(f"| {quant} | {test} | {t:.2f} | - | {ratio:.2f}x of tg128@100 |")
        else:
            print(f"| {quant} | {test} | {t:.2f} | - | - |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
