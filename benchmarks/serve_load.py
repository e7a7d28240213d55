"""Serving throughput: the Ray Serve endpoint under 1, 8 and 32 concurrent clients on loopback, side by side with the
same model answering one request at a time in a plain transformers loop, in one run.

    python benchmarks/serve_load.py [--model smollm2-135m-instruct] [--max-tokens 32] [--levels 1,8,32]
                                    [--requests-per-client 2] [--json PATH]

Every request is a chat completion of the same kind (greedy, max_tokens fixed, one of a few short questions); the
endpoint batches concurrent requests on its replica (@serve.batch, left-padded generate). Reported per setting:
requests/s, generated tokens/s (usage.completion_tokens, or the loop's new tokens), p50/p95 latency, errors, and
tokens/s as a ratio of the one-at-a-time loop. The loop runs first, before Ray starts, on the same cores.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUESTIONS = ["What is the capital of France?", "Give me three tips for staying focused.",
             "Explain what a neural network is in one sentence.", "Write a haiku about the sea.",
             "How do I boil an egg?", "What is 12 times 7?", "Name a famous painter and one painting.",
             "Why is the sky blue?"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summary(name: str, latencies: list[float], tokens: int, errors: int, wall: float) -> dict:
    return {"setting": name, "requests": len(latencies) + errors, "errors": errors, "wall_s": round(wall, 2),
            "requests_per_s": round(len(latencies) / wall, 2), "tokens_per_s": round(tokens / wall, 1),
            "p50_s": round(percentile(latencies, 0.5), 3) if latencies else None,
            "p95_s": round(percentile(latencies, 0.95), 3) if latencies else None}


def one_at_a_time(model_source: str, requests: int, max_tokens: int) -> dict:
    """The plain alternative: load the model in this process, answer the requests one after another."""
    import torch

    from core.devices import usable_cores
    from core.generate import prompt_text
    from core.models import load_causal_lm, load_tokenizer

    torch.set_num_threads(usable_cores())
    tokenizer, model = load_tokenizer(model_source), load_causal_lm(model_source, dtype=torch.float32).eval()
    latencies, tokens = [], 0
    start = time.perf_counter()
    for i in range(requests):
        t0 = time.perf_counter()
        text = prompt_text(tokenizer, [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], None)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, temperature=None, top_p=None,
                                 top_k=None, pad_token_id=tokenizer.pad_token_id)
        new = out[0, ids["input_ids"].shape[1]:].tolist()
        tokens += next((k for k, t in enumerate(new) if t == tokenizer.eos_token_id), len(new))
        latencies.append(time.perf_counter() - t0)
    return summary("one at a time (transformers loop)", latencies, tokens, 0, time.perf_counter() - start)


def load(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)

    def ask(i: int):
        t0 = time.perf_counter()
        try:
            reply = client.chat.completions.create(
                model=model, max_tokens=max_tokens, temperature=0,
                messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}])
            return time.perf_counter() - t0, reply.usage.completion_tokens, None
        except Exception as err:  # counted, not raised: the figure is how many fail
            return time.perf_counter() - t0, 0, repr(err)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(ask, range(requests)))
    wall = time.perf_counter() - start
    ok = [r for r in results if r[2] is None]
    return summary(f"Ray Serve, {clients} concurrent client(s)", [r[0] for r in ok], sum(r[1] for r in ok),
                   len(results) - len(ok), wall) | {"clients": clients,
                                                    "first_error": next((r[2] for r in results if r[2]), None)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--levels", default="1,8,32")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--min-requests", type=int, default=8)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--port", type=int, help="HTTP port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]

    baseline = one_at_a_time(args.model, args.min_requests, args.max_tokens)
    print(json.dumps(baseline), flush=True)

    from ray import serve

    from cluster.session import ray_session
    from core.models import cache_root
    from serving.app import build_app
    from serving.sources import model_name

    port = args.port or free_port()
    rows = [baseline]
    # a local cluster as `raydpo serve` starts one (loopback only, stopped at the end)
    with ray_session(num_cpus=2, num_gpus=None, log_file=cache_root() / "logs" / "serve-load.log"):
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"models": [args.model], "max_batch_size": args.max_batch_size}), name="raydpo",
                  route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        load(url, model_name(args.model), 2, 4, 4)  # warm-up: the first batch pays for lazy initialisation
        for clients in levels:
            row = load(url, model_name(args.model), clients, max(args.min_requests, clients * args.requests_per_client),
                       args.max_tokens)
            print(json.dumps(row), flush=True)
            rows.append(row)
        serve.shutdown()
    for row in rows:
        row["tokens_per_s_vs_one_at_a_time"] = round(row["tokens_per_s"] / baseline["tokens_per_s"], 2)
    print(f"\n| setting | requests | errors | requests/s | tokens/s | x one-at-a-time | p50 s | p95 s |\n"
          f"|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['requests']} | {r['errors']} | {r['requests_per_s']} | {r['tokens_per_s']} | "
              f"{r['tokens_per_s_vs_one_at_a_time']} | {r['p50_s']} | {r['p95_s']} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": args.model, "max_tokens": args.max_tokens, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
