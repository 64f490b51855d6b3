"""grpo_r1.py through its entry point: it raises a learnable reward, its first update has ratio 1
and KL 0 to the reference, a resumed run continues the uninterrupted one, TP/EP layouts compute
what one process computes, LoRA's reference is the base model, and a failing reward function is
named. In process: rollouts decode as tools/generate.py does."""

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import plain_tensors, run_command
from sft_task import train_task_tokenizer

REPO = Path(__file__).resolve().parents[2]
PROMPTS = REPO / "megatron_r1" / "assets" / "tiny_grpo.jsonl"
TINY = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--swiglu", "--disable-bias-linear",
        "--seq-length", "64"]  # fmt: skip
TINY_MOE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--swiglu",
            "--disable-bias-linear", "--seq-length", "64", "--multi-latent-attention", "--q-lora-rank", "32",
            "--kv-lora-rank", "32", "--qk-head-dim", "16", "--qk-pos-emb-head-dim", "8", "--v-head-dim", "16",
            "--num-experts", "4", "--moe-layer-freq", "[0]+[1]", "--moe-router-topk", "2", "--moe-ffn-hidden-size",
            "64", "--moe-shared-expert-intermediate-size", "64", "--mtp-num-layers", "1"]  # fmt: skip
ROLLOUTS = ["--grpo-prompts-per-step", "4", "--grpo-group-size", "4", "--max-response-length", "8",
            "--micro-batch-size", "4", "--log-interval", "1", "--lr", "3e-3"]  # fmt: skip
REWARDS = """
def vowels(prompt, response, fields):
    letters = [c for c in response.lower() if c.isalpha()]
    return sum(c in "aeiou" for c in letters) / max(len(letters), 1)


def broken(prompt, response, fields):
    return "high"


def vowels_if_odd(prompt, response, fields):
    return vowels(prompt, response, fields) if len(prompt) % 2 else 0.0
"""


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    directory = tmp_path_factory.mktemp("grpo")
    (directory / "toy_rewards.py").write_text(REWARDS)
    return {"dir": directory, "tokenizer": train_task_tokenizer(directory)}


def grpo(
    setting, cwd, *flags, launcher=(sys.executable,), rewards=("--reward-function", "toy_rewards:vowels", "--reward")
):
    """grpo_r1.py's iteration lines as {iteration: {figure: value}} (and its whole output)."""
    env_path = f"PYTHONPATH={setting['dir']}"
    command = ["env", env_path, *launcher, str(REPO / "grpo_r1.py"), "--tokenizer-model", setting["tokenizer"],
               "--prompt-data", str(PROMPTS), *ROLLOUTS, *rewards, *flags]  # fmt: skip
    output = run_command(command, cwd).stdout
    figures = {}
    for line in output.splitlines():
        if match := re.match(r"\s*iteration\s+(\d+)/", line):
            figures[int(match.group(1))] = {name: float(value) for name, value in re.findall(r"\| ([\w ./()-]+?): (\S+)", line)
                                            if re.fullmatch(r"[-+0-9.Ee]+", value)}  # fmt: skip
    return figures, output


def test_grpo_raises_a_learnable_reward(setting, tmp_path):
    figures, _ = grpo(setting, tmp_path, *TINY, "--train-iters", "30", "--kl-coef", "0", "--grpo-prompts-per-step", "4",
                      "--grpo-group-size", "8", "--micro-batch-size", "8")  # fmt: skip
    first = sum(figures[i]["reward mean"] for i in range(1, 6)) / 5
    last = sum(figures[i]["reward mean"] for i in range(26, 31)) / 5
    assert last > 2 * first + 0.02, (first, last)
    assert figures[30]["entropy"] < figures[1]["entropy"]
    # The training forward computes the decoding's log-probabilities (fp32, CPU: to rounding).
    assert max(figures[i]["rollout log-prob gap"] for i in figures) < 1e-5


@pytest.fixture(scope="module")
def start_checkpoint(setting):
    """A policy after 3 GRPO iterations (the starting checkpoint of the tests with a reference)."""
    directory = setting["dir"] / "start"
    directory.mkdir()
    grpo(setting, directory, *TINY, "--train-iters", "3", "--kl-coef", "0", "--save", "ckpt")
    return str(directory / "ckpt")


