"""finetune_r1's machinery in one process: SFT learns a task, packed samples compute as alone,
early stopping restores the best, distillation approaches the teacher, each dropout flag drops
where it says and only in training."""

import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_command
from sft_task import TINY_DEEPSEEK, TINY_DENSE, finetune, task_records, train_task_tokenizer, write_jsonl

from megatron_r1.data.pretrain import MicroBatches
from megatron_r1.data.sft import ChatTemplate, packed_attention_inputs, parse_record
from megatron_r1.distributed import destroy_distributed
from megatron_r1.finetuning import (
    EarlyStopping,
    ProgressiveUnfreezing,
    build_finetuning_data,
    finetuning_forward_step,
    parse_finetuning_args,
    setup_finetuning,
)
from megatron_r1.training import Extension


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    directory = tmp_path_factory.mktemp("task")
    return {
        "tokenizer": train_task_tokenizer(directory),
        "copy": write_jsonl(directory / "copy.jsonl", task_records("copy", 400, 0)),
        "reverse": write_jsonl(directory / "reverse.jsonl", task_records("reverse", 100, 1)),
        "copy_test": task_records("copy", 30, 99),
    }


@pytest.fixture()
def finetuning(monkeypatch):
    """Set up fine-tuning from argv; process groups are torn down after the test."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    yield lambda argv: (lambda args: (args, setup_finetuning(args)))(parse_finetuning_args("test", argv))
    destroy_distributed()


def exact_match(state, records, max_new_tokens=12) -> float:
    """Greedy decoding of each prompt until an end id, compared with the expected output (a hit
    needs the end id within max_new_tokens). Prompts of one length decode together as a batch."""
    model = state.model[0].module
    model.eval()
    template = ChatTemplate(state.tokenizer)
    by_length = {}
    for record in records:
        tokens, _ = template.render(parse_record(record, "test")[:-1], add_generation_prompt=True)
        by_length.setdefault(len(tokens), []).append((tokens, record["output"]))
    hits = 0
    with torch.no_grad():
        for prompt_length, group in by_length.items():
            ids = torch.tensor([tokens for tokens, _ in group])
            ended = torch.zeros(len(group), dtype=torch.bool)
            for _ in range(max_new_tokens):
                logits = model(ids, torch.arange(ids.shape[1]).expand_as(ids), None)
                next_ids = logits[:, -1].argmax(dim=-1)
                ids = torch.cat([ids, next_ids[:, None]], dim=1)
                ended |= torch.isin(next_ids, torch.tensor(template.end_ids))
                if ended.all():
                    break
            for row, (_, expected) in zip(ids[:, prompt_length:].tolist(), group):
                end = next((i for i, t in enumerate(row) if t in template.end_ids), None)
                hits += end is not None and state.tokenizer.detokenize(row[:end]).strip() == expected
    model.train()
    return hits / len(records)


def test_sft_learns_the_copy_task(task, finetuning):
    args, state = finetuning(
        [
            *TINY_DENSE,
            "--data-path",
            task["copy"],
            "--tokenizer-model",
            task["tokenizer"],
            "--train-iters",
            "400",
            "--lr",
            "3e-3",
            "--lr-warmup-iters",
            "20",
            "--min-lr",
            "3e-4",
            "--log-interval",
            "100",
            "--micro-batch-size",
            "8",
            "--hidden-dropout",
            "0.0",
            "--split",
            "100,0,0",
            "--seed",
            "1",
        ]
    )
    # The budget is tight for this tiny model: with seeds 1, 2 and 1234 it reaches 0.77, 0.40 and 0.13.
    before = exact_match(state, task["copy_test"])
    finetune(args, state, *build_finetuning_data(args, state))
    after = exact_match(state, task["copy_test"])
    assert before <= 0.1 and after >= 0.6, (before, after)


def test_a_packed_sample_computes_as_it_does_alone(task, finetuning):
    args, state = finetuning([*TINY_DENSE, "--data-path", task["copy"], "--tokenizer-model", task["tokenizer"]])
    train_dataset, _ = build_finetuning_data(args, state)
    packed = train_dataset[0]
    assert len(set(packed["segment_ids"].tolist())) >= 3
    model = state.model[0].module.eval()
    segments = torch.as_tensor(packed["segment_ids"])[None]
    attention_mask, position_ids = packed_attention_inputs(segments)
    with torch.no_grad():
        logits = model(torch.as_tensor(packed["tokens"])[None], position_ids, attention_mask)[0]
        for segment in segments.unique()[:-1]:  # the last one is padding
            where = (segments[0] == segment).nonzero()[:, 0]
            alone = model(torch.as_tensor(packed["tokens"])[None, where], torch.arange(len(where))[None], None)[0]
            assert (logits[where] - alone).abs().max() <= 1e-5


def test_early_stopping_stops_and_restores_the_best(task, finetuning):
    """Trained to copy, validated on reversing: the validation loss turns upward once copying is learnt."""
    args, state = finetuning(
        [
            *TINY_DENSE,
            "--data-path",
            task["copy"],
            "--valid-data-path",
            task["reverse"],
            "--tokenizer-model",
            task["tokenizer"],
            "--train-iters",
            "300",
            "--lr",
            "3e-3",
            "--eval-interval",
            "10",
            "--eval-iters",
            "2",
            "--early-stop-patience",
            "2",
            "--log-interval",
            "100",
        ]
    )
    train_dataset, valid_dataset = build_finetuning_data(args, state)
    stopper, weights_at = EarlyStopping(args), {}

    class RecordWeights(Extension):  # before the stopper decides (and restores)
        def validated(self, state, valid_loss):
            weights_at[state.iteration] = [p.detach().clone() for p in state.model[0].module.parameters()]
            return False

    finetune(args, state, train_dataset, valid_dataset, extensions=[RecordWeights(), stopper])
    losses = [loss for _, loss in stopper.losses]
    assert state.iteration < args.train_iters and stopper.evaluations_without_improvement == 2, losses
    assert stopper.best_iteration < state.iteration and min(losses) == stopper.best_loss
    final = list(state.model[0].module.parameters())
    assert all(torch.equal(p, best) for p, best in zip(final, weights_at[stopper.best_iteration]))
    assert not all(torch.equal(p, last) for p, last in zip(final, weights_at[state.iteration]))


# A larger model than the student, with a multi-token-prediction layer as DeepSeek-V3-shaped models
# have (megatron-core runs MTP layers only with labels, which a teacher is not given).
TEACHER = ["--num-layers", "3", "--hidden-size", "96", "--num-attention-heads", "4", "--swiglu", "--disable-bias-linear",
           "--mtp-num-layers", "1", "--seq-length", "64", "--micro-batch-size", "4"]  # fmt: skip


@pytest.fixture(scope="module")
def teacher_checkpoint(task, tmp_path_factory):
    """A teacher fine-tuned for 60 iterations on the copy task: its --save directory."""
    directory = tmp_path_factory.mktemp("teacher") / "ckpt"
    args = parse_finetuning_args(
        "test",
        [
            *TEACHER,
            "--data-path",
            task["copy"],
            "--tokenizer-model",
            task["tokenizer"],
            "--split",
            "90,10,0",
            "--save",
            str(directory),
            "--train-iters",
            "60",
            "--lr",
            "3e-3",
            "--log-interval",
            "60",
        ],
    )
    os.environ.setdefault("WORLD_SIZE", "1")
    try:
        state = setup_finetuning(args)
        finetune(args, state, *build_finetuning_data(args, state))
    finally:
        destroy_distributed()
    return directory


def test_distillation_lowers_kl_to_the_teacher(task, finetuning, teacher_checkpoint):
    common = ["--data-path", task["copy"], "--tokenizer-model", task["tokenizer"], "--split", "90,10,0"]
    args, state = finetuning(
        [
            *TINY_DENSE,
            *common,
            "--teacher-load",
            str(teacher_checkpoint),
            "--kd-ce-weight",
            "0",
            "--kd-kl-weight",
            "1",
            "--kd-temperature",
            "1",
            "--train-iters",
            "40",
            "--lr",
            "3e-3",
        ]
    )
    train_dataset, valid_dataset = build_finetuning_data(args, state)
    forward_step = finetuning_forward_step(args)

    def kl_to_teacher():
        batch = MicroBatches(valid_dataset, 4, cycle=True)
        with torch.no_grad():
            output, loss_func = forward_step(batch, state.model[0])
            kl_sum, tokens = loss_func(output)[2]["kd loss"]  # summed over the loss tokens
            return (kl_sum / tokens).item()

    before = kl_to_teacher()
    finetune(args, state, train_dataset, valid_dataset, forward_step=forward_step)
    after = kl_to_teacher()
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_progressive_unfreezing_trains_top_layers_first(task, finetuning, tied):
    """Before its stage a layer is bit-unchanged, from it on it changes; tied word embeddings are
    the output layer too and train throughout."""
    untie = [] if tied else ["--untie-embeddings-and-output-weights"]
    args, state = finetuning(
        [
            *TINY_DENSE,
            "--num-layers",
            "3",
            *untie,
            "--data-path",
            task["copy"],
            "--tokenizer-model",
            task["tokenizer"],
            "--train-iters",
            "6",
            "--lr",
            "1e-3",
            "--unfreeze-schedule",
            "0:1",
            "2:2",
            "4:all",
            "--log-interval",
            "6",
        ]
    )
    model = state.model[0].module
    snapshots = []

    class Snapshot(Extension):  # before each iteration's unfreezing
        def iteration_starts(self, state):
            snapshots.append({name: p.detach().clone() for name, p in model.named_parameters()})

    finetune(args, state, *build_finetuning_data(args, state), extensions=[Snapshot(), ProgressiveUnfreezing(args)])
    snapshots.append({name: p.detach().clone() for name, p in model.named_parameters()})

    def group(name):  # the unfreezing stage from which each parameter trains
        if name.startswith("embedding."):
            return "top 1" if tied else "all"
        if name.startswith("decoder.layers."):
            return {"0": "all", "1": "top 2", "2": "top 1"}[name.split(".")[2]]
        return "top 1"  # final norm, output layer

    top_1, top_2, everything = {"top 1"}, {"top 1", "top 2"}, {"top 1", "top 2", "all"}
    stages = {0: top_1, 1: top_1, 2: top_2, 3: top_2, 4: everything, 5: everything}  # iteration: trainable groups
    assert {group(name) for name in snapshots[0]} == {"top 1", "top 2", "all"}
    assert ("embedding.word_embeddings.weight" in snapshots[0]) and ("output_layer.weight" in snapshots[0]) != tied
    for iteration, trainable in stages.items():
        before, after = snapshots[iteration], snapshots[iteration + 1]
        for name in before:
            changed = not torch.equal(before[name], after[name])
            assert changed == (group(name) in trainable), (iteration, name, changed)


# ---- per-component dropout ---------------------------------------------------------------------

# Recorded in forward order: layer 0's core attention output, the input of its linear_fc2 (the
# FFN's inner activations) and its MLP output.
DROPOUT_POINTS = ["embedding", "core attention", "fc2 input", "mlp output", "logits"]
DROPOUT_CASES = {  # flags: (first point that changes, point where a p=0.5 mask shows or None)
    "embedding": (["--embedding-dropout", "0.5"], "embedding", "embedding"),
    "attention": (["--attention-dropout", "0.5"], "core attention", None),
    "ffn": (["--ffn-dropout", "0.5"], "fc2 input", "fc2 input"),
    "hidden": (["--hidden-dropout", "0.5", "--embedding-dropout", "0"], "fc2 input", None),
    "embedding follows hidden": (["--hidden-dropout", "0.5"], "embedding", "embedding"),
}


def recorded_forward(model, tokens) -> dict:
    """The DROPOUT_POINTS of one forward pass."""
    layer = model.decoder.layers[0]
    points = {}

    def record(name, value):
        points[name] = (value[0] if isinstance(value, tuple) else value).detach().clone()

    hooks = [
        model.embedding.register_forward_hook(lambda m, i, out: record("embedding", out)),
        layer.self_attention.core_attention.register_forward_hook(lambda m, i, out: record("core attention", out)),
        layer.mlp.linear_fc2.register_forward_pre_hook(lambda m, inputs: record("fc2 input", inputs)),
        layer.mlp.register_forward_hook(lambda m, i, out: record("mlp output", out)),
    ]
    with torch.no_grad():
        record("logits", model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None))
    for hook in hooks:
        hook.remove()
    return points


def assert_half_dropped(dropped, kept):
    """`dropped` is `kept` with about half its entries zeroed and the rest scaled by 1 / (1 - 0.5)."""
    zeros = dropped == 0
    assert 0.4 < zeros.float().mean() < 0.6 and (kept != 0).all()
    assert torch.equal(dropped[~zeros], 2 * kept[~zeros])


@pytest.mark.parametrize("case", DROPOUT_CASES, ids=lambda case: case.replace(" ", "_"))
def test_dropout_acts_where_its_flag_says_and_only_in_training(task, finetuning, case):
    flags, first_changed, masked = DROPOUT_CASES[case]
    common = [*TINY_DENSE, "--data-path", task["copy"], "--tokenizer-model", task["tokenizer"]]
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    _, reference = finetuning(common)  # every dropout 0
    reference_model = reference.model[0].module
    assert reference_model.training
    expected = recorded_forward(reference_model, tokens)
    state_dict = reference_model.state_dict()
    destroy_distributed()
    _, state = finetuning([*common, *flags])
    model = state.model[0].module
    model.load_state_dict(state_dict)

    first, second = recorded_forward(model, tokens), recorded_forward(model, tokens)
    changed_from = DROPOUT_POINTS.index(first_changed)
    for point in DROPOUT_POINTS[:changed_from]:
        assert torch.equal(first[point], expected[point]), f"{case}: {point} changed"
    for point in DROPOUT_POINTS[changed_from:]:
        assert not torch.equal(first[point], expected[point]), f"{case}: {point} unchanged"
        assert not torch.equal(first[point], second[point]), f"{case}: {point} drew the same mask twice"
    if masked:
        assert_half_dropped(first[masked], expected[masked])
        assert_half_dropped(second[masked], expected[masked])

    model.eval()
    evaluated = recorded_forward(model, tokens)
    assert all(torch.equal(evaluated[point], expected[point]) for point in DROPOUT_POINTS), case


def test_ffn_dropout_reaches_every_ffn_of_a_moe_model(task, finetuning):
    """Dense MLP, each routed expert, the shared experts, and those of the MTP layer."""
    _, state = finetuning(
        [*TINY_DEEPSEEK, "--data-path", task["copy"], "--tokenizer-model", task["tokenizer"], "--ffn-dropout", "0.5"]
    )
    model = state.model[0].module
    fc2_inputs = {}
    for name, module in model.named_modules():
        if name.endswith(".linear_fc2"):
            module.register_forward_pre_hook(lambda m, inputs, name=name: fc2_inputs.__setitem__(name, inputs[0]))
    tokens = torch.randint(0, 300, (4, 64), generator=torch.Generator().manual_seed(0))
    position_ids = torch.arange(64).expand_as(tokens)

    def zero_fractions():
        fc2_inputs.clear()
        with torch.no_grad():
            model(tokens, position_ids, None, labels=tokens)  # MTP needs the labels
        return {name: (value == 0).float().mean().item() for name, value in fc2_inputs.items()}

    training = zero_fractions()
    assert any("local_experts" in n for n in training) and any("shared_experts" in n for n in training)
    assert any(n.startswith("mtp.") for n in training) and "decoder.layers.0.mlp.linear_fc2" in training
    assert all(0.35 < fraction < 0.65 for fraction in training.values()), training
    model.eval()
    assert all(fraction < 0.01 for fraction in zero_fractions().values())


@pytest.mark.parametrize("flag", ["--embedding-dropout", "--ffn-dropout"])
@pytest.mark.parametrize("probability", ["-0.1", "1"])
def test_dropout_probabilities_out_of_range_are_rejected(task, flag, probability, capsys):
    with pytest.raises(SystemExit):
        parse_finetuning_args(
            "test",
            [*TINY_DENSE, "--data-path", task["copy"], "--tokenizer-model", task["tokenizer"], flag, probability],
        )
    assert f"{flag} ({float(probability)}) must be in [0, 1)" in capsys.readouterr().err


@pytest.mark.parametrize("flags, expected", [
    (["--reset-attention-mask"], "--reset-attention-mask/--reset-position-ids are for pre-training documents"),
    (["--eod-mask-loss"], "--eod-mask-loss is for pre-training documents"),
    (["--fp16"], "--fp16: fp16 training (with loss scaling) is not supported: use --bf16"),
])  # fmt: skip
def test_pre_training_only_and_unsupported_flags_are_refused(task, flags, expected, capsys):
    with pytest.raises(SystemExit):
        parse_finetuning_args(
            "test", [*TINY_DENSE, "--data-path", task["copy"], "--tokenizer-model", task["tokenizer"], *flags]
        )
    assert expected in capsys.readouterr().err


def test_packed_samples_are_not_handed_to_transformer_engines_attention(task, monkeypatch, capsys):
    """TransformerEngine's causal attention takes no per-sample mask: packing with it is refused
    (a machine with CUDA and TransformerEngine is what this test pretends to be)."""
    monkeypatch.setattr("megatron_r1.compat.transformer_engine_installed", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    argv = [*TINY_DENSE, "--data-path", task["copy"], "--tokenizer-model", task["tokenizer"]]
    with pytest.raises(SystemExit):
        parse_finetuning_args("test", [*argv, "--transformer-impl", "transformer_engine"])
    assert "packed fine-tuning samples need --transformer-impl local" in capsys.readouterr().err
    args = parse_finetuning_args("test", [*argv, "--transformer-impl", "transformer_engine", "--no-pack-sequences"])
    assert args.transformer_impl == "transformer_engine"


def test_distillation_kl_under_tensor_parallelism_has_the_full_vocabulary_gradients(tmp_path):
    """Each TP rank's KL term depends on the log-partition summed over all ranks; its gradient must
    be summed back (checked with 2 ranks against one full-vocabulary autograd computation)."""
    worker = Path(__file__).parent / "workers" / "vocab_parallel_kl.py"
    run_command(["torchrun", "--standalone", "--nproc_per_node=2", str(worker)], tmp_path, timeout=120)


@pytest.mark.parametrize("flag", ["--teacher-load", "--pretrained-checkpoint"])
def test_code_in_a_teacher_or_starting_checkpoint_is_refused_before_it_runs(task, finetuning, teacher_checkpoint,
                                                                             flag, tmp_path):  # fmt: skip
    from malicious import poison_checkpoint_metadata

    from megatron_r1.checkpointing import CheckpointError

    poisoned = tmp_path / "poisoned"
    shutil.copytree(teacher_checkpoint, poisoned)
    witness = poison_checkpoint_metadata(poisoned, tmp_path / "code_ran")
    student = TINY_DENSE if flag == "--teacher-load" else TEACHER
    with pytest.raises(CheckpointError, match=r"\.metadata: refused, .*io\.open"):
        args, _ = finetuning([*student, "--data-path", task["copy"], "--tokenizer-model", task["tokenizer"], flag,
                              str(poisoned)])  # fmt: skip
        finetuning_forward_step(args)  # builds the teacher
    assert not witness.exists()
