"""The real `opensearch-py` client against a running `thinkrag serve` (the tiny test model and
MiniLM): the OpenSearch RAG tutorial's own requests (tests/fixtures/opensearch-tutorial, steps
5.1-5.3, unchanged but for the host), every OpenSearch route thinkrag serves with its bad-input
cases, conversation memory, and RAG through the `openai` client.

Run by tests/serve.rs: python opensearch_client.py BASE_URL. Exits non-zero on the first failed check.
"""
import json
import pathlib
import sys
import urllib.request

import openai
from opensearchpy import OpenSearch
from opensearchpy.exceptions import ConflictError, NotFoundError, RequestError

base = sys.argv[1]
tutorial = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "opensearch-tutorial"
client = OpenSearch(hosts=[base], timeout=300, max_retries=0)
checks = 0


def check(cond, what):
    global checks
    if not cond:
        raise AssertionError(what)
    checks += 1


def fails(call, exc, status, error_type, *words):
    """`call` raises `exc` with `status`, OpenSearch's error `type`, and a reason naming `words`."""
    try:
        call()
    except exc as e:
        check(e.status_code == status, f"status {e.status_code} != {status}: {e.info}")
        err = e.info["error"]
        check(err["type"] == error_type, f"type {err['type']} != {error_type}: {e.info}")
        check(err["root_cause"][0]["type"] == error_type, e.info)
        check(e.info["status"] == status, e.info)
        for w in words:
            check(w in err["reason"], f"{w!r} not in {err['reason']!r}")
        return e.info
    raise AssertionError(f"no {exc.__name__} from {call}")


# The node answers like OpenSearch.
info = client.info()
check(info["version"]["distribution"] == "opensearch", info)

# Step 5.1: the search pipeline with the RAG processor, exactly as the tutorial creates it.
pipeline_name = "my-conversation-search-pipeline-deepseek"
pipeline = json.loads((tutorial / "step-5.1-search-pipeline.json").read_text())
check(client.search_pipeline.put(id=pipeline_name, body=pipeline) == {"acknowledged": True}, "pipeline")
got = client.search_pipeline.get(id=pipeline_name)
check(got[pipeline_name] == pipeline, got)

# Step 5.2: the tutorial's _bulk (no refresh: documents are searchable when it returns).
bulk = client.bulk(body=(tutorial / "step-5.2-bulk.ndjson").read_text())
check(bulk["errors"] is False, bulk)
check([i["index"]["status"] for i in bulk["items"]] == [201] * 6, bulk)
check([i["index"]["_id"] for i in bulk["items"]] == ["1", "2", "3", "4", "5", "6"], bulk)
check(all(i["index"]["result"] == "created" for i in bulk["items"]), bulk)
check(client.count(index="my-nlp-index")["count"] == 6, "six documents")

# Step 5.3: the tutorial's search, with its pipeline.
search = json.loads((tutorial / "step-5.3-search.json").read_text())
r = client.search(index="my-nlp-index", body=search, params={"search_pipeline": pipeline_name})
for key in ("took", "timed_out", "_shards", "hits", "ext"):
    check(key in r, f"{key} in {list(r)}")
check(r["timed_out"] is False, r["timed_out"])
check(r["hits"]["total"] == {"value": 5, "relation": "eq"}, r["hits"]["total"])
hits = r["hits"]["hits"]
check(len(hits) == 2, "size 2")
check({h["_id"] for h in hits} == {"2", "4"}, f"New York City and Miami: {[h['_id'] for h in hits]}")
check("New York City" in hits[0]["_source"]["text"] or "Miami" in hits[0]["_source"]["text"], hits[0])
check(all(h["_index"] == "my-nlp-index" and list(h["_source"]) == ["text"] for h in hits), hits)
check(r["hits"]["max_score"] == hits[0]["_score"] >= hits[1]["_score"] > 0, hits)
rag = r["ext"]["retrieval_augmented_generation"]
check(isinstance(rag["answer"], str), rag)
check("<think>" not in rag["answer"] and "</think>" not in rag["answer"], "answer only")
check("SEARCH RESULT" not in rag["answer"] and "QUESTION:" not in rag["answer"], "no prompt")
check(rag["reasoning"] and rag["reasoning"] not in rag["answer"], "reasoning apart")
check([s["_id"] for s in rag["sources"]] == [h["_id"] for h in hits], rag["sources"])
check([s["number"] for s in rag["sources"]] == [1, 2], rag["sources"])
check(isinstance(rag["citations"], list), rag)
check(all(c["_id"] in ("2", "4") for c in rag["citations"]), rag["citations"])
check(rag["usage"]["completion_tokens"] > 0 and rag["usage"]["prompt_tokens"] > 100, rag["usage"])
check(rag["timings"]["predicted_n"] == rag["usage"]["completion_tokens"], rag["timings"])
check("message_id" not in rag, "no memory, no message_id")

