"""`llmtune serve` under load: 50 concurrent /v1/classify clients, then a burst past the queue.

    python -m llmtune model=tiny trainer.max_epochs=1 dataset.split.train_per_class=10 \
        dataset.split.test_per_class=10 hydra.run.dir=/tmp/serve-bench-run
    python benchmarks/serve_load.py --run /tmp/serve-bench-run
    python benchmarks/serve_load.py --run /tmp/serve-bench-run --serve-module /tmp/serve_before.py  # another serve.py

The server runs for real in a child process (uvicorn on 127.0.0.1, a free port), built by `create_app` of the given
serve module (default llmtune.serve), so the clients in this process do not share its interpreter. Options that
module's create_app does not take (max_queue on the code before the queue) are left out. --omp-wait-policy sets
OMP_WAIT_POLICY for the server (benchmarks/README.md: "Serving under load" says why). Prints one JSON object.
"""

import argparse
import asyncio
import contextlib
import importlib.util
import inspect
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx

SENTENCES = ["Profit rose sharply in the quarter.", "The company cut its forecast for the year.",
             "Sales were flat compared with last year.", "Operating loss widened to EUR 3 million.",
             "The board proposes a higher dividend.", "Net sales decreased by 12 percent."]
STARTUP_S = 120  # loading the run and binding the port; the bounded wait for the child's first line


def serve(run: str, module_path: str | None, max_queue: int | None) -> None:
    """The child: load the run, print the port, then serve until killed."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    import uvicorn

    from llmtune.inference import load_run

    if module_path:
        spec = importlib.util.spec_from_file_location("serve_under_test", module_path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        import llmtune.serve as module
    accepted = inspect.signature(module.create_app).parameters
    options = {"max_queue": max_queue} if max_queue and "max_queue" in accepted else {}
    app = module.create_app(load_run(run), **options)
    # Loopback only; a free port, held from here on; uvicorn's own backlog, so a burst's connects are not reset.
    sock = socket.create_server(("127.0.0.1", 0), backlog=2048)
    print(sock.getsockname()[1], flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="error")).run(sockets=[sock])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def classify(http: httpx.AsyncClient, texts: list[str], honour_retry_after: bool = False) -> tuple[int, float]:
    start = time.perf_counter()
    try:
        response = await http.post("/v1/classify", json={"input": texts})
    except httpx.TransportError:  # counted (status 0), not fatal: the server may drop connections under a burst
        return 0, time.perf_counter() - start
    if honour_retry_after and response.status_code == 429:  # as OpenAI's client does, rather than hammering
        await asyncio.sleep(min(10, int(response.headers.get("Retry-After", 1))))
    return response.status_code, time.perf_counter() - start


async def load(base_url: str, clients: int, requests: int) -> dict:
    """clients users, each with its own connection (one shared httpx pool of 50 costs more CPU than the server
    under test, and its bookkeeping shows up as latency), sending `requests` one-text requests back to back."""
    async with contextlib.AsyncExitStack() as stack:
        https = [await stack.enter_async_context(client(base_url)) for _ in range(clients)]
        await asyncio.gather(*(http.get("/v1/models") for http in https))  # connected before the clock starts

        async def user(c: int) -> list[tuple[int, float]]:
            return [await classify(https[c], [SENTENCES[(c + r) % len(SENTENCES)]], True) for r in range(requests)]

        start = time.perf_counter()
        results = [row for rows in await asyncio.gather(*(user(c) for c in range(clients))) for row in rows]
        wall = time.perf_counter() - start
    ok = [seconds for status, seconds in results if status == 200]
    return {"clients": clients, "requests": len(results), "ok": len(ok),
            "refused_429": sum(status == 429 for status, _ in results), "wall_s": round(wall, 2),
            "requests_per_s": round(len(ok) / wall, 1), "p50_ms": round(1000 * statistics.median(ok)),
            "p99_ms": round(1000 * percentile(ok, 0.99))}


async def burst(base_url: str, size: int, texts_per_request: int) -> dict:
    """size heavy requests at once, each from its own client; one cheap request 50 ms into the burst (does it wait
    behind it?), and one once the burst is all answered (does the server still answer?)."""
    texts = [SENTENCES[i % len(SENTENCES)] for i in range(texts_per_request)]

    async def one(texts: list[str], delay: float = 0) -> tuple[int, float]:
        await asyncio.sleep(delay)
        async with client(base_url) as http:
            return await classify(http, texts)

    start = time.perf_counter()
    *results, (during_status, during_seconds) = await asyncio.gather(
        *(one(texts) for _ in range(size)), one([SENTENCES[0]], delay=0.05))
    wall = time.perf_counter() - start
    after_status, after_seconds = await one([SENTENCES[0]])
    statuses = [status for status, _ in results]
    return {"requests": size, "texts_per_request": texts_per_request, "status_counts":
            {str(s): statuses.count(s) for s in sorted(set(statuses))}, "wall_s": round(wall, 2),
            "slowest_ms": round(1000 * max(seconds for _, seconds in results)),
            "cheap_during_burst": {"status": during_status, "ms": round(1000 * during_seconds)},
            "after_burst": {"status": after_status, "ms": round(1000 * after_seconds)}}


def client(base_url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base_url, timeout=300)


async def measure(port: int, args) -> dict:
    base_url = f"http://127.0.0.1:{port}"
    async with client(base_url) as http:
        for _ in range(3):  # warm-up: first forwards pay one-off costs
            await classify(http, SENTENCES[:2])
    return {"load": await load(base_url, args.clients, args.requests),
            "burst": await burst(base_url, args.burst, args.burst_texts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="/tmp/serve-bench-run", help="a finished classification run folder")
    parser.add_argument("--serve-module", help="path to a serve.py to benchmark instead of llmtune.serve")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=10, help="requests per client")
    parser.add_argument("--burst", type=int, default=150, help="requests fired at once after the load")
    parser.add_argument("--burst-texts", type=int, default=32, help="texts per burst request")
    parser.add_argument("--max-queue", type=int, help="passed on where create_app takes it (default: its own)")
    parser.add_argument("--omp-wait-policy", choices=["ACTIVE", "PASSIVE"],
                        help="OMP_WAIT_POLICY for the server process (default: unset, libgomp's spin-then-sleep)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # internal: be the server
    args = parser.parse_args()
    if args.serve:
        return serve(args.run, args.serve_module, args.max_queue)
    command = [sys.executable, __file__, "--serve", "--run", args.run, "--max-queue", str(args.max_queue or 0)]
    env = {**os.environ, **({"OMP_WAIT_POLICY": args.omp_wait_policy} if args.omp_wait_policy else {})}
    child = subprocess.Popen(command + (["--serve-module", args.serve_module] if args.serve_module else []),
                             stdout=subprocess.PIPE, text=True, env=env)
    try:
        first_line = asyncio.run(asyncio.wait_for(asyncio.to_thread(child.stdout.readline), STARTUP_S))
        if not first_line.strip():
            sys.exit(f"the server exited before listening (exit status {child.wait(timeout=10)})")
        result = asyncio.run(measure(int(first_line), args))
    finally:
        child.terminate()
        child.wait(timeout=30)
    result.update(server=args.serve_module or "llmtune.serve", omp_wait_policy=env.get("OMP_WAIT_POLICY"),
                  load_average_1min=round(os.getloadavg()[0], 1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
