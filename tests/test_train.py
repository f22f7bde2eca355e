"""Training and evaluation on a tiny random Llama and self-written tasks (no shared data)."""
import dataclasses
import json
import random

import pytest
import torch

from hypergen.adapter import TRAINING_FILE
from hypergen.batching import make_batch, row_means
from hypergen.train import TrainConfig, Trainer, delta_sq_distance, delta_sq_norm

from hypergen.data import load_sni
from hypergen.generator import HyperGenerator
from test_data import sni_task, write_sni


@pytest.fixture()
def tiny_config(tiny_llama_dir, tmp_path):
    return TrainConfig(
        run_dir=str(tmp_path / "run"), base_model=str(tiny_llama_dir), synthetic_tasks=12, steps=4, tasks_per_step=2,
        instances_per_task=2, warmup_steps=1, lr=1e-3, checkpoint_every=2, d_model=64, d_hidden=64, n_blocks=1, dtype="float32",
    )


def test_one_step_lowers_the_loss_on_a_fixed_batch(tiny_config):
    trainer = Trainer(tiny_config)
    sample = trainer.sample_mtf(random.Random(0))
    before, _ = trainer.supervised_loss(*sample, random.Random(0))
    head_before = trainer.net.b_heads["q_proj"].weight.detach().clone()
    base_before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.optimizer.zero_grad()
    before.backward()
    trainer.optimizer.step()
    after, logs = trainer.supervised_loss(*sample, random.Random(0))
    assert after.item() < before.item()
    assert not torch.equal(head_before, trainer.net.b_heads["q_proj"].weight)
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in base_before.items())  # base frozen
    assert logs["correction_norm"] > 0


