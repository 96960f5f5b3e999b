"""A `quipc bench` worker that dies as a crashing native library would (tests/test_bench.py):
"torch-ref" before it reports ready, every other backend at its first repetition."""
import os


def dying_worker(name, spec, threads, conn):
    if name == "torch-ref":
        os._exit(3)
    conn.send(("ready", {"rss_before_load_mb": 1.0, "rss_loaded_mb": 1.0}))
    conn.recv()
    os._exit(4)
