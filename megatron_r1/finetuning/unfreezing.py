"""Progressive unfreezing (--unfreeze-schedule): the top layers train first, more of them later."""

from megatron_r1.training import Extension, print_rank_last


def parse_unfreeze_schedule(entries, num_layers, error):
    stages = []
    for entry in entries:
        try:
            start, layers = entry.split(":")
            stages.append((int(start), num_layers if layers == "all" else int(layers)))
        except ValueError:
            error(f"--unfreeze-schedule: {entry!r} is not ITER:LAYERS (LAYERS a number or 'all')")
    stages.sort()
    if stages[0][0] != 0 or any(not 0 < n <= num_layers for _, n in stages):
        error(f"--unfreeze-schedule: the first stage must start at iteration 0 and every count be in 1..{num_layers}")
    return stages


class ProgressiveUnfreezing(Extension):
    """Per --unfreeze-schedule, only the top N transformer layers (and
    everything after them: final norm, output layer -- tied word embeddings with it --, MTP) train;
    the rest (lower layers, embeddings) have no gradient, and the
    optimizer skips parameters without one, so they stay bit-unchanged (no weight decay either)."""

    def __init__(self, args):
        self.schedule, self.num_layers = args.unfreeze_schedule, args.num_layers
        self.trainable_layers = None

    def iteration_starts(self, state) -> None:
        layers = [n for start, n in self.schedule if start <= state.iteration][-1]
        if layers == self.trainable_layers:
            return
        self.trainable_layers = layers
        first_trainable = self.num_layers - layers
        for chunk in state.model:
            module = chunk.module
            frozen = set()
            if module.pre_process:
                frozen.update(id(p) for p in module.embedding.parameters())
                if module.share_embeddings_and_output_weights:
                    # Tied: the word embeddings are the output layer too, which trains throughout
                    # (and the PP stages holding its two copies agree on that).
                    frozen.discard(id(module.shared_embedding_or_output_weight()))
            for layer in module.decoder.layers:
                if layer.layer_number - 1 < first_trainable:  # layer_number: global, 1-based
                    frozen.update(id(p) for p in layer.parameters())
            if layers == self.num_layers:
                frozen.clear()
            for param in module.parameters():
                trainable = id(param) not in frozen
                param.requires_grad = trainable
                if hasattr(param, "main_grad"):
                    # The optimizer takes .grad from main_grad; a parameter without one is skipped.
                    if trainable and getattr(param, "_frozen_main_grad", None) is not None:
                        param.main_grad = param._frozen_main_grad
                        param._frozen_main_grad = None
                    elif not trainable and param.main_grad is not None:
                        param._frozen_main_grad, param.main_grad = param.main_grad, None
        print_rank_last(
            f" unfreezing: from iteration {state.iteration}, the top {layers} of {self.num_layers} layers train"
        )