# The same search as a GET with a body, as the tutorial writes it.
r_get = client.transport.perform_request(
    "GET", "/my-nlp-index/_search", params={"search_pipeline": pipeline_name}, body=search
)
check([h["_id"] for h in r_get["hits"]["hits"]] == [h["_id"] for h in hits], "GET = POST")

# Without the pipeline: hits only; knn with the query's own vector finds the same documents.
plain = client.search(index="my-nlp-index", body={"query": search["query"], "size": 2})
check("ext" not in plain and [h["_id"] for h in plain["hits"]["hits"]] == [h["_id"] for h in hits], plain)
question = search["query"]["neural"]["passage_embedding"]["query_text"]
req = urllib.request.Request(
    f"{base}/v1/embeddings", data=json.dumps({"model": "e", "input": question}).encode(),
    headers={"content-type": "application/json"},
)
vector = json.load(urllib.request.urlopen(req))["data"][0]["embedding"]
knn = client.search(index="my-nlp-index", body={"query": {"knn": {"passage_embedding": {"vector": vector, "k": 2}}}})
check([h["_id"] for h in knn["hits"]["hits"]] == [h["_id"] for h in hits], knn)
check(abs(knn["hits"]["hits"][0]["_score"] - hits[0]["_score"]) < 1e-5, "same score")
everything = client.search(index="my-nlp-index", body={"query": {"match_all": {}}, "size": 3, "from": 2})
check(everything["hits"]["total"]["value"] == 6 and len(everything["hits"]["hits"]) == 3, everything)
filtered = client.search(index="my-nlp-index", body={"query": search["query"], "_source": False})
check(all("_source" not in h for h in filtered["hits"]["hits"]), "_source: false")

# BM25: a match query ranks the one document naming the city first, with BM25 scores; the
# tutorial's RAG pipeline answers over lexical hits too.
def texts(r):
    return [h["_source"]["text"] for h in r["hits"]["hits"]]


lexical = client.search(index="my-nlp-index", body={"query": {"match": {"text": "Ogden-Layton"}}, "size": 3})
check(len(texts(lexical)) == 1 and "Ogden-Layton" in texts(lexical)[0], lexical)
check(lexical["hits"]["hits"][0]["_score"] > 0 and lexical["hits"]["max_score"] == lexical["hits"]["hits"][0]["_score"], lexical)
phrase = client.search(index="my-nlp-index", body={"query": {"match_phrase": {"text": {"query": "Ogden-Layton metro"}}}})
check("Ogden-Layton" in texts(phrase)[0], phrase)
check(client.search(index="my-nlp-index", body={"query": {"match": {"text": "zzzqqq"}}})["hits"]["hits"] == [], "no word, no hit")
# Hybrid: OpenSearch's hybrid query (match + neural), fused by reciprocal rank.
hybrid = client.search(index="my-nlp-index", body={"query": {"hybrid": {"queries": [
    {"match": {"text": "Miami"}}, search["query"]]}}, "size": 3})
hs = hybrid["hits"]["hits"]
check(len(hs) == 3 and all(a["_score"] >= b["_score"] for a, b in zip(hs, hs[1:])), hybrid)
check(any("Miami" in t for t in texts(hybrid)), hybrid)
check(all(h["_score"] <= 2 / 61 + 1e-6 for h in hs), "reciprocal-rank-fusion scores")
# The pipeline clients create for hybrid search: OpenSearch's rrf score ranker is what thinkrag does.
rrf = {"description": "rrf", "phase_results_processors": [
    {"score-ranker-processor": {"combination": {"technique": "rrf", "rank_constant": 60}}}]}
check(client.search_pipeline.put(id="hybrid-rrf", body=rrf) == {"acknowledged": True}, "rrf pipeline")
via = client.search(index="my-nlp-index", body={"query": {"hybrid": {"queries": [
    {"match": {"text": "Miami"}}, search["query"]]}}, "size": 3}, params={"search_pipeline": "hybrid-rrf"})
check([h["_id"] for h in via["hits"]["hits"]] == [h["_id"] for h in hs], via)
fails(lambda: client.search_pipeline.put(id="norm", body={"phase_results_processors": [
    {"normalization-processor": {"normalization": {"technique": "min_max"}}}]}), RequestError, 400, "illegal_argument_exception", "rrf")
