"""Online serving benchmark: a load generator for any OpenAI-compatible server (ours, llama.cpp's...).

    miaotui bench serve --base-url http://127.0.0.1:8000 [--concurrency 16] [--num-requests 64]
        [--input-len 128] [--output-len 128] [--api-key K] [--model NAME] [--json PATH]

Each request streams `POST /v1/completions` with a prompt of exactly --input-len token ids (drawn
with a fixed seed from ordinary text by the embedded model's tokenizer, or --tokenizer's: servers of
the same model then get identical work) and asks for exactly --output-len tokens
(`ignore_eos`; --no-ignore-eos for servers that reject it). Reports TTFT, TPOT (per output token after the first), ITL (between streamed
chunks) p50/p99, request throughput and output-token throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass, field


@dataclass(slots=True)
class RequestResult:
    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str = ""


@dataclass(slots=True)
class ServeReport:
    base_url: str
    model: str
    concurrency: int
    completed: int
    failed: int
    duration_s: float
    request_throughput: float
    output_tok_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    tpot_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def _one(client, model: str, prompt: str | list[int], output_len: int, ignore_eos: bool,
               banned: list[int]) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    if banned:  # plain OpenAI: servers without ignore_eos still produce exactly output_len tokens
        body["logit_bias"] = {str(t): -100 for t in banned}
    if ignore_eos:  # an extension (vLLM, llama.cpp, ours); servers that reject it run without
        body["ignore_eos"] = True
    start = time.perf_counter()
    last = None
    result = RequestResult(ok=False)
    chunks = 0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                result.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"].get("completion_tokens", 0)
                if "error" in chunk:
                    result.error = str(chunk["error"])[:200]
                    return result
                if any(c.get("text") for c in chunk.get("choices") or []):
                    now = time.perf_counter()
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    chunks += 1
    except Exception as exc:  # noqa: BLE001 - a failed request is counted, the run goes on
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.latency = time.perf_counter() - start
    result.output_tokens = result.output_tokens or chunks
    result.ok = last is not None
    return result


async def run_load(base_url: str, model: str | None, prompts: list[str] | list[list[int]], output_len: int,
                   concurrency: int, api_key: str | None, ignore_eos: bool = True,
                   banned: list[int] | None = None) -> ServeReport:
    import httpx
    from tqdm.auto import tqdm

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers, timeout=600,
                                 limits=limits) as client:
        if model is None:
            resp = await client.get("/v1/models")
            resp.raise_for_status()
            model = resp.json()["data"][0]["id"]
        gate = asyncio.Semaphore(concurrency)
        bar = tqdm(total=len(prompts), desc=f"bench serve {base_url}", unit="req")

        async def limited(p):
            async with gate:
                r = await _one(client, model, p, output_len, ignore_eos, banned or [])
                bar.update(1)
                return r

        start = time.perf_counter()
        results = await asyncio.gather(*(limited(p) for p in prompts))
        duration = time.perf_counter() - start
        bar.close()
    done = [r for r in results if r.ok]
    for r in results:
        if not r.ok:
            print(f"request failed: {r.error}", file=sys.stderr)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    itl = [x for r in done for x in r.itl]
    ms = 1000.0
    return ServeReport(
        base_url, model, concurrency, len(done), len(results) - len(done), duration,
        len(done) / duration, sum(r.output_tokens for r in done) / duration,
        _pct([r.ttft for r in done], 50) * ms, _pct([r.ttft for r in done], 99) * ms,
        _pct(tpot, 50) * ms, _pct(tpot, 99) * ms, _pct(itl, 50) * ms, _pct(itl, 99) * ms)


ROWS = [("completed / failed", lambda r: f"{r.completed} / {r.failed}"),
        ("duration (s)", lambda r: f"{r.duration_s:.1f}"),
        ("requests/s", lambda r: f"{r.request_throughput:.2f}"),
        ("output tokens/s", lambda r: f"{r.output_tok_s:.1f}"),
        ("TTFT p50 / p99 (ms)", lambda r: f"{r.ttft_p50_ms:.0f} / {r.ttft_p99_ms:.0f}"),
        ("TPOT p50 / p99 (ms)", lambda r: f"{r.tpot_p50_ms:.1f} / {r.tpot_p99_ms:.1f}"),
        ("ITL p50 / p99 (ms)", lambda r: f"{r.itl_p50_ms:.1f} / {r.itl_p99_ms:.1f}")]


def print_table(reports: list[tuple[str, ServeReport]]) -> None:
    print("\n| | " + " | ".join(name for name, _ in reports) + " |")
    print("|---" * (len(reports) + 1) + "|")
    for label, fmt in ROWS:
        print(f"| {label} | " + " | ".join(fmt(r) for _, r in reports) + " |")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="model name to send (default: the server's first)")
    parser.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    parser.add_argument("--num-requests", type=int, default=64, help="requests in all")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight at once")
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    parser.add_argument("--output-len", type=int, default=128, help="generated tokens per request")
    parser.add_argument("--tokenizer", default=None,
                        help="model whose tokenizer draws the prompts (default: the embedded model)")
    parser.add_argument("--no-ignore-eos", action="store_true",
                        help="do not send ignore_eos (for servers that reject unknown fields)")
    parser.add_argument("--label", default=None, help="column name in the table (default: the URL)")
    parser.add_argument("--json", default=None, help="also write the report here")
    return parser


def run(args: argparse.Namespace) -> int:
    from miaotui.bench.throughput import make_prompts
    from miaotui.loader import resolve_model
    from miaotui.tokenizer import load_tokenizer

    for name in ("num_requests", "concurrency", "input_len", "output_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 1")
    source = resolve_model(args.tokenizer)
    prompts = make_prompts(load_tokenizer(str(source.path), source.is_gguf), args.num_requests, args.input_len)
    report = asyncio.run(run_load(args.base_url, args.model, prompts, args.output_len, args.concurrency,
                                  args.api_key, not args.no_ignore_eos))
    print(f"bench serve: {args.num_requests} requests, {args.input_len} in / {args.output_len} out, "
          f"concurrency {args.concurrency}, model {report.model}")
    print_table([(args.label or args.base_url, report)])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(asdict(report), f, indent=2)
    return 0 if report.failed == 0 else 1


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
