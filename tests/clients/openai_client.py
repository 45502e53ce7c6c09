"""The real `openai` client against a running `thinkrag serve` (the tiny test model and MiniLM).

Run by tests/serve.rs: python openai_client.py BASE_URL. Exits non-zero on the first failed check.
"""
import base64
import struct
import sys

import openai

base = sys.argv[1]
client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
checks = 0


def check(cond, what):
    global checks
    if not cond:
        raise AssertionError(what)
    checks += 1


# Models.
models = client.models.list()
ids = [m.id for m in models.data]
check("tiny-qwen2" in ids and "all-minilm-l6-v2" in ids, f"models: {ids}")

# Chat, not streamed: reasoning in both fields, content a string, usage with details.
r = client.chat.completions.create(
    model="anything", messages=[{"role": "user", "content": "How many people live in Miami?"}],
    max_tokens=16, seed=7, temperature=0.6,
)
c = r.choices[0]
check(isinstance(c.message.content, str), "content is a string, never None")
check(c.message.reasoning_content == c.message.reasoning, "both reasoning fields")
check(len(c.message.reasoning_content) > 0, "the tiny model reasons")
check(c.finish_reason in ("stop", "length"), c.finish_reason)
check(r.usage.prompt_tokens > 5 and r.usage.completion_tokens <= 16, r.usage)
check(r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, r.usage)
check(r.usage.completion_tokens_details.reasoning_tokens <= r.usage.completion_tokens, r.usage)
check(r.usage.prompt_tokens_details.cached_tokens is not None, r.usage)
check(r.model == "anything" and r.object == "chat.completion", r)
check(r.model_extra["timings"]["predicted_n"] == r.usage.completion_tokens, r.model_extra)

# Same seed, same answer.
again = client.chat.completions.create(
    model="anything", messages=[{"role": "user", "content": "How many people live in Miami?"}],
    max_tokens=16, seed=7, temperature=0.6,
)
check(again.choices[0].message.reasoning_content == c.message.reasoning_content, "seeded")

# Streamed: role first, reasoning deltas, then the finish chunk and the usage chunk.
stream = client.chat.completions.create(
    model="m", messages=[{"role": "user", "content": "How many people live in Miami?"}],
    max_tokens=16, seed=7, temperature=0.6, stream=True, stream_options={"include_usage": True},
)
chunks = list(stream)
check(chunks[0].choices[0].delta.role == "assistant", chunks[0])
reasoning = "".join(getattr(ch.choices[0].delta, "reasoning_content", None) or "" for ch in chunks if ch.choices)
answer = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
check(reasoning == c.message.reasoning_content, (reasoning, c.message.reasoning_content))
check(answer == c.message.content, (answer, c.message.content))
finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
check(finish == [c.finish_reason], finish)
check(chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens, chunks[-1])

# Content as text parts (what OpenSearch sends), a system prompt, and an earlier assistant turn
# whose reasoning is echoed back: accepted, the reasoning dropped.
r2 = client.chat.completions.create(
    model="m",
    messages=[
        {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
        {"role": "user", "content": [{"type": "text", "text": "Hi."}, {"type": "text", "text": " Who are you?"}]},
        {"role": "assistant", "content": "<think>secret plan</think>I am a model.", "reasoning_content": "secret plan"},
        {"role": "user", "content": "And?"},
    ],
    max_tokens=4,
)
check(isinstance(r2.choices[0].message.content, str), r2)

# reasoning_effort none closes the reasoning at once; include_reasoning false hides it.
miami = [{"role": "user", "content": "How many people live in Miami?"}]
r3 = client.chat.completions.create(model="m", messages=miami, max_tokens=8, reasoning_effort="none", temperature=0)
check(r3.choices[0].message.reasoning_content == "", r3.choices[0].message)
check(r3.usage.completion_tokens_details.reasoning_tokens == 1, r3.usage)  # the forced </think>
r4 = client.chat.completions.create(
    model="m", messages=miami, max_tokens=8, temperature=0,
    extra_body={"include_reasoning": False, "thinking_budget_tokens": 2},
)
check(getattr(r4.choices[0].message, "reasoning_content", None) is None, r4.choices[0].message)
check(r4.usage.completion_tokens_details.reasoning_tokens == 3, r4.usage)  # 2 + </think>

# A stop string: never in the output.
full = c.message.reasoning_content
stop = full[len(full) // 2: len(full) // 2 + 2]
if stop.strip():
    r5 = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "How many people live in Miami?"}],
        max_tokens=16, seed=7, temperature=0.6, stop=[stop],
    )
    check(stop not in r5.choices[0].message.reasoning_content, r5)
    check(r5.choices[0].finish_reason == "stop", r5)

# Legacy completions: the raw continuation.
comp = client.completions.create(model="m", prompt="<｜User｜>Hi<｜Assistant｜>", max_tokens=5, seed=3)
check(comp.object == "text_completion" and isinstance(comp.choices[0].text, str), comp)
check(comp.usage.completion_tokens == 5 or comp.choices[0].finish_reason == "stop", comp)

# Errors, mapped to the client's exception classes.
try:
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], temperature=3)
    check(False, "temperature 3 accepted")
except openai.BadRequestError as e:
    check(e.status_code == 400 and e.body["param"] == "temperature", e.body)
    check("0..=2" in e.body["message"], e.body)
try:
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "word " * 5000}])
    check(False, "a prompt longer than the context accepted")
except openai.BadRequestError as e:
    check(e.body["code"] == "context_length_exceeded", e.body)
try:
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=4090)
    check(False, "max_tokens past the window accepted")
except openai.BadRequestError as e:
    check(e.body["code"] == "context_length_exceeded" and e.body["param"] == "max_tokens", e.body)
try:
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], n=2)
    check(False, "n=2 accepted")
except openai.BadRequestError as e:
    check(e.body["param"] == "n", e.body)
try:
    client.models.retrieve("no-such-model")
    check(False, "unknown model found")
except openai.NotFoundError as e:
    check(e.status_code == 404, e)

# Embeddings: base64 by default (decoded by the client), floats on request, the same vectors.
e64 = client.embeddings.create(model="all-minilm-l6-v2", input=["The population of Miami grew.", "Chicago"])
ef = client.embeddings.create(model="all-minilm-l6-v2", input=["The population of Miami grew.", "Chicago"],
                              encoding_format="float")
check(len(e64.data) == 2 and len(e64.data[0].embedding) == 384, len(e64.data[0].embedding))
check(max(abs(a - b) for a, b in zip(e64.data[0].embedding, ef.data[0].embedding)) < 1e-6, "base64 == float")
norm = sum(x * x for x in ef.data[1].embedding) ** 0.5
check(abs(norm - 1) < 1e-4, norm)
check(e64.usage.prompt_tokens > 2, e64.usage)
explicit = client.embeddings.create(model="m", input="Chicago", encoding_format="base64")
vec = struct.unpack("<384f", base64.b64decode(explicit.data[0].embedding))
check(max(abs(a - b) for a, b in zip(vec, ef.data[1].embedding)) < 1e-6, "little-endian f32")

print(f"openai client: {checks} checks passed")
