# hnswlib and faiss HNSW on the files `ann_bench.py` writes (../shared/reference/ann-bench/,
# `DUMP_ONLY=1 python ann_bench.py DIR`), timed as `ann_files.rs` times thinkrag's index: build on
# 2 threads (M=16, ef_construction=200), then one query per call on one thread, 50 warm-up
# queries, the median of 3 passes, recall@10 against the exact top 10; at each width of EFS.
# Usage: EFS=64,96,128 python ann_peers.py DIR   (needs numpy, hnswlib, faiss-cpu)
import os, statistics, sys, time
import numpy as np

DIM, K = 384, 10
d = sys.argv[1]
X = np.fromfile(f"{d}/X.f32", dtype="<f4").reshape(-1, DIM)
Q = np.fromfile(f"{d}/Q.f32", dtype="<f4").reshape(-1, DIM)
gt = np.fromfile(f"{d}/gt.u32", dtype="<u4").reshape(-1, K)
efs = [int(e) for e in os.environ.get("EFS", "64,128,256").split(",")]
n, nq = len(X), len(Q)


def timed(search):
    for i in range(50):
        search(Q[i : i + 1])
    ts, ids = [], None
    for _ in range(3):
        res = []
        t0 = time.perf_counter()
        for i in range(nq):
            res.append(search(Q[i : i + 1]))
        ts.append(time.perf_counter() - t0)
        ids = np.vstack(res)
    r = np.mean([len(set(ids[i][:K]) & set(gt[i])) / K for i in range(nq)])
    return nq / statistics.median(ts), r


def run(name, build, set_ef, search):
    t0 = time.perf_counter()
    build()
    print(f"RESULT {name} build M=16 efC=200 2 threads: {time.perf_counter() - t0:.1f} s", flush=True)
    for ef in efs:
        set_ef(ef)
        qps, r = timed(search)
        print(f"RESULT {name} ef={ef} 1 thread single queries: {qps:.0f} QPS, recall@10={r:.4f}", flush=True)


import hnswlib

h = hnswlib.Index(space="ip", dim=DIM)
h.init_index(max_elements=n, M=16, ef_construction=200, random_seed=100)


def h_build():
    h.set_num_threads(2)
    h.add_items(X, np.arange(n))
    h.set_num_threads(1)


run("hnswlib", h_build, h.set_ef, lambda q: h.knn_query(q, k=K, num_threads=1)[0])
del h

import faiss

f = faiss.IndexHNSWFlat(DIM, 16, faiss.METRIC_INNER_PRODUCT)
f.hnsw.efConstruction = 200


def f_build():
    faiss.omp_set_num_threads(2)
    f.add(X)
    faiss.omp_set_num_threads(1)


def f_ef(ef):
    f.hnsw.efSearch = ef


run("faiss", f_build, f_ef, lambda q: f.search(q, K)[1])
