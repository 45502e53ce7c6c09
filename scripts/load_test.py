#!/usr/bin/env python3
"""Load test of an OpenAI-compatible server (thinkrag serve, llama.cpp's llama-server, ...):
C concurrent streaming clients, each sending R chat requests one after another, for each C in
--concurrency. Reports per C: aggregate decode tokens/s (completion tokens of all requests over
the wall time), time to first token and request latency (p50, p99).

Bounded by design: every request asks for exactly --max-tokens tokens (`ignore_eos`, which both
thinkrag and llama-server honour), and the loop runs C x R requests, then stops. Loopback only.

    thinkrag serve -m r1-1.5b-q4_k_m.gguf --threads 2 --port 8080 &
    python scripts/load_test.py --base http://127.0.0.1:8080 --concurrency 1,2,4,8 --json out.json

Standard library only.
"""
import argparse
import http.client
import json
import statistics
import threading
import time
import urllib.parse


def pct(values, p):
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def one_request(base, body, timeout):
    """Sends one streaming chat request; returns (ttft_s, latency_s, completion_tokens)."""
    url = urllib.parse.urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                 headers={"Content-Type": "application/json", "Authorization": "Bearer x"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    ttft = None
    tokens = None
    deltas = 0
    for raw in resp:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            raise RuntimeError(chunk["error"])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        for c in chunk.get("choices") or []:
            d = c.get("delta") or {}
            if d.get("content") or d.get("reasoning_content") or d.get("reasoning"):
                deltas += 1
                if ttft is None:
                    ttft = time.perf_counter() - start
    latency = time.perf_counter() - start
    conn.close()
    # Servers that send no usage chunk stream one token per delta (llama.cpp's does).
    return ttft if ttft is not None else latency, latency, tokens if tokens is not None else deltas


def run_level(base, concurrency, requests_each, body, timeout):
    results, errors = [], []
    lock = threading.Lock()

    def client(i):
        for r in range(requests_each):
            b = dict(body, seed=1000 * i + r)
            try:
                out = one_request(base, b, timeout)
                with lock:
                    results.append(out)
            except Exception as e:  # noqa: BLE001 - reported, not fatal to the others
                with lock:
                    errors.append(str(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttfts = [r[0] for r in results]
    lats = [r[1] for r in results]
    tokens = sum(r[2] for r in results)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "errors": errors,
        "wall_s": wall,
        "completion_tokens": tokens,
        "aggregate_tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "ttft_p50_ms": pct(ttfts, 50) * 1e3,
        "ttft_p99_ms": pct(ttfts, 99) * 1e3,
        "latency_p50_ms": pct(lats, 50) * 1e3,
        "latency_p99_ms": pct(lats, 99) * 1e3,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="server base URL, e.g. http://127.0.0.1:8080")
    ap.add_argument("--concurrency", default="1,2,4,8")
    ap.add_argument("--requests", type=int, default=2, help="requests per client per level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-words", type=int, default=60, help="length of the question")
    ap.add_argument("--top-k", type=int, default=40,
                    help="sent to every server: llama-server samples with top_k 40 unless told otherwise, "
                         "thinkrag (as the R1 generation_config) with none, which over random weights' "
                         "flat distribution sorts all 152k logits per token")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--label", default="server")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    question = ("Summarise the population trends of the largest metropolitan areas. " * 20).split()
    body = {
        "model": "any",
        "messages": [{"role": "user", "content": " ".join(question[: args.prompt_words])}],
        "max_tokens": args.max_tokens,
        "temperature": 0.6,
        "top_k": args.top_k,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    # Warm-up: first-touch allocations and weight repacking are not what is measured.
    one_request(args.base, dict(body, max_tokens=4), args.timeout)
    levels = [run_level(args.base, int(c), args.requests, body, args.timeout) for c in args.concurrency.split(",")]
    print(f"| {args.label} | clients | requests | agg. tok/s | TTFT p50 ms | TTFT p99 ms | latency p50 ms | latency p99 ms | errors |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in levels:
        print(f"| {args.label} | {r['concurrency']} | {r['requests']} | {r['aggregate_tokens_per_s']:.2f} | "
              f"{r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | {r['latency_p50_ms']:.0f} | "
              f"{r['latency_p99_ms']:.0f} | {len(r['errors'])} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"label": args.label, "body": body, "levels": levels}, f, indent=2)


if __name__ == "__main__":
    main()