fails(lambda: client.search_pipeline.put(id="rc", body={"phase_results_processors": [
    {"score-ranker-processor": {"combination": {"technique": "rrf", "rank_constant": 10}}}]}), RequestError, 400, "illegal_argument_exception", "60")
rag_lexical = client.search(index="my-nlp-index", body={**search, "query": {"match": {"text": "Miami New York"}}},
                            params={"search_pipeline": pipeline_name})
check(isinstance(rag_lexical["ext"]["retrieval_augmented_generation"]["answer"], str), rag_lexical)

# Conversation memory: two searches remember each other, the history is kept.
memory_id = client.plugins.ml.create_memory(body={"name": "population questions"})["memory_id"]
for q in ("What is the population of Miami?", "And how did it change from 2021 to 2023?"):
    body = json.loads(json.dumps(search))
    body["ext"]["generative_qa_parameters"].update({"llm_question": q, "memory_id": memory_id, "message_size": 5})
    m = client.search(index="my-nlp-index", body=body, params={"search_pipeline": pipeline_name})
    check(isinstance(m["ext"]["retrieval_augmented_generation"]["message_id"], str), m["ext"])
messages = client.plugins.ml.get_all_messages(memory_id=memory_id)["messages"]
check([x["input"] for x in messages] == ["What is the population of Miami?", "And how did it change from 2021 to 2023?"], messages)
check(all(x["origin"] == "retrieval_augmented_generation" and x["memory_id"] == memory_id for x in messages), messages)
check(client.plugins.ml.get_memory(memory_id=memory_id)["name"] == "population questions", "memory")
check(any(x["memory_id"] == memory_id for x in client.plugins.ml.get_all_memories()["memories"]), "listed")

# Indices: create with a mapping, get, exists, _cat, delete.
mapping = {"settings": {"index.knn": True},
           "mappings": {"properties": {"title": {"type": "text"}, "body": {"type": "text"},
                                       "tag": {"type": "keyword"},
                                       "vec": {"type": "knn_vector", "dimension": 384,
                                               "method": {"space_type": "cosinesimil"}}}}}
check(client.indices.create(index="notes", body=mapping)["acknowledged"], "created")
check(client.indices.exists(index="notes") and not client.indices.exists(index="nothing"), "exists")
check(client.indices.get(index="notes")["notes"]["mappings"] == mapping["mappings"], "mapping kept")
fails(lambda: client.indices.create(index="notes"), RequestError, 400, "resource_already_exists_exception", "notes")
fails(lambda: client.indices.create(index="Bad*Name"), RequestError, 400, "invalid_index_name_exception")
fails(lambda: client.indices.create(index="dims", body={"mappings": {"properties": {"passage_embedding": {"type": "knn_vector", "dimension": 768}}}}),
      RequestError, 400, "mapper_parsing_exception", "768", "384")
check(not client.indices.exists(index="dims"), "nothing created on a dimension mismatch")
cat = client.cat.indices(format="json")
rows = {row["index"]: row for row in cat}
check(rows["my-nlp-index"]["docs.count"] == "6" and rows["notes"]["docs.count"] == "0", cat)

# Documents: index, get, update, create conflict, delete; text fields per the mapping.
client.index(index="notes", id="a", body={"title": "Coffee", "body": "Chlorogenic acids lower intestinal pH.", "tag": "x"})
doc = client.get(index="notes", id="a")
check(doc["found"] and doc["_source"]["tag"] == "x" and doc["_version"] == 1, doc)
client.update(index="notes", id="a", body={"doc": {"tag": "y"}})
doc = client.get(index="notes", id="a")
check(doc["_source"] == {"title": "Coffee", "body": "Chlorogenic acids lower intestinal pH.", "tag": "y"} and doc["_version"] == 2, doc)
fails(lambda: client.create(index="notes", id="a", body={"title": "again"}), ConflictError, 409, "version_conflict_engine_exception")
r = client.search(index="notes", body={"query": {"neural": {"vec": {"query_text": "coffee acids", "k": 1}}}})
check(r["hits"]["hits"][0]["_id"] == "a" and 0.5 < r["hits"]["hits"][0]["_score"] <= 1.0, r)
fails(lambda: client.search(index="notes", body={"query": {"neural": {"passage_embedding": {"query_text": "x"}}}}),
      RequestError, 400, "illegal_argument_exception", "passage_embedding", "vec")
client.delete(index="notes", id="a")
try:
    client.get(index="notes", id="a")
    check(False, "deleted")
except NotFoundError as e:
    check(e.info["found"] is False, e.info)

