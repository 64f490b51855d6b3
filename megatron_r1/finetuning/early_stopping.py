"""Early stopping on the validation loss (--early-stop-patience), keeping the best weights."""

import math

import torch

from megatron_r1 import platform
from megatron_r1.checkpointing import save_checkpoint
from megatron_r1.training import Extension, print_rank_last


class EarlyStopping(Extension):
    """Keeps a copy of the trainable weights at the best validation loss,
    stops after ``patience`` evaluations without improvement, and puts the best weights back when
    training ends (stopped or at --train-iters), before the final save."""

    def __init__(self, args):
        self.args, self.patience, self.min_delta = args, args.early_stop_patience, args.early_stop_min_delta
        self.best_loss, self.best_iteration, self.evaluations_without_improvement = math.inf, None, 0
        self.losses = []
        self._best_weights = None

    @staticmethod
    def _trainable(state):
        return [p for chunk in state.model for p in chunk.module.parameters() if p.requires_grad]

    def validated(self, state, valid_loss) -> bool:
        # The loss lives on the last pipeline stage; every rank must take the same decision.
        loss = torch.tensor(
            [valid_loss if valid_loss is not None else 0.0], dtype=torch.float64, device=platform.compute_device()
        )  # NCCL takes device tensors only
        torch.distributed.broadcast(loss, src=torch.distributed.get_world_size() - 1)
        loss = loss.item()
        self.losses.append((state.iteration, loss))
        if loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_iteration, self.evaluations_without_improvement = loss, state.iteration, 0
            self._best_weights = [p.detach().clone() for p in self._trainable(state)]
        else:
            self.evaluations_without_improvement += 1
        stop = bool(self.patience) and self.evaluations_without_improvement >= self.patience
        if stop:
            print_rank_last(
                f" early stopping at iteration {state.iteration}: no better validation loss in "
                f"{self.patience} evaluations"
            )
        if stop or state.iteration >= self.args.train_iters:
            self.restore_best(state)
        return stop

    def restore_best(self, state) -> None:
        if self.best_iteration is None or self.best_iteration == state.iteration:
            return
        with torch.no_grad():
            for param, best in zip(self._trainable(state), self._best_weights):
                param.copy_(best)
        state.optimizer.reload_model_params()  # mixed precision: the fp32 main copies too
        print_rank_last(
            f" restored the best weights (iteration {self.best_iteration}, validation loss {self.best_loss:.6E})"
        )
        if self.args.save and self.args.save_interval and state.iteration % self.args.save_interval == 0:
            save_checkpoint(self.args, state)  # the loop just saved this iteration with the later weights
