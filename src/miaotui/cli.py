"""The `miaotui` command: generate | chat | serve | bench.

Heavy modules (torch, the engine, transformers) are imported inside the commands, so `--help`
and `--version` answer at once and a Ctrl-C at any moment lands in `main`, which exits 130 with
a one-line note instead of a traceback. While a reply streams, Ctrl-C is taken between engine
steps (`_StopBetweenSteps`), never inside one, so the engine is left consistent.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

from miaotui import __version__
from miaotui.engine_args import add_chat_template_arg, add_model_args, load_chat_template, model_and_cache_configs
from miaotui.errors import MiaotuiError

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it

CHAT_HELP = """commands:
  /help    this list
  /reset   clear the conversation (keeps the system prompt)
  /exit    quit (also /quit, Ctrl-D)
  Ctrl-C   stop the reply being written; at the prompt, quit"""
CHAT_COMMANDS = ("/help", "/reset", "/exit", "/quit")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help ends with its default (flags without one say nothing more)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if default is None or default is False or default is argparse.SUPPRESS or "(default" in text:
            return text
        return super()._get_help_string(action)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95,
                   help="nucleus sampling: keep the smallest set of tokens whose probability sums to P (1 disables)")
    p.add_argument("--top-k", type=int, default=40, help="keep the K most likely tokens (0 disables)")
    p.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens less likely than P times the most likely one (0 disables)")
    p.add_argument("--seed", type=int, default=None,
                   help="makes sampling reproducible (default: fresh randomness every run)")
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating after the end-of-text token")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeated tokens")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="in [-2, 2]: subtracted once from every token already generated")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="in [-2, 2]: subtracted per occurrence of a token already generated")


def _add_conversation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", default=None, help="system prompt (with the chat template)")
    add_chat_template_arg(p, "instead of the model's")


def _sampling_params(args: argparse.Namespace) -> Any:
    from miaotui.sampling_params import SamplingParams

    return SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        seed=args.seed, max_tokens=args.max_tokens, stop=args.stop, ignore_eos=args.ignore_eos,
        repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
    )


def _engine(args: argparse.Namespace) -> Any:
    from miaotui.config import SchedulerConfig
    from miaotui.engine.llm_engine import LLMEngine

    return LLMEngine(*model_and_cache_configs(args), SchedulerConfig())


class _StopBetweenSteps:
    """While a reply streams, SIGINT sets a flag that the loop reads between steps."""

    def __init__(self) -> None:
        self.requested = threading.Event()

    def __enter__(self) -> _StopBetweenSteps:
        # A process started with SIGINT ignored (nohup, a background job) keeps ignoring it.
        self._previous = signal.getsignal(signal.SIGINT)
        if self._previous is not signal.SIG_IGN:
            signal.signal(signal.SIGINT, lambda *_: self.requested.set())
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._previous)


def stream(engine: Any, prompt: str | list[int], params: Any,
           stop: _StopBetweenSteps | None = None) -> Iterator[str]:
    """Yield text deltas of one request as they are generated. A stop request (Ctrl-C) aborts
    the request after the current step and raises KeyboardInterrupt."""
    request_id = engine.add_request(None, prompt, params)
    printed = 0
    try:
        while True:
            if stop is not None and stop.requested.is_set():
                raise KeyboardInterrupt
            for out in engine.step():
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


def _has_chat_template(tokenizer: Any, template: str | None) -> bool:
    return tokenizer is not None and bool(template or getattr(tokenizer, "chat_template", None))


def _messages(system: str | None, history: list[dict[str, str]]) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + history


def cmd_generate(args: argparse.Namespace) -> int:
    from miaotui.tokenizer import chat_prompt_ids

    # From stdin, the line end that `echo` or a file adds is not part of the prompt.
    prompt = sys.stdin.read().rstrip("\r\n") if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise ValueError("prompt: empty" + (" (standard input gave no text)" if args.prompt == "-" else ""))
    params = _sampling_params(args)  # bad flags fail before the model loads
    template = load_chat_template(args.chat_template)
    engine = _engine(args)
    request: str | list[int] = prompt
    if not args.raw and _has_chat_template(engine.tokenizer, template):
        messages = _messages(args.system, [{"role": "user", "content": prompt}])
        request = chat_prompt_ids(engine.tokenizer, messages, chat_template=template)
    elif not args.raw:
        logging.getLogger("miaotui").info("the model has no chat template: completing the prompt as it is")
    with _StopBetweenSteps() as stop:
        for delta in stream(engine, request, params, stop):
            sys.stdout.write(delta)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from miaotui.tokenizer import chat_prompt_ids

    params = _sampling_params(args)
    template = load_chat_template(args.chat_template)
    engine = _engine(args)
    history: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    if interactive:
        print("miaotui chat — type a message; /help lists the commands, Ctrl-D quits.")
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            if interactive:
                print()
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/help":
            print(CHAT_HELP)
            continue
        if line == "/reset":
            history = []
            print("(conversation cleared)")
            continue
        if line.startswith("/") and " " not in line:
            print(f"unknown command {line}; /help lists them")
            continue
        history.append({"role": "user", "content": line})
        ids = chat_prompt_ids(engine.tokenizer, _messages(args.system, history), chat_template=template)
        reply = []
        with _StopBetweenSteps() as stop:
            try:
                for delta in stream(engine, ids, params, stop):
                    reply.append(delta)
                    sys.stdout.write(delta)
                    sys.stdout.flush()
            except KeyboardInterrupt:  # the reply stops; the conversation goes on
                sys.stdout.write(" [stopped]")
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="miaotui", description="秒推 — fast LLM inference",
                                     formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"miaotui {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", formatter_class=_Formatter,
                         help="answer one prompt, streamed to stdout",
                         description="Answer one prompt, streamed to stdout. The prompt goes through the "
                                     "model's chat template as a user message when the model has one (as "
                                     "llama.cpp's CLI and Ollama do); --raw completes the text as it is.")
    gen.add_argument("prompt", help="the prompt; - reads it from standard input")
    gen.add_argument("--raw", action="store_true",
                     help="plain completion: send the prompt as it is, without the chat template")
    add_model_args(gen)
    _add_sampling_args(gen)
    _add_conversation_args(gen)
    gen.set_defaults(func=cmd_generate)
    chat = sub.add_parser("chat", formatter_class=_Formatter,
                          help="interactive chat in the terminal (model's chat template)",
                          description="Interactive chat in the terminal, through the model's chat template.\n"
                                      + CHAT_HELP)
    add_model_args(chat)
    _add_sampling_args(chat)
    _add_conversation_args(chat)
    chat.set_defaults(func=cmd_chat)
    from miaotui.server.serve import add_serve_args, cmd_serve

    serve = sub.add_parser("serve", formatter_class=_Formatter,
                           help="OpenAI-compatible HTTP server with a web chat page")
    add_model_args(serve)
    add_serve_args(serve)
    serve.set_defaults(func=cmd_serve)
    bench = sub.add_parser("bench", help="benchmarks against a peer, same work, same run")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    from miaotui.bench import throughput

    tp = bench_sub.add_parser("throughput", formatter_class=_Formatter,
                              help="offline throughput vs transformers generate()")
    throughput.build_parser(tp)
    tp.set_defaults(func=throughput.run)
    from miaotui.bench import serve as bench_serve

    bs = bench_serve.build_parser(bench_sub.add_parser(
        "serve", formatter_class=_Formatter,
        help="online load against any OpenAI-compatible server (TTFT, TPOT, ITL, tokens/s)"))
    bs.set_defaults(func=bench_serve.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        level = getattr(args, "log_level", "info").upper()
        logging.basicConfig(level=level, format="miaotui: %(message)s", stream=sys.stderr)
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns the output
        return args.func(args)
    except KeyboardInterrupt:
        sys.stdout.flush()
        print("\nmiaotui: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (MiaotuiError, ValueError) as exc:
        print(f"miaotui: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