# A bulk with a malformed line, an update, a delete and a missing document: each item alone.
ndjson = "\n".join([
    json.dumps({"index": {"_index": "notes", "_id": "1"}}), json.dumps({"title": "one"}),
    '{"index": {"_index": "notes", "_id": "2"}', '{"title": "broken action line"}',
    json.dumps({"index": {"_index": "notes", "_id": "3"}}), '{"title": "broken document',
    json.dumps({"create": {"_index": "notes", "_id": "4"}}), json.dumps({"title": "four"}),
    json.dumps({"update": {"_index": "notes", "_id": "1"}}), json.dumps({"doc": {"body": "updated"}}),
    json.dumps({"delete": {"_index": "notes", "_id": "4"}}),
    json.dumps({"delete": {"_index": "notes", "_id": "404"}}),
    json.dumps({"update": {"_index": "notes", "_id": "missing"}}), json.dumps({"doc": {"x": 1}}),
]) + "\n"
b = client.bulk(body=ndjson)
statuses = [list(i.values())[0]["status"] for i in b["items"]]
check(b["errors"] is True and statuses == [201, 400, 400, 201, 200, 200, 404, 404], statuses)
check(b["items"][2]["index"]["error"]["type"] == "mapper_parsing_exception", b["items"][2])
check(b["items"][7]["update"]["error"]["type"] == "document_missing_exception", b["items"][7])
check(client.get(index="notes", id="1")["_source"] == {"title": "one", "body": "updated"}, "merged")
check(client.count(index="notes")["count"] == 1, "one left")

# Bad input: each a clear 4xx in OpenSearch's shape.
nlp = "my-nlp-index"
fails(lambda: client.search(index="nothing", body=search), NotFoundError, 404, "index_not_found_exception", "nothing")
fails(lambda: client.search(index=nlp, body=search, params={"search_pipeline": "nope"}), RequestError, 400, "illegal_argument_exception", "nope")
fails(lambda: client.search(index=nlp, body={**search, "size": 10001}), RequestError, 400, "illegal_argument_exception", "size")
bad_k = json.loads(json.dumps(search))
bad_k["query"]["neural"]["passage_embedding"]["k"] = 0
fails(lambda: client.search(index=nlp, body=bad_k), RequestError, 400, "illegal_argument_exception", "k")
fails(lambda: client.search(index=nlp, body={"query": {"match": {"text": {"query": "Miami", "operator": "and"}}}}), RequestError, 400, "illegal_argument_exception", "operator")
fails(lambda: client.search(index=nlp, body={"query": {"bool": {"must": []}}}), RequestError, 400, "illegal_argument_exception", "match")
fails(lambda: client.search(index=nlp, body={"query": {"hybrid": {"queries": [{"match": {"text": "a"}}, {"match": {"text": "b"}}]}}}),
      RequestError, 400, "illegal_argument_exception", "one match")
fails(lambda: client.search(index="notes", body={"query": {"match": {"tag": "x"}}}), RequestError, 400, "illegal_argument_exception", "not a text field")
check(client.search(index="notes", body={"query": {"match": {"body": "updated"}}})["hits"]["hits"][0]["_id"] == "1", "match on a mapped text field")
fails(lambda: client.search(index=nlp, body={"query": {"knn": {"passage_embedding": {"vector": [0.1, 0.2], "k": 2}}}}),
      RequestError, 400, "illegal_argument_exception", "dimension 2", "384")
fails(lambda: client.search(index=nlp, body={"query": search["query"], "ext": search["ext"]}), RequestError, 400, "illegal_argument_exception", "search_pipeline")
fails(lambda: client.search_pipeline.put(id="p", body={"response_processors": [{"rerank": {}}]}), RequestError, 400, "illegal_argument_exception", "rerank")
fails(lambda: client.search_pipeline.put(id="p", body={"response_processors": [{"retrieval_augmented_generation": {"model_id": "m"}}]}), RequestError, 400, "parse_exception", "context_field_list")
client.search_pipeline.put(id="wrong-field", body={"response_processors": [{"retrieval_augmented_generation": {"model_id": "m", "context_field_list": ["body"]}}]})
fails(lambda: client.search(index=nlp, body=search, params={"search_pipeline": "wrong-field"}), RequestError, 400, "illegal_argument_exception", "Context body not found")
bad_timeout = json.loads(json.dumps(search))
bad_timeout["ext"]["generative_qa_parameters"]["timeout"] = 0
fails(lambda: client.search(index=nlp, body=bad_timeout, params={"search_pipeline": pipeline_name}), RequestError, 400, "illegal_argument_exception", "timeout")
no_question = json.loads(json.dumps(search))
del no_question["ext"]["generative_qa_parameters"]["llm_question"]
fails(lambda: client.search(index=nlp, body=no_question, params={"search_pipeline": pipeline_name}), RequestError, 400, "illegal_argument_exception", "llm_question")
fails(lambda: client.search(index=nlp, body={**search, "ext": {"generative_qa_parameters": {"llm_question": "q", "memory_id": "nope"}}}, params={"search_pipeline": pipeline_name}),
      NotFoundError, 404, "resource_not_found_exception", "nope")