def test_first_update_has_ratio_one_and_kl_zero_then_moves(setting, start_checkpoint, tmp_path):
    figures, output = grpo(setting, tmp_path, *TINY, "--train-iters", "2", "--pretrained-checkpoint", start_checkpoint,
                           "--kl-coef", "0.1", "--grpo-iterations", "1")  # fmt: skip
    assert figures[1]["importance ratio"] == 1.0 and figures[1]["clip fraction"] == 0.0, figures[1]
    assert figures[1]["kl"] == 0.0 and figures[2]["kl"] > 0, figures
    assert f"reference policy: {start_checkpoint}" in output
    several, _ = grpo(setting, tmp_path, *TINY, "--train-iters", "1", "--pretrained-checkpoint", start_checkpoint,
                      "--kl-coef", "0.1", "--grpo-iterations", "3", "--lr", "1e-2")  # fmt: skip
    assert several[1]["importance ratio"] != 1.0 and several[1]["kl"] > 0  # the last of 3 updates' figures


def test_kill_minus_nine_then_rerun_is_bit_identical(setting, tmp_path):
    """Killed once a checkpoint is published, then rerun: the same figures as the straight run from
    the resumed iteration on, and the same final weights and Adam moments, bit for bit (the prompt
    position and the sampling follow the restored iteration)."""
    flags = [*TINY, "--train-iters", "7", "--kl-coef", "0"]
    straight, _ = grpo(setting, tmp_path, *flags, "--save", "straight")
    argv = ["env", f"PYTHONPATH={setting['dir']}", sys.executable, str(REPO / "grpo_r1.py"), "--tokenizer-model",
            setting["tokenizer"], "--prompt-data", str(PROMPTS), *ROLLOUTS, "--reward-function", "toy_rewards:vowels",
            "--reward", *flags, "--save", "killed", "--save-interval", "2"]  # fmt: skip
    process = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (tmp_path / "killed" / "iter_0000002").exists() and process.poll() is None:
        time.sleep(0.01)
    assert process.poll() is None, "the run ended before it could be killed"
    for victim in [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]:
        victim.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    resumed, output = grpo(setting, tmp_path, *flags, "--save", "killed")
    first = int(re.search(r"resumed from iteration (\d+) ", output)[1]) + 1
    assert 3 <= first <= 7 and sorted(resumed) == list(range(first, 8)), output[-2000:]
    for iteration in resumed:
        for name in ("reward mean", "policy loss", "entropy", "grad norm", "rollout log-prob gap"):
            assert resumed[iteration][name] == straight[iteration][name], (iteration, name)
    final, expected = (
        plain_tensors(tmp_path / "killed" / "iter_0000007"),
        plain_tensors(tmp_path / "straight" / "iter_0000007"),
    )
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in final)


@pytest.mark.parametrize(
    "layout",
    [["--tensor-model-parallel-size", "2", "--sequence-parallel"], ["--expert-model-parallel-size", "2"]],
    ids=["tp2", "ep2"],
)
def test_layouts_compute_what_one_process_computes(setting, tmp_path, layout):
    flags = [*TINY_MOE, "--train-iters", "3", "--kl-coef", "0", "--seed", "3"]
    alone, _ = grpo(setting, tmp_path, *flags)
    parallel, _ = grpo(setting, tmp_path, *flags, *layout, launcher=("torchrun", "--standalone", "--nproc_per_node=2"))
    for iteration in (1, 2, 3):
        assert parallel[iteration]["reward mean"] == alone[iteration]["reward mean"], iteration  # the same samples
        for name in ("policy loss", "entropy", "grad norm"):
            assert parallel[iteration][name] == pytest.approx(alone[iteration][name], rel=1e-4, abs=1e-6), (
                iteration,
                name,
            )


def test_lora_reference_is_the_base_model(setting, start_checkpoint, tmp_path):
    figures, output = grpo(setting, tmp_path, *TINY, "--train-iters", "2", "--pretrained-checkpoint", start_checkpoint,
                           "--lora", "--lora-rank", "4", "--lr", "1e-2", "--kl-coef", "0.1")  # fmt: skip
    assert "reference policy: base model" in output
    assert figures[1]["kl"] == 0.0 and figures[2]["kl"] > 0, figures


