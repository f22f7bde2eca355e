"""The trained default checkpoint that ships in the package."""
import json

import torch

from hypergen.generator import HyperGenerator, packaged_checkpoint
from hypergen.prompts import prompt_ids
from hypergen.task import Demo, Task

# Written for this test in the style of a held-out task family (cause/effect), not taken from the data.
TASK = Task(
    "Given a premise and a word, decide whether the second sentence is the cause or the effect of the first. "
    "Answer with 'cause' or 'effect'.",
    (
        Demo("The glass fell off the table.\nThe glass broke.", "effect"),
        Demo("The road was wet.\nIt had rained all night.", "cause"),
        Demo("I was hungry.\nI made a sandwich.", "effect"),
    ),
)
INPUT = "The lights went out.\nThe storm knocked down a power line."


def test_packaged_checkpoint_is_small_trained_and_documented():
    folder = packaged_checkpoint()
    assert (folder / "model.safetensors").stat().st_size < 25 * 1024 * 1024
    config = json.loads((folder / "config.json").read_text())
    assert config["training"]["steps"] > 0 and config["base_model"] == "smollm2-135m-instruct"
    assert config["demo_encoding"] == "pairs" and config["training"]["init_lora"]  # shared part from the multi-task LoRA
    eval_result = json.loads((folder / "eval.json").read_text())
    assert {"base", "icl", "generated", "generated_0", "generated_8", "multitask_lora"} <= set(eval_result["methods"])
    assert all({"rougeL", "exact_match", "label_adherence"} <= set(v) for v in eval_result["methods"].values())
    assert set(eval_result["wins"]["generated"]) >= {"base", "icl", "multitask_lora"}


def test_default_adapter_changes_the_base_models_output(smollm_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gen = HyperGenerator.from_pretrained("default")
    assert gen.trained and gen.checkpoint == str(packaged_checkpoint())
    adapter = gen.generate(TASK)
    b = adapter.layer_weights(10, "v_proj")[1]
    assert b.abs().sum() > 0  # a trained network no longer emits the no-op init

    tokenizer = AutoTokenizer.from_pretrained(smollm_dir)
    ids = torch.tensor([prompt_ids(tokenizer, TASK.instruction, INPUT)])
    base = AutoModelForCausalLM.from_pretrained(smollm_dir, dtype=torch.float32)

    def greedy(model):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        return out[0, ids.shape[1]:].tolist()

    before = greedy(base)
    adapted = greedy(PeftModel.from_pretrained(base, _save(adapter)))
    assert adapted != before


def _save(adapter):
    import tempfile

    return adapter.save_peft(tempfile.mkdtemp())
