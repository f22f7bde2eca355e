"""What reaches the hypernetwork: every demo output, its case, the label space, the whole instruction."""
import torch

from hypergen.encoder import WINDOW, pack_rows, packing
from hypergen.task import Demo, Task
from hypergen.task_items import FEATURES, KIND_DEMO, KIND_LABEL, encode_tasks, shape_features, task_items

LONG_INPUT = " ".join(f"token{i}" for i in range(400))  # far more than one encoder window


def _differ(a, b) -> bool:
    return any(not torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def test_a_long_demo_input_never_hides_its_output(generator):
    items = task_items(generator.encoder, Task("Classify.", (Demo(LONG_INPUT, "not_entailment"),)), "pairs")
    demo = next(i for i in items if i.kind == KIND_DEMO)
    out = generator.encoder.pieces("not_entailment")
    assert len(demo.ids) <= WINDOW
    assert demo.ids[-1 - len(out) : -1] == out  # the whole output, just before [SEP]
    assert demo.ids[1:4] == generator.encoder.pieces(LONG_INPUT)[:3]  # and the input's start


def test_tasks_with_long_inputs_that_differ_only_in_outputs_give_different_adapters(generator):
    yes_no = Task("Decide.", (Demo(LONG_INPUT, "yes"), Demo(LONG_INPUT + " x", "no")))
    true_false = Task("Decide.", (Demo(LONG_INPUT, "True"), Demo(LONG_INPUT + " x", "False")))
    assert _differ(generator.generate(yes_no), generator.generate(true_false))


def test_tasks_that_differ_only_in_the_case_of_outputs_give_different_adapters(generator):
    upper = Task("Rewrite the word.", (Demo("apple", "APPLE"), Demo("pear", "PEAR")))
    lower = Task("Rewrite the word.", (Demo("apple", "apple"), Demo("pear", "pear")))
    assert generator.encoder.pair("apple", "APPLE") == generator.encoder.pair("apple", "apple")  # the encoder is uncased
    assert _differ(generator.generate(upper), generator.generate(lower))


def test_the_label_space_is_one_item_per_distinct_output(generator):
    task = Task("Is it positive?", (Demo("good", "yes"), Demo("bad", "no"), Demo("fine", "yes")))
    items = task_items(generator.encoder, task, "pairs")
    labels = [i for i in items if i.kind == KIND_LABEL]
    assert [i.ids for i in labels] == [generator.encoder.single("yes"), generator.encoder.single("no")]
    share = FEATURES.index("demo_share")
    assert [round(i.features[share], 3) for i in labels] == [0.667, 0.333]


def test_a_long_instruction_is_read_whole(generator):
    head = " ".join(f"rule{i}" for i in range(700))
    a, b = Task(head + " Answer in French."), Task(head + " Answer in German.")
    assert len(generator.encoder.chunks(a.instruction)) > 1
    assert _differ(generator.generate(a), generator.generate(b))


def test_shape_features_see_case_and_option_letters():
    names = dict(zip(FEATURES, shape_features("(A) Paris.", 1.0, 0.5)))
    assert names["starts_bracket"] == 1 and names["ends_period"] == 1 and names["first_upper"] == 1
    assert dict(zip(FEATURES, shape_features("APPLE", 1, 1)))["all_upper"] == 1
    assert dict(zip(FEATURES, shape_features("apple", 1, 1)))["all_upper"] == 0


def test_the_joined_layout_is_the_first_one_for_ablations(generator):
    task = Task("Decide.", (Demo(LONG_INPUT, "yes"),))
    batch = encode_tasks(generator.encoder, [task], "joined")
    assert batch.mask.sum() == 2 and torch.count_nonzero(batch.items[0, :, generator.encoder.dim:]) == 0


def test_packing_rows_keeps_every_sequence_once_within_capacity():
    lengths = [256, 5, 120, 3, 256, 40, 600, 7]
    rows = pack_rows(lengths, 512)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 512 for row in rows if len(row) > 1)
    assert [6] in rows  # longer than a row: alone
    assert len(rows) == 3


def test_packing_chooses_narrower_rows_for_many_texts_and_one_row_for_a_few():
    many = [40 + i % 30 for i in range(32)]  # a batch's demos: one 512-token row would attend across ~9 texts
    rows, width = packing(many)
    assert sorted(i for row in rows for i in row) == list(range(32))
    assert all(sum(many[i] for i in row) <= width for row in rows)
    assert width < 512 and len(rows) > 4
    few = [20, 12, 15, 9]  # one task's texts: a single row
    assert packing(few) == ([[0, 2, 1, 3]], 56)
    assert packing([300, 10])[1] == 310  # never narrower than the longest text


def test_packed_sequences_embed_as_they_do_alone(generator):
    enc = generator.encoder  # float32: packing may only move rounding
    seqs = [enc.single("Answer with the antonym."), enc.pair("hot", "cold"), enc.single("cold"),
            enc.chunks("a long instruction " * 60)[0], enc.pair("up", "DOWN")]
    packed = enc._forward(seqs)
    alone = torch.cat([enc._forward([s]) for s in seqs])
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-5)
    assert not torch.allclose(packed[2], packed[4], atol=1e-3)  # each sequence is its own
