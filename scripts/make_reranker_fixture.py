#!/usr/bin/env python3
"""A tiny random cross-encoder reranker and its transformers scores, for the reranker's parity test.

Writes tests/fixtures/tiny-reranker: an XLM-RoBERTa sequence classifier with one label (the
architecture of bge-reranker-base and bge-reranker-v2-m3) and random weights (seed 11), a small
Unigram tokenizer trained here with XLM-R's special tokens and pair template
(`<s> A </s></s> B </s>`), saved by transformers itself, and reference.json: query/passage pairs
(short, long enough to be truncated, non-English, empty) with the logits
`XLMRobertaForSequenceClassification` gives them, batched with padding as rerankers are run. The
Rust test (crates/embed/tests/rerank.rs) must match them within 1e-4.

    python scripts/make_reranker_fixture.py [OUT_DIR]
"""
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

TRAINING_TEXT = [
    "Install packages without recommends: apt-get install --no-install-recommends foo.",
    "The population of the New York City metro area grew from 2021 to 2023.",
    "Run dpkg-reconfigure tzdata to change the time zone of a Debian system.",
    "Die Bevölkerung von Chicago ist leicht gesunken. 東京は日本の首都です。",
    "Retrieval-augmented generation grounds a model's answer in retrieved documents.",
    "systemctl mask getty@tty1 stops the login prompt on the first console.",
] * 20

PAIRS = [
    ("how do I skip recommended packages", "Pass --no-install-recommends to apt-get install."),
    ("how do I skip recommended packages", "The population of Miami rose in 2023."),
    ("time zone", "Run dpkg-reconfigure tzdata to change the time zone."),
    ("Bevölkerung Chicago", "Die Bevölkerung von Chicago ist leicht gesunken."),
    ("東京", "東京は日本の首都です。"),
    ("empty passage", ""),
    ("long", " ".join(["Retrieval-augmented generation grounds answers in documents."] * 30)),
]


def main() -> None:
    out = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests/fixtures/tiny-reranker"
    out.mkdir(parents=True, exist_ok=True)
    import tokenizers
    import torch
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers, decoders
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification, XLMRobertaTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=400, special_tokens=specials, unk_token="<unk>")
    tok.train_from_iterator(TRAINING_TEXT, trainer=trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    max_len = 64
    fast = XLMRobertaTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>", model_max_length=max_len,
    )
    fast.save_pretrained(out)

    torch.manual_seed(11)
    config = XLMRobertaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=max_len + 2, type_vocab_size=1, pad_token_id=1,
        bos_token_id=0, eos_token_id=2, num_labels=1, hidden_act="gelu",
    )
    model = XLMRobertaForSequenceClassification(config).eval()
    # Random but not tiny weights, so that every part of the network moves the score (layer
    # norms keep their unit scale, so the signal is not squashed on its way to the classifier).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.05)
            else:
                p.normal_(0.0, 0.3 if p.dim() > 1 else 0.1)
    model.save_pretrained(out, safe_serialization=True)

    enc = fast([q for q, _ in PAIRS], [p for _, p in PAIRS], padding=True, truncation=True,
               max_length=max_len, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits[:, 0].tolist()
    reference = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "tokenizers": tokenizers.__version__,
        "max_length": max_len,
        "pairs": [
            {"query": q, "passage": p, "input_ids": [i for i, m in zip(ids, mask) if m],
             "score": s}
            for (q, p), ids, mask, s in zip(PAIRS, enc["input_ids"].tolist(), enc["attention_mask"].tolist(), logits)
        ],
    }
    (out / "reference.json").write_text(json.dumps(reference, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {out}: scores {[round(s, 4) for s in logits]}")


if __name__ == "__main__":
    main()
