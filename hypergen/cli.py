"""The `hypergen` command: generate adapters, inspect a checkpoint, and (with the server) serve."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from hypergen.errors import HypergenError
from hypergen.settings import get_settings


def _generator(args: argparse.Namespace):
    from hypergen.generator import HyperGenerator

    settings = get_settings()
    return HyperGenerator.from_pretrained(
        args.checkpoint or settings.checkpoint, base_model=args.base_model or None, device=settings.device
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from hypergen.task import Task, read_demos_jsonl

    demos = []
    if args.demos:
        path = Path(args.demos)
        if not path.is_file():
            raise HypergenError(f"no such file {path}", "--demos")
        demos = read_demos_jsonl(path.read_text().splitlines(), source=str(path))
    task = Task(instruction=args.instruction, demos=tuple(demos))
    generator = _generator(args)
    adapter = generator.generate(task)
    adapter.save_peft(args.out)
    print(adapter.task_hash)
    print(f"wrote {adapter.num_params:,} LoRA parameters to {args.out}", file=sys.stderr)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    print(json.dumps(_generator(args).info(), indent=2))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.app import create_app

    settings = get_settings()
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port), ("engine", args.engine)) if v is not None}
    settings = settings.model_copy(update=overrides)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hypergen", description="LoRA adapters from task descriptions.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--checkpoint", help="hypernetwork checkpoint folder (default: the packaged one)")
        p.add_argument("--base-model", help="base model name or folder (default: the checkpoint's)")

    gen = sub.add_parser("generate", help="generate a PEFT LoRA for one task")
    gen.add_argument("--instruction", required=True, help="the task instruction")
    gen.add_argument("--demos", help='JSONL file of {"input": ..., "output": ...} lines')
    gen.add_argument("--out", required=True, help="folder to write the PEFT adapter to")
    model_args(gen)
    gen.set_defaults(func=cmd_generate)

    info = sub.add_parser("info", help="describe the base model, encoder, checkpoint and LoRA spec")
    model_args(info)
    info.set_defaults(func=cmd_info)
    serve = sub.add_parser("serve", help="run the HTTP server (settings from HYPERGEN_* variables)")
    serve.add_argument("--host", help="bind address (default 127.0.0.1, HYPERGEN_HOST)")
    serve.add_argument("--port", type=int, help="port (default 8000, HYPERGEN_PORT)")
    serve.add_argument("--engine", choices=["vllm", "hf"], help="generation engine (HYPERGEN_ENGINE)")
    serve.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    try:
        return args.func(args)
    except HypergenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
