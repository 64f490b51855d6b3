"""Both models on the same tokens: our checkpoint through megatron-core, the Hugging Face directory
through transformers (fp32, CPU); ours on the compute device."""

import torch


@torch.no_grad()
def compare_logits(checkpoint: str, hf_dir: str, batch_size: int = 2, seq_length: int = 32, seed: int = 0) -> dict:
    """Max |logit difference| and top-1 agreement over random token sequences (needs a one-process
    megatron-core parallel state)."""
    from transformers import AutoModelForCausalLM

    from megatron_r1.generation import load_model

    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    vocab_size = hf_model.config.vocab_size
    seq_length = min(seq_length, hf_model.config.max_position_embeddings)
    tokens = torch.randint(0, vocab_size, (batch_size, seq_length), generator=torch.Generator().manual_seed(seed))
    theirs = hf_model(tokens).logits.float()
    del hf_model
    _, model = load_model(checkpoint)
    device = next(model.parameters()).device
    positions = torch.arange(seq_length, device=device).expand(batch_size, seq_length)
    ours = model(tokens.to(device), positions, None)[..., :vocab_size].float().cpu()
    return {
        "max_abs_logit_diff": (ours - theirs).abs().max().item(),
        "top1_agreement": (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item(),
        "tokens": batch_size * seq_length,
    }
