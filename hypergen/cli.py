"""The `hypergen` command: generate adapters, inspect a checkpoint, and (with the server) serve."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from hypergen.errors import HypergenError
from hypergen.settings import get_settings


def _generator(args: argparse.Namespace):
    from hypergen.generator import HyperGenerator

    settings = get_settings()
    return HyperGenerator.from_pretrained(
        args.checkpoint or settings.checkpoint, base_model=args.base_model or None, device=settings.device,
        dtype=settings.generator_dtype,
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
    if args.ray:
        from server.ray_serve import run

        env = {**os.environ, **({"HYPERGEN_ENGINE": args.engine} if args.engine else {})}
        run(settings.host, settings.port, args.replicas, env)
        return 0
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from hypergen.train import TrainConfig, Trainer

    config = TrainConfig.load(args.config)
    overrides = {k: v for k, v in (("run_dir", args.run_dir), ("init_lora", args.init_lora)) if v}
    config = config.model_copy(update=overrides)
    out = Trainer(config).train(max_steps=args.max_steps)
    print(out)
    return 0


def cmd_train_lora(args: argparse.Namespace) -> int:
    from hypergen.data import load_sni
    from hypergen.lora_train import train_lora
    from hypergen.train import TrainConfig

    config = TrainConfig.load(args.config) if args.config else TrainConfig()
    tasks = load_sni(args.sni_dir, args.split, names=args.task or None)
    print(train_lora(tasks, args.out, config, steps=args.steps, batch_size=args.batch_size, lr=args.lr, skip_first=args.skip_first))
    return 0


def cmd_refine(args: argparse.Namespace) -> int:
    from hypergen.adapter import Adapter
    from hypergen.refine import refine
    from hypergen.task import Demo

    examples = []
    for n, line in enumerate(Path(args.examples).read_text().splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("input"), str) or not isinstance(row.get("output"), str):
                raise SystemExit(f"{args.examples}:{n}: each line must be {{\"input\": str, \"output\": str}}")
            examples.append(Demo(row["input"], row["output"]))
    adapter = Adapter.load_peft(args.adapter)
    refined = refine(adapter, examples, instruction=args.instruction, base_model=args.base_model, steps=args.steps,
                     lr=args.lr, seed=args.seed, work_dir=args.work_dir)
    print(refined.save_peft(args.out))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from hypergen.evaluate import EvalConfig, Evaluation

    config = EvalConfig(
        sni_dir=args.sni_dir, out_dir=args.out, split=args.split, tasks=args.task, methods=args.methods.split(","),
        max_instances=args.max_instances, k_demos=args.k, max_tokens=args.max_tokens,
        checkpoint=args.checkpoint or "default", base_model=args.base_model, multitask_lora=args.multitask_lora,
        oracle_dir=args.oracle_dir, engine=args.engine, generator_dtype=args.generator_dtype,
    )
    result = Evaluation(config).run()
    print(json.dumps(result["methods"], indent=2))
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
    train = sub.add_parser("train", help="train a hypernetwork (resumes when run_dir has state)")
    train.add_argument("config", help="JSON or YAML file with TrainConfig fields")
    train.add_argument("--run-dir", help="override the config's run_dir")
    train.add_argument("--max-steps", type=int, help="stop after this many steps (resume later)")
    train.add_argument("--init-lora", help="PEFT folder of a trained (multi-task) LoRA: the shared part starts from it")
    train.set_defaults(func=cmd_train)

    lora = sub.add_parser("train-lora", help="train an ordinary PEFT LoRA on S-NI tasks (baselines, LoRA library)")
    lora.add_argument("--sni-dir", required=True, help="S-NI folder (tasks/ and splits/)")
    lora.add_argument("--split", default="train", help="split whose tasks to use when no --task is given")
    lora.add_argument("--task", action="append", help="task name (repeatable); default: every task of --split")
    lora.add_argument("--skip-first", type=int, default=0, help="leave each task's first N instances out (the evaluation ones)")
    lora.add_argument("--steps", type=int, default=200)
    lora.add_argument("--batch-size", type=int, default=8)
    lora.add_argument("--lr", type=float, default=1e-3)
    lora.add_argument("--config", help="TrainConfig file for base model, spec, dtype, threads")
    lora.add_argument("--out", required=True)
    lora.set_defaults(func=cmd_train_lora)

    ref = sub.add_parser("refine", help="fine-tune an adapter (e.g. a generated one) on your own examples")
    ref.add_argument("--adapter", required=True, help="PEFT folder to start from (hypergen generate --out, or the server's weights)")
    ref.add_argument("--examples", required=True, help='JSONL, one {"input": ..., "output": ...} a line (2 to 4096)')
    ref.add_argument("--instruction", default="", help="the task instruction the adapter was generated for (prompts: instruction + input)")
    ref.add_argument("--steps", type=int, default=100)
    ref.add_argument("--lr", type=float, default=1e-3)
    ref.add_argument("--seed", type=int, default=0)
    ref.add_argument("--base-model", help="base model (default: the adapter's)")
    ref.add_argument("--work-dir", help="keep the run's log.jsonl and resumable state here")
    ref.add_argument("--out", required=True, help="PEFT folder to write")
    ref.set_defaults(func=cmd_refine)

    ev = sub.add_parser("eval", help="evaluate base / ICL / generated / LoRA baselines on held-out S-NI tasks")
    ev.add_argument("--sni-dir", required=True)
    ev.add_argument("--split", default="test")
    ev.add_argument("--task", action="append", help="task name (repeatable); default: the whole split")
    ev.add_argument("--methods", default="base,icl,generated,multitask_lora,oracle_lora",
                    help="comma-separated; also generated_N for the generated adapter from N demos (e.g. generated_0)")
    ev.add_argument("--max-instances", type=int, default=20, help="scored instances per task (the first N)")
    ev.add_argument("--k", type=int, default=3, help="demos for icl and generated (generated_N methods use N)")
    ev.add_argument("--max-tokens", type=int, default=32)
    ev.add_argument("--multitask-lora", help="PEFT folder of the multi-task LoRA")
    ev.add_argument("--oracle-dir", help="folder of per-task LoRAs: <task>/adapter")
    ev.add_argument("--engine", default="auto", choices=["auto", "vllm", "hf"])
    ev.add_argument("--generator-dtype", default="float32", choices=["float32", "bfloat16", "int8", "auto"],
                    help="compute dtype of the encoder and hypernetwork (float32: exact; a server uses HYPERGEN_GENERATOR_DTYPE)")
    ev.add_argument("--out", required=True, help="output folder (eval.json, eval.md, eval.png); re-run to resume")
    model_args(ev)
    ev.set_defaults(func=cmd_eval)

    serve = sub.add_parser("serve", help="run the HTTP server (settings from HYPERGEN_* variables)")
    serve.add_argument("--host", help="bind address (default 127.0.0.1, HYPERGEN_HOST)")
    serve.add_argument("--port", type=int, help="port (default 8000, HYPERGEN_PORT)")
    serve.add_argument("--engine", choices=["vllm", "hf"], help="generation engine (HYPERGEN_ENGINE)")
    serve.add_argument("--ray", action="store_true", help="serve on Ray Serve: replicas routed by adapter id (RAY_ADDRESS joins a cluster)")
    serve.add_argument("--replicas", type=int, default=1, help="with --ray: hypergen replicas (default 1)")
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
