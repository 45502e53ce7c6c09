"""The real `boto3` bedrock-runtime client against a running `thinkrag serve`, configured as the
AWS page's Python samples are, with only `endpoint_url` added.

Run by tests/serve.rs: python bedrock_client.py BASE_URL SERVER_PID. The last check sends the
server SIGTERM in the middle of a stream (the server runs with --shutdown-grace 0), so this
script must run last against its server. Exits non-zero on the first failed check.
"""
import json
import os
import signal
import sys

import boto3
import botocore
from botocore.config import Config
from botocore.exceptions import ClientError, EventStreamError

base, server_pid = sys.argv[1], int(sys.argv[2])
checks = 0


def check(cond, what):
    global checks
    if not cond:
        raise AssertionError(what)
    checks += 1


# As in the AWS samples (region, model id, a long read timeout), pointed at thinkrag; unsigned so
# no AWS credentials are needed.
config = Config(signature_version=botocore.UNSIGNED, read_timeout=840, retries={"max_attempts": 1})
client = boto3.client("bedrock-runtime", region_name="us-west-2", endpoint_url=base, config=config)
model_id = "us.deepseek.r1-v1:0"

# InvokeModel with the DeepSeek-R1 body of the AWS page (ASCII lookalike markup and all).
prompt = "How many people live in Miami?"
formatted = f"<|begin▁of▁sentence|><|User|>{prompt}<|Assistant|><think>\n"
body = json.dumps({"prompt": formatted, "max_tokens": 24, "temperature": 0.5, "top_p": 0.9})
response = client.invoke_model(modelId=model_id, body=body)
out = json.loads(response["body"].read())
choice = out["choices"][0]
check(isinstance(choice["text"], str) and choice["stop_reason"] in ("stop", "length"), out)
headers = response["ResponseMetadata"]["HTTPHeaders"]
check(int(headers["x-amzn-bedrock-output-token-count"]) <= 24, headers)
check(int(headers["x-amzn-bedrock-input-token-count"]) > 5, headers)
check(len(response["ResponseMetadata"]["RequestId"]) == 36, response["ResponseMetadata"])

# The Llama-style body OpenSearch's DeepSeek connector sends: `generation` is the answer only.
llama = client.invoke_model(
    modelId="arn:aws:bedrock:us-east-1:123456789012:imported-model/abc",
    body=json.dumps({"prompt": f"<｜begin▁of▁sentence｜><｜User｜>{prompt}<｜Assistant｜>", "temperature": 0.0,
                     "max_gen_len": 40}),
)
lo = json.loads(llama["body"].read())
check(set(lo) >= {"generation", "prompt_token_count", "generation_token_count", "stop_reason"}, lo)
check("</think>" not in lo["generation"] and lo["generation_token_count"] <= 40, lo)

# InvokeModelWithResponseStream: base64 chunks of the same body, metrics in the last.
stream = client.invoke_model_with_response_stream(modelId=model_id, body=json.dumps(
    {"prompt": formatted, "max_tokens": 24, "temperature": 0.0}))
check(stream["contentType"] == "application/json", stream["contentType"])
parts = [json.loads(e["chunk"]["bytes"]) for e in stream["body"]]
text = "".join(p["choices"][0]["text"] for p in parts)
final = parts[-1]
check(final["choices"][0]["stop_reason"] in ("stop", "length"), final)
check(final["amazon-bedrock-invocationMetrics"]["outputTokenCount"] <= 24, final)
greedy = json.loads(client.invoke_model(modelId=model_id, body=json.dumps(
    {"prompt": formatted, "max_tokens": 24, "temperature": 0.0}))["body"].read())
check(text == greedy["choices"][0]["text"], (text, greedy))

# Converse: the answer's text block first, reasoning apart, stopReason, usage, metrics.
conversation = [{"role": "user", "content": [{"text": "Create a list of 3 pop songs."}]}]
r = client.converse(modelId=model_id, messages=conversation, system=[{"text": "Be brief."}],
                    inferenceConfig={"maxTokens": 24, "temperature": 0.5, "topP": 0.9})
