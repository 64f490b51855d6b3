"""Optimizer and learning-rate schedule.

megatron-core builds the optimizer stack (fp32 master weights for bf16, gradient clipping,
distributed optimizer). It knows Adam and SGD; for Lion the same stack is built and its inner
torch optimizer, which holds the (master) parameter groups, is replaced by :class:`Lion`.
"""

import math

import torch
from megatron.core import tensor_parallel
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32, get_grad_norm_fp32
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import param_is_not_shared


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"):
    ``update = sign(beta1 * m + (1 - beta1) * g)``, ``p -= lr * (update + wd * p)``,
    ``m = beta2 * m + (1 - beta2) * g``. One state tensor per parameter (Adam keeps two)."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(param)
                    # A per-parameter step count, as torch's optimizers keep (megatron's checkpointing
                    # of the distributed optimizer reads it).
                    state["step"] = torch.tensor(0.0)
                state["step"] += 1
                exp_avg = state["exp_avg"]
                update = exp_avg.mul(beta1).add_(param.grad, alpha=1 - beta1).sign_()
                param.mul_(1 - group["lr"] * group["weight_decay"])
                param.add_(update, alpha=-group["lr"])
                exp_avg.mul_(beta2).add_(param.grad, alpha=1 - beta2)
        return loss


def _init_lion_state(optimizer, config=None):
    """Lion's state before the first step (the distributed optimizer's checkpointing needs it)."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            optimizer.state[param].setdefault("exp_avg", torch.zeros_like(param.data))
            optimizer.state[param].setdefault("step", torch.tensor(0.0))


def build_optimizer(args, model_chunks):
    """Weight decay applies to matrices only: megatron-core's default parameter groups exempt
    biases and 1-D parameters (norm weights). --decoupled-lr gives the embedding and output layer
    their own group (megatron-core's `is_embedding_or_output_parameter`), with its own max/min LR."""
    config = OptimizerConfig(
        optimizer="adam",
        lr=args.lr,
        min_lr=args.min_lr,
        decoupled_lr=args.decoupled_lr,
        decoupled_min_lr=args.decoupled_min_lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        clip_grad=args.clip_grad,
        bf16=args.bf16,
        params_dtype=model_chunks[0].config.params_dtype,
        use_distributed_optimizer=args.use_distributed_optimizer,
        log_num_zeros_in_grad=args.log_num_zeros_in_grad,
    )
    optimizer = get_megatron_optimizer(config, model_chunks)
    if args.optimizer == "adam":
        for wrapper in getattr(optimizer, "chained_optimizers", [optimizer]):
            # Without Apex/TE megatron-core falls back to torch's AdamW, whose default on CPU loops
            # over parameters with ~10 element-wise ops each; the fused kernel is one pass (4x faster).
            # AdamW reads the choice from each group at every step. (Switched in place: a new AdamW
            # would refuse the distributed optimizer's shard parameters, which are buffer views.)
            if type(wrapper.optimizer) is torch.optim.AdamW and not wrapper.optimizer.defaults["fused"]:
                for settings in (wrapper.optimizer.defaults, *wrapper.optimizer.param_groups):
                    settings.update(fused=True, foreach=None)
    if args.optimizer == "lion":
        for wrapper in getattr(optimizer, "chained_optimizers", [optimizer]):
            # The groups keep megatron's keys (wd_mult, is_expert_parallel, ...); Adam's betas go.
            betas = (args.lion_beta1, args.lion_beta2)
            groups = [{**group, "betas": betas} for group in wrapper.optimizer.param_groups]
            wrapper.optimizer = Lion(groups, lr=args.lr, betas=betas, weight_decay=args.weight_decay)
            wrapper.init_state_fn = _init_lion_state
    return optimizer


@torch.no_grad()
def step_if_finite(optimizer) -> tuple[bool, float | None, float | None]:
    """megatron-core's ``optimizer.step()`` (gradients prepared, clipped to --clip-grad by their global
    norm, zeros counted, the update), except that the global norm also decides whether to update:
    any NaN/Inf gradient on any rank makes it NaN/Inf (its reduction spans every rank's gradients,
    so all ranks agree), and then no weight or moment changes. One all-reduce and one host read per
    step, where a separate NaN check cost a second of each. Returns step()'s (updated, norm, zeros)."""
    optimizer.prepare_grads()  # the main (fp32) gradients; its overflow flag is fp16's, not a choice here
    grad_norm = optimizer.get_grad_norm()
    if not math.isfinite(grad_norm):
        return False, None, None
    for wrapper in getattr(optimizer, "chained_optimizers", [optimizer]):
        params, config = wrapper.get_parameters(), wrapper.config
        if config.clip_grad > 0 and params and not getattr(wrapper, "is_stub_optimizer", False):
            decoupled = config.use_precision_aware_optimizer_no_fp8_or_ds_fp8
            clip_grad_by_total_norm_fp32(params, config.clip_grad, grad_norm, decoupled)
    num_zeros = optimizer.count_zeros() if optimizer.config.log_num_zeros_in_grad else None
    return optimizer.step_with_ready_grads(), grad_norm, num_zeros


def params_norm(optimizer) -> float:
    """L2 norm of the weights the optimizer updates (--log-params-norm; a collective, all ranks
    call it): megatron-core's gradient-norm reduction applied to the parameters, so each weight
    counts once across tensor-parallel replicas, tied copies, pipeline stages, experts and
    distributed-optimizer shards."""
    squares = 0.0
    for wrapper in getattr(optimizer, "chained_optimizers", [optimizer]):
        tp_group = getattr(wrapper, "tp_group", None)
        params = [
            param
            for param in wrapper.get_parameters()
            if param_is_not_shared(param) and tensor_parallel.param_is_not_tensor_parallel_duplicate(param, tp_group)
        ]
        squares += get_grad_norm_fp32(params, grad_stats_parallel_group=wrapper.get_grad_stats_parallel_group()) ** 2
    return math.sqrt(squares)


class ParamScheduler(OptimizerParamScheduler):
    """megatron-core's schedules (constant, linear, cosine, inverse-square-root, WSD) plus cosine
    with warm restarts (SGDR, Loshchilov & Hutter 2017): after warmup, cosine cycles from the max
    to the min LR, the first ``restart_iters`` long and each next one ``restart_mult`` times longer."""

    def __init__(self, *args, restart_iters=None, restart_mult=1.0, **kwargs):
        self.restart_iters = restart_iters
        self.restart_mult = restart_mult
        super().__init__(*args, **kwargs)

    def get_lr(self, param_group: dict) -> float:
        in_warmup = self.lr_warmup_steps > 0 and self.num_steps <= self.lr_warmup_steps
        if self.lr_decay_style != "cosine-warm-restarts" or in_warmup:
            return super().get_lr(param_group)
        max_lr = param_group.get("max_lr", self.max_lr)
        min_lr = param_group.get("min_lr", self.min_lr)
        position, cycle = self.num_steps - self.lr_warmup_steps, self.restart_iters
        while position >= cycle:
            position -= cycle
            cycle *= self.restart_mult
        return min_lr + 0.5 * (max_lr - min_lr) * (1 + math.cos(math.pi * position / cycle))


def build_scheduler(args, optimizer):
    """The LR/WD schedule, in iterations or (--train-samples) in samples: see `schedule_increment`."""
    return ParamScheduler(
        optimizer,
        init_lr=args.lr_warmup_init,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_steps,
        lr_decay_steps=args.lr_decay_steps,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_samples if args.train_samples is not None else args.train_iters,
        wd_incr_style="constant",
        wsd_decay_steps=args.lr_wsd_decay_steps,
        lr_wsd_decay_style=args.lr_wsd_decay_style,
        restart_iters=args.lr_restart_iters,
        restart_mult=args.lr_restart_mult,
        # As Megatron-LM: a resumed schedule must match the flags, unless overridden.
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=args.override_opt_param_scheduler,
    )


def schedule_increment(args) -> int:
    """How far one iteration advances the schedule: one step, or with --train-samples the samples
    of a global batch (Megatron-LM's sample-based schedules)."""
    return args.global_batch_size if args.train_samples is not None else 1