def test_the_contrastive_term_asks_own_adapters_to_fit_better(tiny_config):
    contrastive = Trainer(tiny_config.model_copy(update={"contrastive_weight": 1.0, "contrastive_margin": 0.5}))
    plain = Trainer(tiny_config)
    sample = plain.sample_mtf(random.Random(0))
    plain_loss, plain_logs = plain.supervised_loss(*sample, random.Random(0))
    loss, logs = contrastive.supervised_loss(*sample, random.Random(0))
    assert logs["lm_loss"] == pytest.approx(plain_logs["lm_loss"], rel=1e-4)  # the own rows' loss is unchanged
    assert logs["contrastive"] > 0 and abs(logs["contrast_gap"]) < 0.5  # an untrained correction barely differs per task
    assert loss.item() == pytest.approx(plain_loss.item() + logs["contrastive"], rel=1e-4)
    grads = []
    for trainer, value in ((plain, plain_loss), (contrastive, loss)):
        trainer.optimizer.zero_grad()
        value.backward()
        grads.append(trainer.net.b_heads["q_proj"].weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


def test_row_means_average_each_rows_tokens():
    values = torch.tensor([1.0, 3.0, 5.0, 2.0])
    assert row_means(values, torch.tensor([0, 0, 2, 2]), 3).tolist() == [2.0, 0.0, 3.5]


def test_resume_takes_the_same_next_step(tiny_config):
    straight = Trainer(tiny_config.model_copy(update={"run_dir": tiny_config.run_dir + "-a"}))
    straight.train(max_steps=2)
    expected = straight.train_step()

    interrupted = Trainer(tiny_config.model_copy(update={"run_dir": tiny_config.run_dir + "-b"}))
    interrupted.train(max_steps=2)  # saves state at step 2
    resumed = Trainer(tiny_config.model_copy(update={"run_dir": tiny_config.run_dir + "-b"}))
    assert resumed.load_state() and resumed.step == 2
    got = resumed.train_step()
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert got["lr"] == expected["lr"]


def test_a_run_with_only_its_bf16_weights_resumes_with_a_rewarm(tiny_config):
    import shutil

    first = Trainer(tiny_config)
    first.train(max_steps=2)
    run = first.run_dir
    assert (run / "weights" / "model.safetensors").stat().st_size < (run / "state" / "model.safetensors").stat().st_size
    shutil.rmtree(run / "state")  # what a new machine has when only the weights were committed
    resumed = Trainer(tiny_config)
    assert resumed.load_state() and resumed.step == 2 and resumed.rewarm_from == 2
    record = resumed.train_step()
    full_lr = tiny_config.schedule(tiny_config.steps).at(2)
    assert record["lr"] == pytest.approx(full_lr / tiny_config.rewarm_steps)


def test_full_run_exports_a_checkpoint_with_provenance_and_log(tiny_config):
    from hypergen.generator import HyperGenerator

    out = Trainer(tiny_config).train()
    gen = HyperGenerator.from_pretrained(out)
    assert gen.trained and gen.info()["training"]["steps"] == 4
    lines = [json.loads(l) for l in (out.parent / "log.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3, 4]
    assert {"lm_loss", "reg", "correction_norm", "grad_norm", "lr", "rows_per_s", "t_hyper", "t_forward", "t_backward"} <= set(lines[0])
    assert lines[0]["rows"] == 4 and lines[0]["rows_per_s"] > 0


def test_a_shared_start_reproduces_the_multitask_lora_exactly(tiny_llama_dir, tmp_path):
    from hypergen.adapter import Adapter
    from hypergen.lora_train import train_lora
    from hypergen.task import Demo, Task

    sni = write_sni(tmp_path / "sni", {"task1": sni_task("task1", 6)})
    base = TrainConfig(base_model=str(tiny_llama_dir), dtype="float32", warmup_steps=1, checkpoint_every=10)
    folder = train_lora(load_sni(sni, "train"), tmp_path / "multi", base, steps=2, batch_size=2)
    lora = Adapter.load_peft(folder)
    config = base.model_copy(update={"run_dir": str(tmp_path / "run"), "sni_dir": str(sni), "init_lora": str(folder),
                                     "steps": 2, "tasks_per_step": 1, "d_model": 64, "d_hidden": 64, "n_blocks": 1})
    trainer = Trainer(config)
    for task in (Task("Answer with the antonym."), Task("Other.", (Demo("a", "B"),))):
        generated = trainer.generator.generate(task)
        assert all(torch.equal(generated.tensors[k], lora.tensors[k].float()) for k in lora.tensors)
    trainer.train()  # the correction learns; the adapter now depends on the task
    one, two = (trainer.generator.generate(Task(x)) for x in ("Answer with the antonym.", "Repeat the word."))
    assert any(not torch.equal(one.tensors[k], two.tensors[k]) for k in one.tensors)
    # resuming on another machine from the committed bf16 weights alone: the starting LoRA is not needed
    import shutil
    shutil.rmtree(folder)
    shutil.rmtree(trainer.run_dir / "state")
    resumed = Trainer(config)
    assert resumed.load_state() and resumed.step == 2


def test_a_centred_correction_starts_at_zero_and_is_zero_for_the_mean_task(tiny_config):
    from hypergen.hypernet import HyperNetwork
    from hypergen.task import Task
    from hypergen.task_items import encode_tasks

    trainer = Trainer(tiny_config.model_copy(update={"centered": True, "synthetic_tasks": 12}))
    net = trainer.net
    shared = {m: (a.detach().clone(), b.detach().clone()) for m, (a, b) in net.shared().items()}
    start = trainer.generator.generate(Task("Repeat the word."))
    for m, (a, b) in shared.items():  # an untrained centred network emits its shared LoRA exactly
        assert torch.equal(torch.stack(start.stacked()[m][0].unbind()), a[0]) and torch.equal(start.stacked()[m][1], b[0])
    out = trainer.train()
    assert float(net.task_mean_count) == tiny_config.steps  # one running-mean update per step
    loaded, _ = HyperNetwork.load(out)
    assert torch.allclose(loaded.task_mean, net.task_mean.to(torch.bfloat16).float())  # saved with the weights
    batch = encode_tasks(trainer.generator.encoder, [Task("Repeat the word."), Task("Answer with the antonym.")], "pairs")
    with torch.no_grad():
        task = net.task_vectors(batch.items, batch.kinds, batch.mask)
        net.task_mean.copy_(task[0])  # make the first task the mean: its correction vanishes, the other's does not
        weights = net.eval()(batch.items, batch.kinds, batch.mask)
    for m, (a, b) in weights.items():
        assert torch.allclose(a[0], net.shared_a[m], atol=1e-6) and torch.allclose(b[0], net.shared_b[m], atol=1e-6)
    assert any(not torch.allclose(a[1], net.shared_a[m], atol=1e-6) for m, (a, _) in weights.items())


def test_a_basis_correction_mixes_only_its_learned_directions(tiny_config):
    """correction_basis K: the untrained network emits its shared LoRA; trained, every task's
    correction in a layer is a mixture of that layer's K directions (it cannot be any other)."""
    from hypergen.hypernet import HyperNetwork
    from hypergen.task import Task

    trainer = Trainer(tiny_config.model_copy(update={"centered": True, "correction_basis": 2}))
    net = trainer.net
    shared = {m: (a.detach().clone(), b.detach().clone()) for m, (a, b) in net.shared().items()}
    start = trainer.generator.generate(Task("Repeat the word."))
    for m, (a, b) in shared.items():
        assert torch.equal(start.stacked()[m][0], a[0]) and torch.equal(start.stacked()[m][1], b[0])
    out = trainer.train()
    loaded, _ = HyperNetwork.load(out)
    assert loaded.config.correction_basis == 2 and not loaded.a_heads and set(loaded.w_heads) == set(net.w_heads)
    tasks = [Task("Repeat the word."), Task("Answer with the antonym.")]
    one, two = (trainer.generator.generate(t).stacked() for t in tasks)
    for m in net.spec.target_modules:
        directions = net.basis_a[m][:, 0].detach().reshape(2, -1).T  # layer 0's K directions, [r*in, K]
        for adapter in (one, two):
            correction = (adapter[m][0][0] - net.shared_a[m][0].detach()).reshape(-1, 1)
            mix = torch.linalg.lstsq(directions, correction).solution
            assert torch.allclose(directions @ mix, correction, atol=1e-6)
    assert any(not torch.equal(one[m][0], two[m][0]) for m in one)  # trained: the mixture depends on the task


def test_a_lora_of_another_shape_is_refused_as_shared_start(tiny_llama_dir, tmp_path, generator):
    from hypergen.errors import CheckpointError

    sni = write_sni(tmp_path / "sni", {"task1": sni_task("task1", 6)})
    folder = generator.generate(__import__("hypergen").Task("x")).save_peft(tmp_path / "smollm-lora")
    config = TrainConfig(base_model=str(tiny_llama_dir), dtype="float32", run_dir=str(tmp_path / "run"), sni_dir=str(sni),
                         init_lora=str(folder), d_model=64, d_hidden=64, n_blocks=1)
    with pytest.raises(CheckpointError, match="q_proj: the LoRA has A"):
        Trainer(config)


def test_prompts_are_never_cut_long_rows_are_left_out(tiny_config):
    trainer = Trainer(tiny_config.model_copy(update={"max_prompt_tokens": 60}))
    assert trainer.too_long > 0
    for step in range(3):
        _, rows, _ = trainer.sample_mtf(random.Random(step))
        assert all(len(prompt) <= 60 for prompt, _ in rows)
    full = {tuple(p) for ps in trainer._prompts.values() for p in ps if p is not None}
    assert all(tuple(prompt) in full for prompt, _ in rows)  # whole prompts, chat header included


def test_instances_with_empty_outputs_train_but_are_never_demos(tiny_config):
    from hypergen.data import Instance

    trainer = Trainer(tiny_config.model_copy(update={"max_demos": 8}))
    task = trainer.tasks[0]
    task.instances[:] = [Instance(f"x{i}", ("",) if i % 2 else (f"y{i}",)) for i in range(10)]
    task.demos[:] = []
    for seed in range(5):
        described = trainer._describe(task, random.Random(seed), set())
        assert all(d.output.strip() for d in described.demos)


def test_instruction_dropout_trains_some_descriptions_on_demos_alone(tiny_config):
    trainer = Trainer(tiny_config.model_copy(update={"instruction_dropout": 0.5, "max_demos": 3}))
    task = next(t for t in trainer.tasks if t.instruction.strip())
    described = [trainer._describe(task, random.Random(seed), set()) for seed in range(40)]
    dropped = [d for d in described if not d.instruction]
    assert 5 < len(dropped) < 35  # about half
    assert all(d.demos for d in dropped)  # a description without its instruction always has demos
    kept = Trainer(tiny_config)._describe(task, random.Random(0), set())
    assert kept.instruction == task.instruction  # off by default


def test_delta_norms_match_dense_computation():
    a1, b1, a2, b2 = torch.randn(3, 4, 10), torch.randn(3, 6, 4), torch.randn(3, 4, 10), torch.randn(3, 6, 4)
    dense = (2 * b1 @ a1).pow(2).sum((-1, -2))
    torch.testing.assert_close(delta_sq_norm(a1, b1, 2.0), dense)
    torch.testing.assert_close(delta_sq_distance(a1, b1, a2, b2, 2.0), (2 * b1 @ a1 - 2 * b2 @ a2).pow(2).sum((-1, -2)))


def test_batches_train_on_targets_only():
    batch = make_batch([([1, 2, 3], [7, 8]), ([4], [9])], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 7, 8], [4, 9, 0, 0, 0]]
    assert batch.target_ids.tolist() == [7, 8, 9]
    assert batch.target_pos.tolist() == [2, 3, 5]


def test_train_lora_produces_a_peft_folder(tiny_llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hypergen.data import load_sni
    from hypergen.lora_train import train_lora

    write_sni(tmp_path / "sni", {"task1": sni_task("task1")})
    config = TrainConfig(base_model=str(tiny_llama_dir), dtype="float32", warmup_steps=1, checkpoint_every=2)
    folder = train_lora(load_sni(tmp_path / "sni", "train"), tmp_path / "lora", config, steps=3, batch_size=2, skip_first=2)
    assert json.loads((folder / TRAINING_FILE).read_text())["skip_first"] == 2
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), folder)
    b = [v for k, v in model.state_dict().items() if "lora_B" in k]
    assert len(b) == 4 and any(t.abs().sum() > 0 for t in b)


def test_evaluation_writes_json_table_and_chart_and_resumes(generator, checkpoint_dir, tmp_path):
    from hypergen.evaluate import EvalConfig, Evaluation

    sni = write_sni(tmp_path / "sni", {
        "task_a": sni_task("task_a", 6),
        "task_b": sni_task("task_b", 6, "Repeat the word."),
    }, split="test")
    oracle = generator.generate(generator_task := __import__("hypergen").Task("x")).save_peft(tmp_path / "oracle" / "task_a" / "adapter")
    generator.generate(generator_task).save_peft(tmp_path / "multi")
    config = EvalConfig(
        sni_dir=str(sni), out_dir=str(tmp_path / "eval"), max_instances=3, max_tokens=6, checkpoint=str(checkpoint_dir),
        multitask_lora=str(tmp_path / "multi"), oracle_dir=str(tmp_path / "oracle"), engine="hf",
        methods=["base", "icl", "generated", "generated_0", "shared", "multitask_lora", "oracle_lora"],
    )
    with pytest.raises(ValueError, match="--skip-first 3"):  # it cannot say it never saw the scored instances
        Evaluation(config).run()
    (oracle / TRAINING_FILE).write_text(json.dumps({"skip_first": 3}))
    result = Evaluation(config).run()
    assert set(result["methods"]) == {"base", "icl", "generated", "generated_0", "shared", "multitask_lora", "oracle_lora"}
    assert (tmp_path / "eval" / "adapters" / "task_a.k0" / "adapter_config.json").is_file()
    shared = __import__("hypergen").Adapter.load_peft(tmp_path / "eval" / "adapters" / "_shared")
    expected = HyperGenerator.from_pretrained(str(checkpoint_dir)).shared_adapter().tensors
    assert all(torch.equal(shared.tensors[k], v) for k, v in expected.items())  # the checkpoint's shared LoRA
    assert "shared" in result["wins"]["generated"]  # generated is compared with its own shared part
    assert result["wins"]["generated_0"]["base"]["wins"] + result["wins"]["generated_0"]["base"]["ties"] \
        + result["wins"]["generated_0"]["base"]["losses"] == 2
    assert set(result["tasks"]) == {"task_a", "task_b"}
    assert "oracle_lora" in result["tasks"]["task_a"] and "oracle_lora" not in result["tasks"]["task_b"]
    assert result["methods"]["oracle_lora"]["tasks"] == 1 and result["tasks"]["task_a"]["base"]["n"] == 3
    for name, v in result["methods"].items():  # a method's score is the mean of its tasks' scores
        per_task = [scores[name]["rougeL"] for scores in result["tasks"].values() if name in scores]
        assert v["rougeL"] == pytest.approx(sum(per_task) / len(per_task), abs=0.01)
    out = tmp_path / "eval"
    assert json.loads((out / "eval.json").read_text())["setup"]["engine"] == "hf"
    assert "| generated |" in (out / "eval.md").read_text()
    assert (out / "eval.png").read_bytes()[:4] == b"\x89PNG"
    partial = out / "partial" / "base" / "task_a.json"
    stamp = partial.stat().st_mtime_ns
    again = Evaluation(config).run()  # resumes: nothing is generated again
    assert partial.stat().st_mtime_ns == stamp and again["methods"] == result["methods"]


def test_label_adherence_counts_answers_inside_the_tasks_label_set():
    from hypergen.data import Instance, TaskData
    from hypergen.evaluate import label_set, wins_ties_losses

    labels = TaskData("t", "Is it positive?", [], [Instance(f"x{i}", ("Yes" if i % 2 else "no",)) for i in range(8)])
    free = TaskData("g", "Write a title.", [], [Instance(f"x{i}", (f"title number {i}",)) for i in range(8)])
    assert label_set(labels) == {"yes", "no"} and label_set(free) is None
    scores = {"t1": {"generated": {"rougeL": 50.0}, "base": {"rougeL": 10.0}},
              "t2": {"generated": {"rougeL": 10.2}, "base": {"rougeL": 10.0}},
              "t3": {"generated": {"rougeL": 0.0}, "base": {"rougeL": 5.0}}}
    assert wins_ties_losses(scores) == {"generated": {"base": {"wins": 1, "ties": 1, "losses": 1}}}


def test_evaluation_reports_label_adherence_for_label_set_tasks(tmp_path, checkpoint_dir):
    from hypergen.evaluate import EvalConfig, Evaluation, normalize

    yes_no = {"name": "task_yn", "Definition": ["Is the word a colour? Answer yes or no."], "Positive Examples": [],
              "Instances": [{"input": w, "output": [a]} for w, a in [("red", "yes"), ("cat", "no"), ("blue", "yes"), ("dog", "no")] * 2]}
    sni = write_sni(tmp_path / "sni", {"task_yn": yes_no, "task_a": sni_task("task_a", 4)}, split="test")
    config = EvalConfig(sni_dir=str(sni), out_dir=str(tmp_path / "eval"), methods=["base"], max_instances=2, max_tokens=3,
                        engine="hf", checkpoint=str(checkpoint_dir))
    result = Evaluation(config).run()
    assert result["setup"]["label_set_tasks"] == ["task_yn"]
    assert "label_adherence" in result["tasks"]["task_yn"]["base"] and "label_adherence" not in result["tasks"]["task_a"]["base"]
    rows = json.loads((tmp_path / "eval" / "partial" / "base" / "task_yn.json").read_text())["rows"]
    expected = 100 * sum(normalize(r["prediction"]) in ("yes", "no") for r in rows) / len(rows)
    assert result["methods"]["base"]["label_adherence"] == pytest.approx(expected)
    assert "label adherence" in (tmp_path / "eval" / "eval.md").read_text()


def test_a_method_skipped_for_lack_of_input_runs_when_a_later_run_supplies_it(tmp_path, generator, checkpoint_dir):
    from hypergen.evaluate import EvalConfig, Evaluation

    sni = write_sni(tmp_path / "sni", {"task_a": sni_task("task_a", 4)}, split="test")
    config = EvalConfig(sni_dir=str(sni), out_dir=str(tmp_path / "eval"), methods=["base", "multitask_lora"], max_instances=2,
                        max_tokens=2, engine="hf", checkpoint=str(checkpoint_dir))
    first = Evaluation(config).run()  # no --multitask-lora: the method has nothing to run
    assert "multitask_lora" not in first["tasks"]["task_a"]
    generator.generate(__import__("hypergen").Task("x")).save_peft(tmp_path / "multi")
    second = Evaluation(dataclasses.replace(config, multitask_lora=str(tmp_path / "multi"))).run()
    assert second["tasks"]["task_a"]["multitask_lora"]["n"] == 2


def test_metrics():
    from hypergen.evaluate import exact_match, rouge_l

    assert exact_match("The Answer.", ["answer"]) == 1.0 and exact_match("no", ["yes"]) == 0.0
    assert rouge_l("the cat sat", ["cat sat down", "dog"]) == pytest.approx(2 / 3)  # LCS 2 of 3 tokens each way


def test_pretrain_and_reconstruct_stages_run_before_mtf(tiny_llama_dir, tmp_path):
    from hypergen.data import load_sni
    from hypergen.lora_train import train_lora

    sni = write_sni(tmp_path / "sni", {"task1": sni_task("task1", 8), "task2": sni_task("task2", 8, "Repeat the word.")})
    base = TrainConfig(base_model=str(tiny_llama_dir), dtype="float32", warmup_steps=1, checkpoint_every=10)
    for task in load_sni(sni, "train"):
        train_lora([task], tmp_path / "library" / task.name, base, steps=2, batch_size=2)
    config = base.model_copy(update={
        "run_dir": str(tmp_path / "run"), "sni_dir": str(sni), "lora_library": str(tmp_path / "library"),
        "stages": ["pretrain", "reconstruct", "mtf"], "pretrain_steps": 1, "reconstruct_steps": 2, "steps": 1,
        "tasks_per_step": 2, "d_model": 64, "d_hidden": 64, "n_blocks": 1,
        "pretrain_texts": None,
    })
    (tmp_path / "texts.txt").write_text("one two three four five six seven eight nine ten eleven twelve thirteen fourteen\n")
    config = config.model_copy(update={"pretrain_texts": str(tmp_path / "texts.txt")})
    trainer = Trainer(config)
    trainer.train()
    stages = [json.loads(l)["stage"] for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert stages == ["pretrain", "reconstruct", "reconstruct", "mtf"]
    recon = [json.loads(l) for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()][1:3]
    assert all(r["recon_loss"] > 0 for r in recon)


def test_evaluation_refuses_to_resume_under_another_setup(tmp_path, checkpoint_dir):
    from hypergen.evaluate import EvalConfig, Evaluation

    sni = write_sni(tmp_path / "sni", {"task_a": sni_task("task_a", 4)}, split="test")
    config = EvalConfig(sni_dir=str(sni), out_dir=str(tmp_path / "eval"), methods=["base"], max_instances=2, max_tokens=2, engine="hf",
                        checkpoint=str(checkpoint_dir))
    Evaluation(config)
    with pytest.raises(ValueError, match="max_instances"):
        Evaluation(EvalConfig(**{**config.__dict__, "max_instances": 3}))


def _tiny_adapter(tiny_llama_dir, seed: int = 1):
    """A LoRA for the tiny Llama with a non-zero B, standing in for a generated one."""
    from hypergen.base_model import load_dims
    from hypergen.lora_train import init_lora, to_adapter
    from hypergen.spec import LoraSpec

    spec = LoraSpec(load_dims(str(tiny_llama_dir)))
    params = init_lora(spec, seed)
    gen = torch.Generator().manual_seed(seed)
    params = {k: (v if k.endswith(".A") else torch.randn(v.shape, generator=gen) * 0.02) for k, v in params.items()}
    return to_adapter(params, spec, str(tiny_llama_dir))


REFINE_EXAMPLES = [("red", "colour"), ("dog", "animal"), ("blue", "colour"), ("cat", "animal"), ("green", "colour"), ("cow", "animal")]


def test_refine_starts_from_the_adapter_learns_its_examples_and_is_deterministic(tiny_llama_dir, tmp_path):
    from hypergen import refine
    from hypergen.task import Demo

    start = _tiny_adapter(tiny_llama_dir)
    examples = [Demo(i, o) for i, o in REFINE_EXAMPLES]
    kwargs = dict(instruction="Is it a colour or an animal?", steps=12, lr=5e-3, batch_size=4, seed=3)
    one = refine(start, examples, work_dir=tmp_path / "one", **kwargs)
    two = refine(start, examples, work_dir=tmp_path / "two", **kwargs)
    assert all(torch.equal(one.tensors[k], two.tensors[k]) for k in one.tensors)  # same seed, same adapter
    assert any(not torch.equal(one.tensors[k], start.tensors[k]) for k in start.tensors)
    losses = [json.loads(l)["loss"] for l in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < losses[0]
    barely = refine(start, examples, **{**kwargs, "steps": 1, "lr": 1e-7})  # the start is the adapter, not PEFT's
    b_keys = [k for k in start.tensors if "lora_B" in k]
    assert all(torch.allclose(barely.tensors[k], start.tensors[k], atol=1e-5) for k in b_keys)
    assert any(start.tensors[k].abs().sum() > 0 for k in b_keys)


def test_refine_refuses_bad_input_naming_the_field(tiny_llama_dir):
    from hypergen import RefineError, refine
    from hypergen.task import Demo

    start = _tiny_adapter(tiny_llama_dir)
    two = [Demo("a", "b"), Demo("c", "d")]
    for examples, kwargs, field in [
        ([Demo("a", "b")], {}, "examples"),
        ([Demo("a", "b"), Demo("c", " ")], {}, "examples.1.output"),
        (two, {"steps": 0}, "steps"),
        (two, {"lr": 1.0}, "lr"),
    ]:
        with pytest.raises(RefineError) as err:
            refine(start, examples, **kwargs)
        assert err.value.field == field


def test_refine_cli_writes_a_peft_folder(tiny_llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hypergen.cli import main

    start = _tiny_adapter(tiny_llama_dir).save_peft(tmp_path / "start")
    (tmp_path / "examples.jsonl").write_text("\n".join(json.dumps({"input": i, "output": o}) for i, o in REFINE_EXAMPLES) + "\n")
    assert main(["refine", "--adapter", str(start), "--examples", str(tmp_path / "examples.jsonl"), "--steps", "2",
                 "--base-model", str(tiny_llama_dir), "--out", str(tmp_path / "refined")]) == 0
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tmp_path / "refined")
    assert sum("lora_B" in k for k in model.state_dict()) == 4
    (tmp_path / "bad.jsonl").write_text('{"input": "a"}\n')
    with pytest.raises(SystemExit, match="bad.jsonl:1"):
        main(["refine", "--adapter", str(start), "--examples", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "x")])


def test_a_centred_networks_mean_task_pass_is_kept_until_its_weights_change(tiny_config):
    """Serving computes the mean task's correction once (no gradients) instead of in every batch;
    it must equal the in-batch one, and an in-place change to any weight must be seen."""
    from hypergen.task import Task
    from hypergen.task_items import encode_tasks

    trainer = Trainer(tiny_config.model_copy(update={"centered": True, "correction_basis": 2}))
    net = trainer.net.eval()
    with torch.no_grad():
        for p in net.parameters():  # heads that are not zero, so the reference is not trivially zero
            p.add_(torch.randn_like(p) * 0.05)
    batch = encode_tasks(trainer.generator.encoder, [Task("Repeat the word."), Task("Answer with the antonym.")], "pairs")

    def both() -> tuple[dict, dict]:
        with torch.no_grad():
            kept = net(batch.items, batch.kinds, batch.mask)
        with torch.enable_grad():  # the training path: the reference rides in the batch
            in_batch = net(batch.items, batch.kinds, batch.mask)
        return kept, in_batch

    kept, in_batch = both()
    assert net._reference is not None
    for m in kept:
        assert torch.allclose(kept[m][0], in_batch[m][0], atol=1e-6) and torch.allclose(kept[m][1], in_batch[m][1], atol=1e-6)
    before = {m: kept[m][0].clone() for m in kept}
    with torch.no_grad():
        net.mix.weight.mul_(1.5)  # in place: same storage, new version
    kept, in_batch = both()
    for m in kept:
        assert torch.allclose(kept[m][0], in_batch[m][0], atol=1e-6)
    assert any(not torch.allclose(kept[m][0], before[m], atol=1e-4) for m in kept)
