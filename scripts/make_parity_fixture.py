#!/usr/bin/env python3
"""Build the tiny random-weight parity fixtures (tests/fixtures/tiny-qwen2, tests/fixtures/tiny-llama).

Writes a complete model directory shaped like DeepSeek-R1-Distill-Qwen (Qwen2 architecture, byte-level
BPE tokenizer with DeepSeek's 22 added tokens, the official chat template) or, with --arch llama, like
DeepSeek-R1-Distill-Llama (Llama 3.1: no q/k/v biases, llama3 RoPE scaling, Llama 3's split regex and
added-token block with DeepSeek's tokens at their relative ids, config.json in transformers 5's layout
with rope_parameters and dtype) but tiny, with random weights,
plus reference outputs computed by Hugging Face transformers (float32, CPU, eager attention). The Rust
tests compare the engine's tokenizer, chat rendering, prefill/decode logits, greedy tokens and KV-cache
prefix reuse against these.

usage (from the repository root):
  python scripts/make_parity_fixture.py [--arch qwen2|llama] [OUT_DIR]
  # default OUT_DIR: tests/fixtures/tiny-qwen2 or tests/fixtures/tiny-llama

Needs: torch, transformers, tokenizers, safetensors, numpy. Deterministic: fixed seeds, CPU only.
"""
import hashlib
import json
import math
import os
import sys

import numpy as np
import torch
import tokenizers
import transformers
from safetensors.torch import save_file, load_file
from tokenizers import Tokenizer, Regex, AddedToken, normalizers, pre_tokenizers, decoders
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

ARCH = "qwen2"
if len(sys.argv) > 2 and sys.argv[1] == "--arch":
    ARCH = sys.argv[2]
    del sys.argv[1:3]
assert ARCH in ("qwen2", "llama"), ARCH
LLAMA = ARCH == "llama"
# chosen: greedy avoids EOS and all added tokens; min top-1/top-2 margin 0.23 (qwen2), 0.53 (llama)
SEED = int(os.environ.get("FIXTURE_SEED", "5" if LLAMA else "24"))
BPE_VOCAB = 448            # trained vocabulary incl. the 256-symbol byte-level alphabet
HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 256, 256, 3, 4, 2  # multiples of 256: every k-quant applies
N_DECODE = 6
N_GREEDY = 24
N_REASONING = 12           # greedy tokens reused as turn-1 reasoning in turn 2
MIN_MARGIN = 1e-3
TOL = 1e-4

# Qwen2 pre-tokenizer pattern (same as /work/shared/scripts/make-qwen2-tokenizer.py).
PAT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# Llama 3's split: numbers in runs of up to three digits (tokenizer.json of Llama 3.1 and the Llama distills).
LLAMA_PAT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
if LLAMA:
    PAT = LLAMA_PAT

# DeepSeek-R1-Distill-Qwen's 22 added tokens, in id order (real ids 151643..151664), with "special" flags.
ADDED = [("<｜end▁of▁sentence｜>", True), ("<｜User｜>", False), ("<｜Assistant｜>", False),
         ("<｜begin▁of▁sentence｜>", True), ("<|EOT|>", False), ("<think>", False), ("</think>", False),
         ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
         ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False),
         ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False),
         ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False)]
# DeepSeek-R1-Distill-Llama keeps Llama 3's block of 256 added tokens (real ids 128000..128255, all
# special) with DeepSeek's renamed at the start; the first 16, in order (relative ids 0..15).
LLAMA_ADDED = [("<｜begin▁of▁sentence｜>", True), ("<｜end▁of▁sentence｜>", True),
               ("<|reserved_special_token_0|>", True), ("<|reserved_special_token_1|>", True),
               ("<|finetune_right_pad_id|>", True), ("<|reserved_special_token_2|>", True),
               ("<|start_header_id|>", True), ("<|end_header_id|>", True), ("<|eom_id|>", True),
               ("<|eot_id|>", True), ("<|python_tag|>", True), ("<｜User｜>", True), ("<｜Assistant｜>", True),
               ("<think>", True), ("</think>", True), ("<|reserved_special_token_7|>", True)]
if LLAMA:
    ADDED = LLAMA_ADDED