content = r["output"]["message"]["content"]
check("text" in content[0], content)
check(any("reasoningContent" in c for c in content), content)
reasoning = [c for c in content if "reasoningContent" in c][0]["reasoningContent"]["reasoningText"]["text"]
check(len(reasoning) > 0, reasoning)
check(r["stopReason"] in ("end_turn", "max_tokens"), r["stopReason"])
check(r["usage"]["totalTokens"] == r["usage"]["inputTokens"] + r["usage"]["outputTokens"], r["usage"])
check(r["metrics"]["latencyMs"] >= 0, r["metrics"])

# ConverseStream: all event kinds in order; the reasoning and text assemble to Converse's.
greedy_cfg = {"maxTokens": 24, "temperature": 0.0}
whole = client.converse(modelId=model_id, messages=conversation, inferenceConfig=greedy_cfg)
events = list(client.converse_stream(modelId=model_id, messages=conversation, inferenceConfig=greedy_cfg)["stream"])
kinds = [next(iter(e)) for e in events]
check(kinds[0] == "messageStart" and kinds[-2:] == ["messageStop", "metadata"], kinds)
streamed_reasoning = "".join(e["contentBlockDelta"]["delta"]["reasoningContent"]["text"]
                             for e in events if "contentBlockDelta" in e and e["contentBlockDelta"]["contentBlockIndex"] == 0)
streamed_text = "".join(e["contentBlockDelta"]["delta"]["text"]
                        for e in events if "contentBlockDelta" in e and e["contentBlockDelta"]["contentBlockIndex"] == 1)
w = whole["output"]["message"]["content"]
check(streamed_text == w[0]["text"], (streamed_text, w))
check(streamed_reasoning == w[1]["reasoningContent"]["reasoningText"]["text"], streamed_reasoning)
check(events[-1]["metadata"]["usage"]["outputTokens"] == whole["usage"]["outputTokens"], events[-1])

# thinkrag's extras go in additionalModelRequestFields: a reasoning budget.
budget = client.converse(modelId=model_id, messages=conversation, inferenceConfig=greedy_cfg,
                         additionalModelRequestFields={"max_thinking_tokens": 3})
check(budget["output"]["message"]["content"][1]["reasoningContent"]["reasoningText"]["text"] != "", budget)
check(budget["stopReason"] in ("end_turn", "max_tokens"), budget)
try:
    client.converse(modelId=model_id, messages=conversation, additionalModelRequestFields={"warp": 9})
    check(False, "an unknown model field accepted")
except client.exceptions.ValidationException as e:
    check("extraneous key [warp]" in e.response["Error"]["Message"], e.response)

# A validation error, before any stream and for a streaming operation too.
for call in (lambda b: client.invoke_model(modelId=model_id, body=b),
             lambda b: client.invoke_model_with_response_stream(modelId=model_id, body=b)):
    try:
        call(json.dumps({"prompt": formatted, "temperature": 1.5}))
        check(False, "temperature 1.5 accepted")
    except client.exceptions.ValidationException as e:
        check("temperature" in e.response["Error"]["Message"], e.response)
try:
    client.invoke_model(modelId=model_id, body=json.dumps({"prompt": "x", "bogus": 1}))
    check(False, "an extraneous key accepted")
except client.exceptions.ValidationException as e:
    check("extraneous key [bogus]" in e.response["Error"]["Message"], e.response)
try:
    client.converse(modelId=model_id, messages=conversation, inferenceConfig={"maxTokens": 40000})
    check(False, "maxTokens 40000 accepted")
except client.exceptions.ValidationException as e:
    check("maxTokens" in e.response["Error"]["Message"], e.response)

# An error in the middle of a stream: the server shuts down (grace 0) while generating.
stream = client.converse_stream(modelId=model_id, messages=conversation,
                                inferenceConfig={"maxTokens": 4000, "temperature": 0.0},
                                additionalModelRequestFields={"ignore_eos": True})["stream"]
seen = 0
try:
    for event in stream:
        seen += 1
        if seen == 2:
            os.kill(server_pid, signal.SIGTERM)
    check(False, "the stream ended without the shutdown's exception")
except EventStreamError as e:
    check(e.response["Error"]["Code"] == "serviceUnavailableException", e.response)
    check("shutting down" in e.response["Error"]["Message"], e.response)

print(f"boto3 bedrock-runtime: {checks} checks passed")
