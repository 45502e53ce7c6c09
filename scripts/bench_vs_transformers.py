"""Side-by-side speed of thinkrag and Hugging Face transformers on the same weights, same machine,
same run: prefill of N prompt tokens (ppN) and decode of M tokens (tgM) at KV positions ~100 and
~4,000, f32, a fixed thread count, several runs, medians.

Decode at position P starts from a KV cache filled with P positions of random values on both sides
(speed does not depend on the values), so a 4,000-token prefill is not paid before each run.

usage (the model directory comes from `thinkrag synth deepseek-r1-distill-qwen-1.5b --out DIR`):
  pip install torch transformers
  cargo build --release
  python scripts/bench_vs_transformers.py DIR [--threads 2] [--runs 3] [--thinkrag target/release/thinkrag]
"""
import argparse, json, statistics, subprocess, sys, time


def bench_thinkrag(binary, model, a):
    cmd = [binary, "bench", "--model", model, "--device", "cpu", "--dtype", "f32",
           "--threads", str(a.threads), "-p", str(a.prompt_tokens), "-n", str(a.gen_tokens),
           "--positions", ",".join(map(str, a.positions)), "-r", str(a.runs), "--json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return {r["test"]: r for r in json.loads(out)["results"]}


def bench_transformers(model_dir, a):
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    torch.set_num_threads(a.threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    results = {}
    kv_heads, head_dim = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads

    with torch.inference_mode():
        ids = torch.randint(0, min(150000, cfg.vocab_size), (1, a.prompt_tokens), generator=g)
        model(ids[:, :16], use_cache=True, logits_to_keep=1)  # warm-up, untimed
        rates = []
        for _ in range(a.runs):
            t = time.perf_counter()
            out = model(ids, use_cache=True, logits_to_keep=1)
            out.logits.float().argmax(-1)
            rates.append(a.prompt_tokens / (time.perf_counter() - t))
        results[f"pp{a.prompt_tokens}"] = {"tokens_per_s": statistics.median(rates), "runs": rates}

        for pos in a.positions:
            rates = []
            for _ in range(a.runs):
                cache = DynamicCache()
                for layer in range(cfg.num_hidden_layers):
                    k = torch.randn(1, kv_heads, pos, head_dim, generator=g)
                    v = torch.randn(1, kv_heads, pos, head_dim, generator=g)
                    cache.update(k, v, layer)
                tok = torch.randint(0, min(150000, cfg.vocab_size), (1, 1), generator=g)
                t = time.perf_counter()
                for i in range(a.gen_tokens):
                    p = torch.tensor([[pos + i]])
                    out = model(tok, past_key_values=cache, use_cache=True, position_ids=p,
                                cache_position=p[0])
                    tok = out.logits[:, -1].float().argmax(-1, keepdim=True)
                rates.append(a.gen_tokens / (time.perf_counter() - t))
            results[f"tg{a.gen_tokens}@{pos}"] = {"tokens_per_s": statistics.median(rates), "runs": rates}
    return results


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--thinkrag", default="target/release/thinkrag")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--positions", type=lambda s: [int(x) for x in s.split(",")], default=[100, 4000])
    p.add_argument("--json", action="store_true")
    a = p.parse_args()

    ours = bench_thinkrag(a.thinkrag, a.model, a)
    theirs = bench_transformers(a.model, a)
    rows = []
    for test in ours:
        o, t = ours[test]["tokens_per_s"], theirs[test]["tokens_per_s"]
        rows.append({"test": test, "thinkrag": o, "transformers": t, "ratio": o / t,
                     "thinkrag_runs": ours[test]["runs"], "transformers_runs": theirs[test]["runs"]})
    if a.json:
        print(json.dumps({"threads": a.threads, "dtype": "f32", "rows": rows}, indent=2))
        return
    print(f"f32, {a.threads} threads, median of {a.runs} runs (tokens/s)")
    print("| test | thinkrag | transformers | ratio |")
    print("| --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['test']} | {r['thinkrag']:.2f} | {r['transformers']:.2f} | {r['ratio']:.2f}x |")


if __name__ == "__main__":
    sys.exit(main())