def test_a_reward_function_returning_no_number_is_named(setting, tmp_path):
    command = ["env", f"PYTHONPATH={setting['dir']}", sys.executable, str(REPO / "grpo_r1.py"), *TINY,
               "--tokenizer-model", setting["tokenizer"], "--prompt-data", str(PROMPTS), *ROLLOUTS,
               "--train-iters", "1", "--kl-coef", "0", "--reward", "--reward-function", "toy_rewards:broken"]  # fmt: skip
    failed = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert failed.returncode != 0 and "reward function 'toy_rewards:broken'" in failed.stderr, failed.stderr[-2000:]
    counted, _ = grpo(setting, tmp_path, *TINY, "--train-iters", "1", "--kl-coef", "0", "--reward-errors", "zero",
                      rewards=("--reward", "--reward-function", "toy_rewards:broken"))  # fmt: skip
    assert counted[1]["reward failures"] == 16 and counted[1]["reward mean"] == 0.0


def test_dynamic_sampling_refills_the_batch_with_groups_whose_rewards_differ(setting, tmp_path):
    """Groups of prompts of even length all score 0 (no signal): further rounds of prompts are rolled out
    until the step's 4 groups all have signal. A reward no response earns (format) leaves every group
    out after --max-num-gen-batches rounds, and nothing trains."""
    figures, _ = grpo(setting, tmp_path, *TINY, "--train-iters", "3", "--kl-coef", "0", "--dynamic-sampling",
                      rewards=("--reward-function", "toy_rewards:vowels_if_odd"))  # fmt: skip
    assert all(figures[i]["batch filled"] == 1.0 for i in figures), figures
    assert any(figures[i]["rollout rounds"] > 1 and figures[i]["groups kept"] < 1 for i in figures), figures
    figures, _ = grpo(setting, tmp_path, *TINY, "--train-iters", "1", "--kl-coef", "0", "--dynamic-sampling",
                      "--max-num-gen-batches", "2", "--loss-agg-mode", "seq-mean-token-mean",
                      rewards=("--reward", "format"))  # fmt: skip
    # A step with NaN gradients would print "grad norm: n/a".
    assert figures[1]["rollout rounds"] == 2 and figures[1]["batch filled"] == 0.0, figures
    assert figures[1]["groups kept"] == 0.0 and figures[1]["grad norm"] == 0.0, figures


def test_the_trained_groups_are_the_first_kept_ones_filled_with_left_out_ones():
    from megatron_r1.rl.grpo import RolloutRound, chosen_groups, gathered_round
    from megatron_r1.rl.rewards import RewardBatch
    from megatron_r1.rl.rollout import Rollouts

    def rollout_round(kept, length, first_token):  # groups of 2 sequences, token ids count from first_token
        count = 2 * len(kept)
        tokens = torch.arange(first_token, first_token + count * length).view(count, length)
        rollouts = Rollouts(tokens, [1] * count, [length - 1] * count, [False] * count, [[0.0]] * count)
        rewards = RewardBatch([float(first_token + i) for i in range(count)], {"r": [1.0] * count}, {"r": 1})
        return RolloutRound(rollouts, rewards, torch.arange(count, dtype=torch.float32), torch.tensor(kept))

    rounds = [rollout_round([False, True, False], 3, 0), rollout_round([True, True, True], 5, 100)]
    assert chosen_groups(rounds[:1], 3) == [(0, 0), (0, 1), (0, 2)]  # one round: as it came
    assert chosen_groups(rounds, 3) == [(0, 1), (1, 0), (1, 1)]
    assert chosen_groups([rounds[0], rollout_round([False, False, False], 3, 50)], 3) == [(0, 0), (0, 1), (0, 2)]
    trained = gathered_round(rounds, [(0, 1), (1, 0), (1, 1)], 2)
    assert trained.kept.tolist() == [True, True, True] and trained.advantages.tolist() == [2, 3, 0, 1, 2, 3]
    assert trained.rollouts.tokens.shape == (6, 5) and trained.rollouts.tokens[2, 0] == 100
    assert trained.rollouts.tokens[0].tolist() == [6, 7, 8, 0, 0] and trained.scores.totals[:3] == [2.0, 3.0, 100.0]
    assert trained.scores.failures == {"r": 2} and trained.rollouts.response_lengths == [2, 2, 4, 4, 4, 4]


