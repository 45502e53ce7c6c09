"""RAG with LangChain against `thinkrag serve`: the pipeline of the LangChain tutorial thinkrag
descends from (split a document into 512-character chunks with an overlap of 30, embed them, keep
the 3 nearest chunks for a question, fill the tutorial's prompt, generate with
DeepSeek-R1-Distill-Qwen-1.5B), with `OpenAIEmbeddings` and `ChatOpenAI` pointed at the local server
instead of HuggingFaceEmbeddings and a transformers pipeline. Nothing leaves the machine.

    thinkrag serve -m deepseek-r1-distill-qwen-1.5b-q4_k_m --embedder bge-base-en-v1.5
    pip install langchain-openai langchain-text-splitters
    python examples/langchain_rag.py --base-url http://127.0.0.1:8080/v1

What differs from a hosted OpenAI setup is the base URL, plus `check_embedding_ctx_length=False`:
without it LangChain tokenizes the text with OpenAI's tiktoken (downloading its vocabulary) and
sends token ids, which mean nothing to a local embedder. The model's reasoning arrives apart from
the answer (`reasoning_content`), so the answer printed here is the answer alone.

The tutorial kept its chunks in FAISS; this example keeps them in LangChain's in-memory vector
store, so it needs no native package. (To let the server do the retrieval too, index the chunks
with `POST /_bulk` and ask `ChatOpenAI(model="rag/INDEX")`: see the README.)
"""
import argparse
import pathlib

from langchain_core.documents import Document
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import PromptTemplate
from langchain_core.runnables import RunnablePassthrough
from langchain_core.vectorstores import InMemoryVectorStore
from langchain_openai import ChatOpenAI, OpenAIEmbeddings
from langchain_text_splitters import RecursiveCharacterTextSplitter

here = pathlib.Path(__file__).resolve().parent
parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--base-url", default="http://127.0.0.1:8080/v1", help="thinkrag serve's OpenAI base URL")
parser.add_argument("--api-key", default="local", help="the server's --api-key, if it has one")
parser.add_argument("--file", default=str(here / "data" / "coffee-by-products.txt"), help="the document to ask about")
parser.add_argument("--question", default="Which coffee by-products can lead to reduction of intestinal pH?")
parser.add_argument("--max-tokens", type=int, default=500, help="the tutorial's max_new_tokens")
args = parser.parse_args()

# Load the document and split it as the tutorial does.
docs = [Document(page_content=pathlib.Path(args.file).read_text(), metadata={"source": args.file})]
splitter = RecursiveCharacterTextSplitter(chunk_size=512, chunk_overlap=30)
chunked_docs = splitter.split_documents(docs)

# Embed the chunks with the server's embedder.
embeddings = OpenAIEmbeddings(
    model="bge-base-en-v1.5",  # any name: the server embeds with the embedder it loaded
    base_url=args.base_url,
    api_key=args.api_key,
    check_embedding_ctx_length=False,
)
db = InMemoryVectorStore.from_documents(chunked_docs, embeddings)
retriever = db.as_retriever(search_type="similarity", search_kwargs={"k": 3})

# The model, as the tutorial sets it up (temperature 0.2, 500 new tokens).
llm = ChatOpenAI(
    model="deepseek-r1-distill-qwen-1.5b",
    base_url=args.base_url,
    api_key=args.api_key,
    temperature=0.2,
    max_tokens=args.max_tokens,
)

prompt_template = """
You are an academic researcher who is doing research on Chemical Sciences. Use the following context to answer the question using information provided by the paper:

{context}

Question: {question}
"""
prompt = PromptTemplate(input_variables=["context", "question"], template=prompt_template)
llm_chain = prompt | llm | StrOutputParser()
rag_chain = {"context": retriever, "question": RunnablePassthrough()} | llm_chain

retrieved = retriever.invoke(args.question)
print(f"Retrieved {len(retrieved)} of {len(chunked_docs)} chunks:")
for d in retrieved:
    print(f"  - {d.page_content[:70]!r}...")
result = rag_chain.invoke(args.question)
print("Answer:", result)