fails(lambda: client.search_pipeline.get(id="nope"), NotFoundError, 404, "resource_not_found_exception")
check(client.search_pipeline.delete(id="wrong-field")["acknowledged"], "pipeline deleted")

# RAG through the OpenAI API: extra_body names the index, or the model does.
oa = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
q = "What's the population increase of New York City from 2021 to 2023?"
c = oa.chat.completions.create(model="deepseek-r1", messages=[{"role": "user", "content": q}],
                               max_tokens=32, seed=1, extra_body={"rag": {"index": nlp, "k": 2}})
extra = c.model_extra["rag"]
check(extra["index"] == nlp and [s["number"] for s in extra["sources"]] == [1, 2], extra)
check(extra["sources"][0]["_id"] in ("2", "4") and "population" in extra["sources"][0]["text"], extra)
check(isinstance(extra["citations"], list) and isinstance(c.choices[0].message.content, str), extra)
check(c.usage.prompt_tokens > 100, "the sources are in the prompt")
stream = oa.chat.completions.create(model=f"rag/{nlp}", messages=[{"role": "user", "content": q}],
                                    max_tokens=16, seed=1, stream=True)
chunks = list(stream)
check(chunks[0].model_extra["rag"]["sources"][0]["_id"] == extra["sources"][0]["_id"], "sources first")
check("citations" in chunks[-1].model_extra["rag"], "citations last")
try:
    oa.chat.completions.create(model="m", messages=[{"role": "user", "content": q}], max_tokens=8,
                               extra_body={"rag": {"index": "nothing"}})
    check(False, "unknown index")
except openai.NotFoundError as e:
    check("nothing" in str(e), e)
try:
    oa.chat.completions.create(model="m", messages=[{"role": "user", "content": q}], max_tokens=8,
                               extra_body={"rag": {"index": nlp, "k": 0}})
    check(False, "k out of range")
except openai.BadRequestError as e:
    check("rag.k" in str(e), e)
# Lexical retrieval for RAG: the document naming the city is the first source.
lex = oa.chat.completions.create(model="m", messages=[{"role": "user", "content": "Ogden-Layton population"}],
                                 max_tokens=8, seed=1, extra_body={"rag": {"index": nlp, "k": 2, "mode": "lexical"}})
check("Ogden-Layton" in lex.model_extra["rag"]["sources"][0]["text"], lex.model_extra["rag"])
hyb = oa.chat.completions.create(model="m", messages=[{"role": "user", "content": q}],
                                 max_tokens=8, seed=1, extra_body={"rag": {"index": nlp, "k": 2, "mode": "hybrid"}})
check(len(hyb.model_extra["rag"]["sources"]) == 2, hyb.model_extra["rag"])
try:
    oa.chat.completions.create(model="m", messages=[{"role": "user", "content": q}], max_tokens=8,
                               extra_body={"rag": {"index": nlp, "mode": "bm25"}})
    check(False, "unknown mode")
except openai.BadRequestError as e:
    check("rag.mode" in str(e) and "vector, lexical or hybrid" in str(e), e)

# An index whose settings name a default search pipeline answers without ?search_pipeline.
client.indices.create(index="with-default", body={"settings": {"index.search.default_pipeline": pipeline_name}})
client.bulk(body=(tutorial / "step-5.2-bulk.ndjson").read_text().replace('"my-nlp-index"', '"with-default"'))
d = client.search(index="with-default", body=search)
check(isinstance(d["ext"]["retrieval_augmented_generation"]["answer"], str), d.get("ext"))
check({h["_id"] for h in d["hits"]["hits"]} == {"2", "4"}, d["hits"])
off = client.search(index="with-default", body={"query": search["query"]}, params={"search_pipeline": "_none"})
check("ext" not in off, "_none turns the default off")
check(client.indices.delete(index="with-default")["acknowledged"], "deleted")

# Deleting an index.
check(client.indices.delete(index="notes")["acknowledged"], "deleted")
fails(lambda: client.indices.delete(index="notes"), NotFoundError, 404, "index_not_found_exception")

print(f"{checks} checks passed")
