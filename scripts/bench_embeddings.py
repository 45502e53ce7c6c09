#!/usr/bin/env python3
"""Embedding throughput, thinkrag against sentence-transformers, same passages, same run.

Times sentence-transformers (all-MiniLM-L6-v2 from the PyPI wheel, CPU, batch 32, the given
number of torch threads) on benches/data/passages.jsonl, then runs thinkrag's criterion bench
(`cargo bench --bench retrieval -- embed`) on the same file, and prints passages/s for both and the
ratio. `--write-passages` regenerates the committed passage file (deterministic).

    pip install sentence-transformers && scripts/fetch-test-models.sh
    python scripts/bench_embeddings.py --threads 2 --runs 3
"""
import argparse
import json
import pathlib
import random
import statistics
import subprocess
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
PASSAGES = ROOT / "benches/data/passages.jsonl"

WORDS = (
    "population metro area growth increase decline city county census estimate annual rate housing "
    "economy jobs migration commuters region transit density suburbs downtown residents households "
    "income report chart table projection decade century river harbor airport university hospital "
    "manufacturing technology services tourism port bridge highway rail climate coastal inland"
).split()


def write_passages(n: int = 256) -> None:
    """Passages of 40-180 words: the lengths a RAG chunker produces (about 60-250 tokens)."""
    rng = random.Random(7)
    with PASSAGES.open("w") as f:
        for i in range(n):
            sentences = []
            for _ in range(rng.randint(4, 14)):
                words = [rng.choice(WORDS) for _ in range(rng.randint(8, 14))]
                words[0] = words[0].capitalize()
                sentences.append(" ".join(words) + f" in {1950 + rng.randint(0, 73)}.")
            f.write(json.dumps({"id": i, "text": " ".join(sentences)}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--passages", type=int, default=64, help="how many of the file's passages")
    ap.add_argument("--model", default=str(ROOT / ".work/models/all-minilm-l6-v2"))
    ap.add_argument("--write-passages", action="store_true")
    ap.add_argument("--skip-thinkrag", action="store_true")
    args = ap.parse_args()
    if args.write_passages or not PASSAGES.exists():
        write_passages()
    texts = [json.loads(line)["text"] for line in PASSAGES.open()][: args.passages]

    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    model = SentenceTransformer(args.model, device="cpu")
    model.encode(texts[:64], batch_size=args.batch_size)  # warm-up
    times = []
    for _ in range(args.runs):
        t = time.perf_counter()
        model.encode(texts, batch_size=args.batch_size, normalize_embeddings=True)
        times.append(time.perf_counter() - t)
    st = len(texts) / statistics.median(times)
    print(f"sentence-transformers {torch.__version__}: {st:.1f} passages/s "
          f"(median of {args.runs}, {len(texts)} passages, batch {args.batch_size}, {args.threads} threads)")
    if args.skip_thinkrag:
        return

    env = {
        "THINKRAG_BENCH_THREADS": str(args.threads),
        "THINKRAG_BENCH_PASSAGES": str(len(texts)),
        "RAYON_NUM_THREADS": str(args.threads),
    }
    import os

    subprocess.run(
        ["cargo", "bench", "--bench", "retrieval", "--", "embed"],
        cwd=ROOT, env={**os.environ, **env}, check=True,
    )
    est = json.loads((ROOT / "target/criterion/embed/minilm_batch32/new/estimates.json").read_text())
    secs = est["median"]["point_estimate"] / 1e9
    ours = len(texts) / secs
    print(f"thinkrag: {ours:.1f} passages/s (criterion median)")
    print(f"ratio thinkrag / sentence-transformers: {ours / st:.2f}x")


if __name__ == "__main__":
    main()
