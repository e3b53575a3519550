"""The `miaotui` command: generate | chat | serve | bench."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator

from miaotui.config import SchedulerConfig
from miaotui.engine_args import add_model_args, model_and_cache_configs
from miaotui.engine.llm_engine import LLMEngine
from miaotui.errors import MiaotuiError
from miaotui.outputs import RequestOutput
from miaotui.sampling_params import SamplingParams
from miaotui.tokenizer import chat_prompt_ids


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=40, help="0 disables")
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)


def _sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        seed=args.seed, max_tokens=args.max_tokens, stop=args.stop,
        repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
    )


def _engine(args: argparse.Namespace) -> LLMEngine:
    return LLMEngine(*model_and_cache_configs(args), SchedulerConfig())


def stream(engine: LLMEngine, prompt: str | list[int], params: SamplingParams) -> Iterator[str]:
    """Yield text deltas of one request as they are generated."""
    request_id = engine.add_request(None, prompt, params)
    printed = 0
    try:
        while True:
            outputs: list[RequestOutput] = engine.step()
            for out in outputs:
                if out.request_id != request_id:
                    continue
                text = out.outputs[0].text
                if len(text) > printed:
                    yield text[printed:]
                    printed = len(text)
                if out.finished:
                    return
    finally:
        engine.abort_request(request_id)


def cmd_generate(args: argparse.Namespace) -> int:
    params = _sampling_params(args)  # bad flags fail before the model loads
    engine = _engine(args)
    for delta in stream(engine, args.prompt, params):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    params = _sampling_params(args)
    engine = _engine(args)
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    if interactive:
        print("miaotui chat — type a message; /reset clears the conversation, Ctrl-D quits.")
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            if interactive:
                print()
            return 0
        except KeyboardInterrupt:
            print()
            return 0
        line = line.strip()
        if not line:
            continue
        if line == "/reset":
            messages = messages[:1] if args.system else []
            print("(conversation cleared)")
            continue
        messages.append({"role": "user", "content": line})
        ids = chat_prompt_ids(engine.tokenizer, messages)
        reply = []
        try:
            for delta in stream(engine, ids, params):
                reply.append(delta)
                sys.stdout.write(delta)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="miaotui", description="秒推 — fast LLM inference")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="complete one prompt, streamed to stdout")
    gen.add_argument("prompt")
    add_model_args(gen)
    _add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)
    chat = sub.add_parser("chat", help="interactive chat in the terminal (model's chat template)")
    chat.add_argument("--system", default=None, help="system prompt")
    add_model_args(chat)
    _add_sampling_args(chat)
    chat.set_defaults(func=cmd_chat)
    from miaotui.server.serve import add_serve_args, cmd_serve

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server with a web chat page")
    add_model_args(serve)
    add_serve_args(serve)
    serve.set_defaults(func=cmd_serve)
    bench = sub.add_parser("bench", help="benchmarks against a peer, same work, same run")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    from miaotui.bench import throughput

    tp = bench_sub.add_parser("throughput", help="offline throughput vs transformers generate()")
    throughput.build_parser(tp)
    tp.set_defaults(func=throughput.run)
    from miaotui.bench import serve as bench_serve

    bs = bench_serve.build_parser(bench_sub.add_parser(
        "serve", help="online load against any OpenAI-compatible server (TTFT, TPOT, ITL, tokens/s)"))
    bs.set_defaults(func=bench_serve.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="miaotui: %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns the output
    try:
        return args.func(args)
    except (MiaotuiError, ValueError) as exc:
        print(f"miaotui: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