@pytest.mark.parametrize("padding", [0, 3], ids=["alone", "prefill-padded"])
def test_rollouts_decode_as_generation_does(monkeypatch, padding):
    """top-k 1 sampling is greedy decoding: each row of a group equals generation.generate's greedy
    reply, with prompts of different lengths decoding together (the longer fed token by token after
    the shorter's prefill), also where another rank's shorter prompt shortens the prefill to one token
    and more batches and steps run on others (copies decoded and dropped here). Sampled responses and
    their log-probabilities do not depend on what decodes beside them."""
    from megatron_r1.arguments import parse_args
    from megatron_r1.distributed import destroy_distributed, initialize_distributed
    from megatron_r1.generation import generate
    from megatron_r1.model import build_model
    from megatron_r1.rl import rollout
    from megatron_r1.rl.rollout import Sampling, generate_rollouts

    monkeypatch.setenv("WORLD_SIZE", "1")
    args = parse_args("test", [*TINY, "--mock-data", "--vocab-size", "96", "--seed", "5"])
    args.padded_vocab_size = 128
    initialize_distributed()
    monkeypatch.setattr(rollout, "largest_anywhere", lambda value: value + padding)
    monkeypatch.setattr(rollout, "smallest_anywhere", lambda value: max(value - padding, 1))
    try:
        (model,) = build_model(args)
        prompts = [[3, 17, 42, 8], [5, 9], [7, 7, 7, 1]]
        rollouts = generate_rollouts(model, prompts, 0, 3, 6, 96, [95], Sampling(1.0, 1, 1.0), seed=1, iteration=0)
        for row in range(9):
            prompt = prompts[row // 3]
            expected = generate(model.eval(), prompt, 6, 96, stop_ids=(95,))
            assert rollouts.tokens[row, : len(prompt)].tolist() == prompt
            assert rollouts.response_ids(row) == expected and rollouts.truncated[row] == (95 not in expected)
        sampled = [generate_rollouts(model, prompts, 0, 3, 6, 96, [95], Sampling(), seed=1, iteration=0, max_batch=size)
                   for size in (0, 3)]  # fmt: skip
        assert all(sampled[0].response_ids(row) == sampled[1].response_ids(row) for row in range(9))
        assert all(torch.allclose(sampled[0].log_probs[row], sampled[1].log_probs[row], atol=1e-6) for row in range(9))
        assert len({tuple(sampled[0].response_ids(row)) for row in range(9)}) > 3  # sampling, not greedy
    finally:
        destroy_distributed()


def test_rl_freezes_the_mtp_layers_and_with_the_flag_the_routers(monkeypatch):
    """setup_grpo's chunk preparation: MTP layers never train in GRPO; --moe-router-freeze also stops
    the routers; everything else trains."""
    from megatron_r1.arguments import parse_args
    from megatron_r1.distributed import destroy_distributed, initialize_distributed
    from megatron_r1.model import build_model
    from megatron_r1.rl.setup import _freeze_for_rl

    monkeypatch.setenv("WORLD_SIZE", "1")
    args = parse_args("test", [*TINY_MOE, "--mock-data", "--vocab-size", "96"])
    args.padded_vocab_size = 128
    initialize_distributed()
    try:
        (model,) = build_model(args)
        for freeze_routers in (False, True):
            for param in model.parameters():
                param.requires_grad = True
            args.moe_router_freeze = freeze_routers
            _freeze_for_rl(args, model)
            frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
            routers = {
                name for name, _ in model.named_parameters() if ".router." in name and not name.startswith("mtp.")
            }
            mtp = {name for name, _ in model.named_parameters() if name.startswith("mtp.")}
            assert mtp and routers and frozen == mtp | (routers if freeze_routers else set()), frozen
    finally:
        destroy_distributed()