EOS, USER, ASSISTANT, BOS, THINK_OPEN, THINK_CLOSE = (
    "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜begin▁of▁sentence｜>", "<think>", "</think>")

CORPUS = """\
Tokyo is the capital of Japan. The population of Tokyo is about 14 million people, and the greater Tokyo area has more than 37 million.
Paris is the capital of France. About 2.1 million people live in the city of Paris, and about 12 million live in the wider region.
London is the largest city in the United Kingdom, with a population of nearly 9 million.
New York City has five boroughs: Manhattan, Brooklyn, Queens, the Bronx and Staten Island.
Berlin became the capital of Germany again in 1990. Its population is about 3.7 million.
Cairo is the largest city in Africa and sits on the river Nile.
Sydney is the most populous city in Australia, but Canberra is the capital.
Mexico City is built on the bed of an old lake, at an altitude of about 2,240 metres.
Which city has the larger population, Paris or London? London has the larger population.
What is the capital of Canada? The capital of Canada is Ottawa, not Toronto.
Okay, so the question asks for the population of the city. Let me think about this step by step.
Okay, so I need to find the sum of the numbers. Let me think. First, I add 12 and 30, which gives 42.
Let me think about what the question is really asking. Wait, maybe I should check that again.
Hmm, let me double-check the calculation. 7 times 6 is 42, so the answer is 42.
So the answer is 42. Therefore, the final answer is 42.
Let me verify: 100 divided by 4 is 25, and 25 plus 17 is 42. Yes, that works.
If x + 3 = 10, then x = 7. If 2x = 18, then x = 9. So x is 9.
The square root of 144 is 12, and 12 squared is 144. The cube of 3 is 27.
A triangle has three sides. The sum of the angles in a triangle is 180 degrees.
One thousand is 1000, one million is 1000000, and one billion is 1000000000.
The number 17 is prime, but 21 is not, because 21 = 3 * 7.
Okay, so the population grew from 1.2 million in 1950 to 4.8 million in 2020. That is four times larger.
Let me think about the ratio: 4.8 divided by 1.2 is 4. So the population grew by a factor of 4.
First, I will list the cities. Then I will compare their populations. Finally, I will give the answer.
Wait, I think I made a mistake. Let me recompute: 15 + 27 = 42, not 43.
The answer is 42. The answer is twelve. The answer is Paris. The answer is yes.
Please reason step by step, and put your final answer within \\boxed{}.
So the final answer is \\boxed{42}.
It's a simple problem, but we'll solve it carefully. I'm sure they've seen it before, and you'd agree.
What is 3 + 4? Let me think. 3 + 4 = 7. So the answer is 7.
What is the population of Tokyo? Okay, so Tokyo is a very large city. The answer is about 14 million.
How many people live in Rome? Rome has about 2.8 million people. It is the capital of Italy.
Cities grow when people move from the countryside to find work. Many large cities are near rivers or the sea.
The river Thames flows through London, and the river Seine flows through Paris.
To solve the equation, subtract 5 from both sides, then divide by 2. The result is x = 4.
Let me think again. If the train travels 60 kilometres per hour for 3 hours, it travels 180 kilometres.
Okay, so we have 8 apples and we give away 3. Then we have 5 apples left.
The average of 10, 20 and 30 is 20, because (10 + 20 + 30) / 3 = 20.
Reasoning carefully means checking every step. Let me think about whether each step is correct.
Okay, so the city with the most people in the world is Tokyo, followed by Delhi and Shanghai.
In 2023, the population of the world was about 8 billion people.
The percentage is 25%, because 1 out of 4 is one quarter.
Let me think: half of 84 is 42. So the answer is 42.
"""


def log(*a):
    print(*a, flush=True)


