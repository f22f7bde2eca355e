"""Does a generated adapter fit its task's demos better than the network's shared LoRA, and can
that choose, per task, between them? (Issue 7's question: is the per-task correction a function
of the demos?)

    .venv/bin/python bench/demo_fit.py --checkpoint DIR --split FILE --eval runs/.../eval.json [--sni ../shared/data/sni]

For each task (the card's demos: Positive Examples, then instances after the scored 20; k of them),
the mean teacher-forced loss of the demo outputs under: the adapter generated from all k demos;
the shared LoRA; and, leave-one-out, the adapter generated from the other k-1 demos scoring the
one left out. The eval.json (``hypergen eval --methods generated,shared`` on the same checkpoint
and split) gives each task's ROUGE-L; printed: the mean ROUGE-L of choosing per task by each loss
comparison, of either method alone, and of an oracle choice. One JSON line (per-task losses under
"tasks").
"""
from __future__ import annotations

import argparse
import json

import torch

from hypergen.base_model import load_model, load_tokenizer
from hypergen.batching import make_batch, row_means, token_losses
from hypergen.data import load_sni
from hypergen.evaluate import demos_for
from hypergen.generator import HyperGenerator
from hypergen.lora_apply import lora_applied
from hypergen.prompts import prompt_ids, target_ids
from hypergen.task import Task
from hypergen.task_items import encode_tasks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--split", required=True)
    parser.add_argument("--eval", required=True, help="eval.json with generated and shared scored on this checkpoint and split")
    parser.add_argument("--sni", default="../shared/data/sni")
    parser.add_argument("--k", type=int, default=3)
    args = parser.parse_args()
    gen = HyperGenerator.from_pretrained(args.checkpoint, dtype="float32")
    net = gen.network
    model, tokenizer = load_model(gen.base_model, dtype="float32"), load_tokenizer(gen.base_model)
    scores = json.loads(open(args.eval).read())["tasks"]

    @torch.inference_mode()
    def with_shared(descriptions: list[Task]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The adapters for ``descriptions``, then the shared LoRA as the last task."""
        batch = encode_tasks(gen.encoder, descriptions, net.config.demo_encoding)
        made, shared = net(batch.items, batch.kinds, batch.mask), net.shared()
        return {m: (torch.cat([made[m][0], shared[m][0]]), torch.cat([made[m][1], shared[m][1]])) for m in made}

    @torch.inference_mode()
    def losses(weights, rows, row_task: list[int]) -> list[float]:
        batch = make_batch(rows, tokenizer.pad_token_id or 0)
        with lora_applied(model, gen.spec, weights, torch.tensor(row_task)):
            per_row = row_means(token_losses(model, batch), batch.target_rows, len(rows))
        return per_row.tolist()

    found = {}
    for task in load_sni(args.sni, args.split):
        demos = demos_for(task, args.k, 20)
        if len(demos) < 2 or task.name not in scores:
            continue
        rows = [(prompt_ids(tokenizer, task.instruction, d.input), target_ids(tokenizer, d.output)) for d in demos]
        n = len(rows)
        both = losses(with_shared([task.task(demos)]), rows + rows, [0] * n + [1] * n)
        loo = losses(with_shared([task.task(demos[:i] + demos[i + 1:]) for i in range(n)]), rows, list(range(n)))
        found[task.name] = {"generated": sum(both[:n]) / n, "shared": sum(both[n:]) / n, "generated_leave_one_out": sum(loo) / n}

    def rouge(name: str, method: str) -> float:
        return scores[name][method]["rougeL"]

    def chosen(by: str) -> dict[str, float]:
        picks = {name: "generated" if f[by] < f["shared"] else "shared" for name, f in found.items()}
        return {"rougeL": round(sum(rouge(n, m) for n, m in picks.items()) / len(picks), 2),
                "chose_generated": sum(m == "generated" for m in picks.values())}

    n = len(found)
    print(json.dumps({
        "tasks": n,
        "generated_fits_its_demos_better": sum(f["generated"] < f["shared"] for f in found.values()),
        "rougeL": {"generated": round(sum(rouge(t, "generated") for t in found) / n, 2),
                   "shared": round(sum(rouge(t, "shared") for t in found) / n, 2),
                   "oracle_choice": round(sum(max(rouge(t, "generated"), rouge(t, "shared")) for t in found) / n, 2)},
        "choose_by_demo_loss": chosen("generated"),
        "choose_by_leave_one_out_loss": chosen("generated_leave_one_out"),
        "tasks_losses": {t: {k: round(v, 4) for k, v in f.items()} for t, f in found.items()},
    }))


if __name__ == "__main__":
    main()
