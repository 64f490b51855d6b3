"""Under torchrun with TP = world size: finetuning.vocab_parallel_kl on each rank's vocabulary
shard against the full-vocabulary KL computed by autograd in one piece, values and the student's
logit gradients; exits non-zero on a mismatch."""

import megatron_r1  # noqa: F401  before megatron.core (platform.py)

# isort: split
import torch
from megatron.core import parallel_state

from megatron_r1.distributed import destroy_distributed, initialize_distributed
from megatron_r1.finetuning import vocab_parallel_kl

VOCAB, PADDED, TEMPERATURE = 13, 16, 2.0


def main():
    world = int(__import__("os").environ["WORLD_SIZE"])
    initialize_distributed(tensor_model_parallel_size=world)
    rank, shard = parallel_state.get_tensor_model_parallel_rank(), PADDED // world
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(3, 5, PADDED, generator=generator, dtype=torch.float64) * 3
    teacher = torch.randn(3, 5, PADDED, generator=generator, dtype=torch.float64) * 3
    weights = torch.rand(3, 5, generator=generator, dtype=torch.float64)  # a loss that weighs tokens differently

    full = student[..., :VOCAB].clone().requires_grad_()
    teacher_log_probs = torch.log_softmax(teacher[..., :VOCAB] / TEMPERATURE, dim=-1)
    student_log_probs = torch.log_softmax(full / TEMPERATURE, dim=-1)
    expected = (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(-1)
    (expected * weights).sum().backward()

    local = student[..., rank * shard : (rank + 1) * shard].clone().requires_grad_()
    kl = vocab_parallel_kl(local, teacher[..., rank * shard : (rank + 1) * shard], TEMPERATURE, VOCAB)
    (kl * weights).sum().backward()
    real = slice(0, max(0, min(VOCAB - rank * shard, shard)))
    assert torch.allclose(kl.double(), expected.detach(), atol=1e-6), (kl, expected)
    expected_grad = full.grad[..., rank * shard : rank * shard + real.stop]
    assert torch.allclose(local.grad[..., real].double(), expected_grad, atol=1e-6), (rank, local.grad, expected_grad)
    assert not local.grad[..., real.stop :].any()  # padding ids are no outcome
    destroy_distributed()


if __name__ == "__main__":
    main()