def build_tokenizer():
    tk = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    if not LLAMA:
        tk.normalizer = normalizers.NFC()   # Llama 3 has no normalizer
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PAT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = BpeTrainer(vocab_size=BPE_VOCAB, min_frequency=2, show_progress=False, special_tokens=[],
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    n_bpe = tk.get_vocab_size()
    assert 400 <= n_bpe <= BPE_VOCAB, n_bpe
    assert tk.post_processor is None
    tk.add_tokens([AddedToken(t, special=sp, normalized=False) for t, sp in ADDED])
    for i, (t, _) in enumerate(ADDED):
        assert tk.token_to_id(t) == n_bpe + i, (t, tk.token_to_id(t))
    # The Python binding of decoders.ByteLevel ignores its keyword arguments (it serialises true/true/true);
    # write the flags Qwen2's published tokenizer.json has. Decoding does not depend on them.
    j = json.loads(tk.to_str())
    j["decoder"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    if LLAMA:
        j["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
        j["pre_tokenizer"]["pretokenizers"][1] = {"type": "ByteLevel", "add_prefix_space": False,
                                                  "trim_offsets": True, "use_regex": False}
    tk = Tokenizer.from_str(json.dumps(j, ensure_ascii=False))
    return tk, n_bpe


def llama_tokenizer_config(ref_dir, n_bpe):
    """The Llama distills' tokenizer_config.json: LlamaTokenizerFast with add_bos_token, the same chat
    template as the Qwen distills (compared by eye with the published file), pad = EOS."""
    ref = json.load(open(os.path.join(ref_dir, "tokenizer_config.json"), encoding="utf-8"))
    atd = {str(n_bpe + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False, "special": sp} for i, (t, sp) in enumerate(ADDED)}
    return {"add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": atd,
            "bos_token": BOS, "chat_template": ref["chat_template"], "clean_up_tokenization_spaces": False,
            "eos_token": EOS, "legacy": True, "model_max_length": 4096, "pad_token": EOS,
            "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizerFast", "unk_token": None,
            "use_default_system_prompt": False}


def tokenizer_config(ref_dir, n_bpe):
    if LLAMA:
        return llama_tokenizer_config(ref_dir, n_bpe)
    ref = json.load(open(os.path.join(ref_dir, "tokenizer_config.json"), encoding="utf-8"))
    ref_decoder = ref["added_tokens_decoder"]
    by_content = {v["content"]: v for v in ref_decoder.values()}
    atd = {}
    for i, (t, sp) in enumerate(ADDED):
        if t in by_content:
            e = dict(by_content[t])
            assert e["special"] == sp, t
        else:
            e = {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": sp}
        atd[str(n_bpe + i)] = e
    assert len(by_content) == sum(1 for v in atd.values() if v["content"] in by_content)
    out = {}
    for k, v in ref.items():   # keep the reference key order
        out[k] = atd if k == "added_tokens_decoder" else v
    out["model_max_length"] = 4096
    return out


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            shape = p.shape
            n = lambda: torch.randn(shape, generator=g, dtype=torch.float32)
            if name.endswith("norm.weight") or "layernorm" in name:
                v = 1.0 + 0.1 * n()
            elif name == "model.embed_tokens.weight":
                v = n()
            elif name == "lm_head.weight":
                v = 0.5 * n()
            elif name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
                v = 0.5 * n()
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                v = 1.5 * n() / math.sqrt(shape[1])
            elif name.endswith(".weight") and p.dim() == 2:
                v = n() / math.sqrt(shape[1])
            else:
                raise SystemExit(f"unexpected parameter {name}")
            p.copy_(v)


def margin(row, tok_size):
    top = torch.topk(row[:tok_size].double(), 2).values
    return float(top[0] - top[1])


def main():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(repo, "tests", "fixtures", f"tiny-{ARCH}")
    ref_dir = os.environ.get("THINKRAG_REFERENCE_DIR", "/work/shared/reference/deepseek-r1-distill-qwen-1.5b")
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    torch.set_num_threads(1)   # reproducible float reductions

    # 1. tokenizer.json
    tk, n_bpe = build_tokenizer()
    tk.save(os.path.join(out, "tokenizer.json"))
    tok_size = tk.get_vocab_size(with_added_tokens=True)
    assert tok_size == n_bpe + len(ADDED)
    ids = {name: n_bpe + [t for t, _ in ADDED].index(t) for name, t in
           [("eos", EOS), ("user", USER), ("assistant", ASSISTANT), ("bos", BOS),
            ("think_open", THINK_OPEN), ("think_close", THINK_CLOSE)]}
    vocab_size = (tok_size + 63) // 64 * 64 + 64
    log(f"bpe {n_bpe}  tokenizer size {tok_size}  vocab_size {vocab_size}  ids {ids}")

    # 2. tokenizer_config.json
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_config(ref_dir, n_bpe), f, ensure_ascii=False, indent=2)
        f.write("\n")

    # 3. config.json (hand-written in the published layout: rope_theta, sliding_window null, ...)
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": ids["eos"],      # the published config's quirk: bos_token_id == eos id
        "eos_token_id": ids["eos"],
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": INTER,
        "max_position_embeddings": 4096,
        "max_window_layers": LAYERS,
        "model_type": "qwen2",
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": transformers.__version__,
        "use_cache": True,
        "use_mrope": False,
        "use_sliding_window": False,
        "vocab_size": vocab_size,
    }
    if LLAMA:
        # Written by transformers 5 itself (rope_parameters, dtype): the layout new tools save.
        from transformers import LlamaConfig
        LlamaConfig(
            vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HIDDEN // HEADS,
            hidden_act="silu", max_position_embeddings=4096, rms_norm_eps=1e-05,
            bos_token_id=ids["bos"], eos_token_id=ids["eos"], tie_word_embeddings=False,
            attention_bias=False, mlp_bias=False, dtype="float32",
            # original_max_position_embeddings 32 (8,192 in the real model) so that the scaling's
            # three bands (kept, blended, divided) all shape these short sequences.
            rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 32},
        ).save_pretrained(out)
        written = json.load(open(os.path.join(out, "config.json")))
        assert "rope_parameters" in written and "rope_theta" not in written, written
        assert "dtype" in written and "torch_dtype" not in written, written
        os.remove(os.path.join(out, "generation_config.json")) if os.path.exists(
            os.path.join(out, "generation_config.json")) else None
    else:
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")

    # 4. generation_config.json
    gen = {"_from_model_config": True, "bos_token_id": ids["bos"], "eos_token_id": ids["eos"],
           "do_sample": True, "temperature": 0.6, "top_p": 0.95,
           "transformers_version": transformers.__version__}
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
        f.write("\n")

    # 5. model.safetensors: every parameter random (biases and norms included)
    from transformers import (Qwen2Config, Qwen2ForCausalLM, LlamaConfig, LlamaForCausalLM, AutoTokenizer,
                              PreTrainedTokenizerFast, GenerationConfig)
    ConfigClass, ModelClass = (LlamaConfig, LlamaForCausalLM) if LLAMA else (Qwen2Config, Qwen2ForCausalLM)
    cfg = ConfigClass.from_pretrained(out)
    assert cfg.vocab_size == vocab_size and cfg.num_key_value_heads == KV_HEADS
    rope = getattr(cfg, "rope_parameters", None) or {"rope_theta": cfg.rope_theta}
    assert float(rope["rope_theta"]) == 10000.0, rope
    if LLAMA:
        assert rope["rope_type"] == "llama3" and not cfg.tie_word_embeddings, rope
    else:
        assert cfg.sliding_window is None
        assert all(t == "full_attention" for t in getattr(cfg, "layer_types", ["full_attention"]))
    torch.manual_seed(SEED)
    m0 = ModelClass(cfg).float()
    randomize(m0, SEED)
    sd = {k: v.detach().clone().contiguous() for k, v in m0.named_parameters()}
    if LLAMA:
        assert not any(k.endswith(".bias") for k in sd), sorted(sd)
    assert "lm_head.weight" in sd and not torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
    save_file(sd, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    del m0

    # Reload exactly as a user would, and check the weights round-tripped.
    model = ModelClass.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    loaded = dict(model.named_parameters())
    assert set(loaded) == set(sd), set(loaded) ^ set(sd)
    for k, v in sd.items():
        assert torch.equal(loaded[k], v), k
    for k, v in sd.items():   # nothing left at HF's default init (zero biases, unit norms)
        assert v.std() > 0.03, k

    # What users load: AutoTokenizer (tokenizer_class LlamaTokenizerFast for the Llama distills).
    tok = (AutoTokenizer if LLAMA else PreTrainedTokenizerFast).from_pretrained(out)
    assert len(tok) == tok_size, (len(tok), tok_size)
    for name, i in ids.items():
        assert tok.convert_ids_to_tokens(i) == {"eos": EOS, "user": USER, "assistant": ASSISTANT, "bos": BOS,
                                                 "think_open": THINK_OPEN, "think_close": THINK_CLOSE}[name]
    assert tok.bos_token_id == ids["bos"] and tok.eos_token_id == ids["eos"] and tok.pad_token_id == ids["eos"]

    def enc(text):
        a = tok(text, add_special_tokens=False)["input_ids"]
        b = tk.encode(text, add_special_tokens=False).ids
        assert a == b, (text, a, b)
        return a

    def fwd(input_ids, past=None):
        x = torch.tensor([input_ids], dtype=torch.long)
        with torch.no_grad():
            o = model(input_ids=x, past_key_values=past, use_cache=True)
        return o.logits[0].float(), o.past_key_values

    # 6. references. Turn 1.
    q1 = "Okay, what is the population of Tokyo, and which city is the capital of Japan? Let me think."
    q2 = "Which city has the larger population, Paris or London?"
    msgs1 = [{"role": "user", "content": q1}]
    prompt_text = tok.apply_chat_template(msgs1, add_generation_prompt=True, tokenize=False)
    assert prompt_text == BOS + USER + q1 + ASSISTANT + THINK_OPEN + "\n", prompt_text
    prompt_ids = enc(prompt_text)
    assert prompt_ids[0] == ids["bos"] and prompt_ids.count(ids["bos"]) == 1
    # What transformers feeds the model: the template writes BOS, and apply_chat_template tokenizes
    # without adding another (the Llama tokenizer's own add_bos_token would add one to plain text).
    templated = tok.apply_chat_template(msgs1, add_generation_prompt=True, tokenize=True)
    if not isinstance(templated, list):
        templated = templated["input_ids"]
    assert list(templated) == prompt_ids, (templated, prompt_ids)
    tail = enc(ASSISTANT + THINK_OPEN + "\n")
    assert tail[:2] == [ids["assistant"], ids["think_open"]] and len(tail) == 3
    assert prompt_ids[-3:] == tail, (prompt_ids[-3:], tail)
    log(f"prompt {len(prompt_ids)} tokens")

    prefill_logits, past = fwd(prompt_ids)
    assert prefill_logits.shape == (len(prompt_ids), vocab_size)

    margins = []
    decode_ids, decode_logits = [], []
    last = prefill_logits[-1]
    for _ in range(N_DECODE):
        margins.append(margin(last, tok_size))
        t = int(torch.argmax(last[:tok_size]))
        decode_ids.append(t)
        lg, past = fwd([t], past)
        last = lg[-1]
        decode_logits.append(last.clone())
    margins.append(margin(last, tok_size))
    decode_logits = torch.stack(decode_logits)
    # Cached decode must equal a cold forward over the whole sequence.
    cold, _ = fwd(prompt_ids + decode_ids)
    d = (cold[len(prompt_ids):] - decode_logits).abs().max().item()
    assert d < TOL, d

    # Greedy, exactly N_GREEDY tokens: no EOS stop, ids >= tokenizer size suppressed (-inf). Replace the
    # in-memory generation config (not the saved file) so generate() merges none of its defaults
    # (eos_token_id, do_sample, temperature, top_p) back in.
    model.generation_config = GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=N_GREEDY, min_new_tokens=0, eos_token_id=None,
        bos_token_id=ids["bos"], pad_token_id=ids["eos"], suppress_tokens=list(range(tok_size, vocab_size)),
        return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        go = model.generate(torch.tensor([prompt_ids]),
                            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long))
    greedy_ids = go.sequences[0, len(prompt_ids):].tolist()
    assert len(greedy_ids) == N_GREEDY, len(greedy_ids)
    assert greedy_ids[:N_DECODE] == decode_ids, (greedy_ids, decode_ids)
    assert all(t < tok_size for t in greedy_ids)
    assert ids["eos"] not in greedy_ids, "greedy run hits EOS: pick another SEED"
    for lg in go.logits:
        margins.append(margin(lg[0], tok_size))
    # Independent check of greedy_ids with a cold forward.
    cold, _ = fwd(prompt_ids + greedy_ids[:-1])
    manual = torch.argmax(cold[len(prompt_ids) - 1:, :tok_size], dim=-1).tolist()
    assert manual == greedy_ids, (manual, greedy_ids)
    for row in cold[len(prompt_ids) - 1:]:
        margins.append(margin(row, tok_size))
    log(f"greedy {greedy_ids}\n  text {tok.decode(greedy_ids)!r}\n  min top1-top2 margin {min(margins):.4g}")
    assert min(margins) > MIN_MARGIN, f"margin {min(margins)} too small: change SEED or scales"
    assert len(set(greedy_ids)) > 3, "degenerate greedy output"

    # Turn 2: the turn-1 answer holds reasoning + </think> + answer; the template drops the reasoning.
    reasoning_ids = greedy_ids[:N_REASONING]
    reasoning_text = tok.decode(reasoning_ids)
    answer_text = "\n\nThe answer is 42."
    assistant_content = reasoning_text + THINK_CLOSE + answer_text
    msgs2 = [msgs1[0], {"role": "assistant", "content": assistant_content}, {"role": "user", "content": q2}]
    turn2_text = tok.apply_chat_template(msgs2, add_generation_prompt=True, tokenize=False)
    assert reasoning_text and reasoning_text not in turn2_text
    assert turn2_text == (BOS + USER + q1 + ASSISTANT + answer_text + EOS + USER + q2 + ASSISTANT + THINK_OPEN + "\n"), turn2_text
    turn2_ids = enc(turn2_text)
    # What a turn-1 KV cache holds: the prompt plus the assistant content as the model generated it
    # (reasoning ids, </think>, the answer; the final EOS is sampled but never fed, and would not change this).
    turn1_assistant_ids = reasoning_ids + [ids["think_close"]] + enc(answer_text)
    turn1_full_ids = prompt_ids + turn1_assistant_ids
    p = 0
    while p < min(len(turn1_full_ids), len(turn2_ids)) and turn1_full_ids[p] == turn2_ids[p]:
        p += 1
    turn2_prefix_len = p
    assert turn2_prefix_len == len(prompt_ids) - 2, (turn2_prefix_len, len(prompt_ids))  # up to <｜Assistant｜>
    assert turn2_ids[turn2_prefix_len - 1] == ids["assistant"]
    log(f"turn2 {len(turn2_ids)} tokens, reusable prefix {turn2_prefix_len}")

    turn2_cold_logits, _ = fwd(turn2_ids)
    _, past2 = fwd(turn2_ids[:turn2_prefix_len])
    turn2_warm_logits, _ = fwd(turn2_ids[turn2_prefix_len:], past2)
    d = (turn2_warm_logits - turn2_cold_logits[turn2_prefix_len:]).abs().max().item()
    log(f"turn2 warm vs cold max |diff| {d:.3g}")
    assert d < TOL, d
    # The shared prefix really is shared: turn-1 and turn-2 logits agree there.
    d = (turn2_cold_logits[:turn2_prefix_len] - prefill_logits[:turn2_prefix_len]).abs().max().item()
    assert d < TOL, d

    as_i64 = lambda v: torch.tensor(v, dtype=torch.int64)
    tensors = {
        "prompt_ids": as_i64(prompt_ids),
        "prefill_logits": prefill_logits.contiguous(),
        "decode_ids": as_i64(decode_ids),
        "decode_logits": decode_logits.contiguous(),
        "greedy_ids": as_i64(greedy_ids),
        "turn1_assistant_ids": as_i64(turn1_assistant_ids),
        "turn2_ids": as_i64(turn2_ids),
        "turn2_prefix_len": as_i64([turn2_prefix_len]),
        "turn2_warm_logits": turn2_warm_logits.contiguous(),
        "turn2_cold_logits": turn2_cold_logits.contiguous(),
    }
    for k, v in tensors.items():
        assert v.dtype in (torch.int64, torch.float32) and torch.isfinite(v.float()).all(), k
    save_file(tensors, os.path.join(out, "reference.safetensors"), metadata={"format": "pt"})

    cases = ["Okay, so\n\nLet me think...  It's 3 o'clock; they'll say: \"Hello,   world!\"\n",
             "The population of Tokyo was 13960000 in 2021, i.e. 1.396e7 (about 14 million) and 3+4=7.",
             "<think>x</think>",
             "café — 東京",
             ""]
    tokenization = [{"text": c, "ids": enc(c)} for c in cases]
    for c in tokenization:
        assert tk.decode(c["ids"], skip_special_tokens=False) == c["text"], c
    assert tokenization[2]["ids"][0] == ids["think_open"] and tokenization[2]["ids"][-1] == ids["think_close"]
    assert tokenization[4]["ids"] == []

    reference = {
        "description": "HF transformers float32 CPU eager-attention reference for the tiny random Qwen2 in this directory",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__},
        "seed": SEED,
        "tolerance": TOL,
        "tokenizer_size": tok_size,
        "vocab_size": vocab_size,
        "special_ids": ids,
        "added_tokens": {t: n_bpe + i for i, (t, _) in enumerate(ADDED)},
        "turn1_messages": msgs1,
        "prompt_text": prompt_text,
        "prompt_ids": prompt_ids,
        "decode_ids": decode_ids,
        "greedy_ids": greedy_ids,
        "greedy_text": tok.decode(greedy_ids),
        "turn1_assistant_ids": turn1_assistant_ids,
        "turn1_reasoning": reasoning_text,
        "turn1_answer": answer_text,
        "turn2_assistant_content": assistant_content,
        "turn2_messages": msgs2,
        "turn2_text": turn2_text,
        "turn2_ids": turn2_ids,
        "turn2_prefix_len": turn2_prefix_len,
        "min_greedy_margin": min(margins),
        "tokenization": tokenization,
        "tensors": {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)} for k, v in tensors.items()},
    }
    with open(os.path.join(out, "reference.json"), "w", encoding="utf-8") as f:
        json.dump(reference, f, ensure_ascii=False, indent=2)
        f.write("\n")

    # 7. README.md
    if LLAMA:
        readme = f"""# tiny-llama: parity fixture

A tiny random-weight Llama 3.1 model shaped like DeepSeek-R1-Distill-Llama, plus reference outputs from
Hugging Face transformers, for the engine's parity tests (f32 logits must match within {TOL:g}).
Generated by `scripts/make_parity_fixture.py --arch llama`; do not edit by hand.

Regenerate (from the repository root; deterministic, CPU only, seed {SEED}):

    python scripts/make_parity_fixture.py --arch llama tests/fixtures/tiny-llama

Generated with torch {torch.__version__}, transformers {transformers.__version__}, tokenizers {tokenizers.__version__},
safetensors, numpy {np.__version__}; reference: float32, CPU, `attn_implementation="eager"`.

- `tokenizer.json`: byte-level BPE ({n_bpe} entries incl. the 256-byte alphabet) trained on English text
  embedded in the script, with Llama 3's split regex (digits in runs of up to three), no normalizer,
  ByteLevel pre-tokenizer/decoder, then the first 16 of the Llama distill's 256 added tokens (all special)
  at ids {n_bpe}..{tok_size - 1}, in their real relative order (real id = 128000 + offset): BOS
  `<｜begin▁of▁sentence｜>` = {ids["bos"]}, EOS `<｜end▁of▁sentence｜>` = {ids["eos"]}, `<｜User｜>` = {ids["user"]},
  `<｜Assistant｜>` = {ids["assistant"]}, `<think>` = {ids["think_open"]}, `</think>` = {ids["think_close"]}.
  Tokenizer size {tok_size}.
- `tokenizer_config.json`: as the Llama distills publish it: `LlamaTokenizerFast`, `add_bos_token` true,
  pad = EOS, the same chat template as the Qwen distills.
- `config.json`: written by transformers {transformers.__version__} itself, so in its layout: `rope_parameters`
  (llama3: factor 8, low 1, high 4, `original_max_position_embeddings` 32 so that all three frequency
  bands matter at these lengths; theta 10000) and `dtype` instead of `rope_theta`/`rope_scaling`/`torch_dtype`.
  Hidden {HIDDEN}, intermediate {INTER}, {LAYERS} layers, {HEADS} heads, {KV_HEADS} KV heads, no biases,
  untied lm_head as in the real distills, `vocab_size` {vocab_size}.
- `generation_config.json`: bos {ids["bos"]}, eos {ids["eos"]}, do_sample, temperature 0.6, top_p 0.95.
- `model.safetensors`: float32, HF LlamaForCausalLM names, every parameter random.
- `reference.safetensors` / `reference.json`: as for tiny-qwen2 (prompt ids, prefill logits, {N_DECODE} cached
  greedy decode steps, {N_GREEDY} greedy tokens, a second turn with warm/cold logits, tokenizer cases).
"""
    else:
        readme = f"""# tiny-qwen2: parity fixture

A tiny random-weight Qwen2 model shaped like DeepSeek-R1-Distill-Qwen, plus reference outputs from
Hugging Face transformers, for the engine's parity tests (f32 logits must match within {TOL:g}).
Generated by `scripts/make_parity_fixture.py`; do not edit by hand.

Regenerate (from the repository root; deterministic, CPU only, seed {SEED}):

    python scripts/make_parity_fixture.py tests/fixtures/tiny-qwen2

Generated with torch {torch.__version__}, transformers {transformers.__version__}, tokenizers {tokenizers.__version__},
safetensors, numpy {np.__version__}; reference: float32, CPU, `attn_implementation="eager"`.

- `tokenizer.json`: byte-level BPE ({n_bpe} entries incl. the 256-byte alphabet) trained on English text
  embedded in the script, with Qwen2's NFC normalizer, split regex, ByteLevel pre-tokenizer/decoder and no
  post-processor, then DeepSeek's 22 added tokens in the published order at ids {n_bpe}..{tok_size - 1}
  (EOS `<｜end▁of▁sentence｜>` = {ids["eos"]}, `<｜User｜>` = {ids["user"]}, `<｜Assistant｜>` = {ids["assistant"]},
  BOS `<｜begin▁of▁sentence｜>` = {ids["bos"]}, `<think>` = {ids["think_open"]}, `</think>` = {ids["think_close"]}).
  Tokenizer size {tok_size}.
- `tokenizer_config.json`: the published one (same chat template, bos/eos/pad) with ids remapped,
  all 22 added tokens listed, `model_max_length` 4096.
- `config.json`: Qwen2, hidden {HIDDEN}, intermediate {INTER}, {LAYERS} layers, {HEADS} heads, {KV_HEADS} KV heads (GQA),
  `vocab_size` {vocab_size} (wider than the tokenizer: logits ids >= {tok_size} are not tokens),
  `"sliding_window": null`, `bos_token_id` = `eos_token_id` = {ids["eos"]} (the published quirk).
- `generation_config.json`: bos {ids["bos"]}, eos {ids["eos"]}, do_sample, temperature 0.6, top_p 0.95.
- `model.safetensors`: float32, HF Qwen2ForCausalLM names, every parameter random (q/k/v biases and
  RMSNorm weights included), untied lm_head.
- `reference.safetensors` / `reference.json`: chat-rendered prompt ids, prefill logits (all positions),
  {N_DECODE} cached greedy decode steps, {N_GREEDY} greedy tokens from `generate` (ids >= {tok_size} suppressed,
  no EOS stop), turn 1's assistant ids (first {N_REASONING} greedy tokens as reasoning, `</think>`, an answer),
  a second turn with its reusable KV-cache prefix length and warm/cold logits, and tokenizer cases.
  Random weights: decoded greedy text is gibberish, partly invalid UTF-8 (replacement characters).
  `reference.json` lists every tensor's shape and dtype.
"""
    with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as f:
        f.write(readme)

    # Self-check what was written.
    back = load_file(os.path.join(out, "reference.safetensors"))
    for k, v in tensors.items():
        assert torch.equal(back[k], v), k
    total = 0
    for fn in sorted(os.listdir(out)):
        fp = os.path.join(out, fn)
        size = os.path.getsize(fp)
        total += size
        log(f"  {fn:26s} {size:9d}  sha256 {hashlib.sha256(open(fp, 'rb').read()).hexdigest()[:16]}")
    log(f"  total {total} bytes")
    assert total < 6_500_000, total


if __name__ == "__main__":
    main()
