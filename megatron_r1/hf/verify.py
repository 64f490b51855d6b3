"""Both models on the same tokens: our checkpoint through megatron-core, the Hugging Face directory
through transformers (fp32, CPU); ours on the compute device."""

import os

import torch

from megatron_r1.hf.config import UnsupportedModelError
from megatron_r1.jsonfile import read_json_object


def refuse_known_transformers_differences(hf_dir: str) -> None:
    """UnsupportedModelError where the installed transformers is known to compute the directory's model
    otherwise than DeepSeek's reference code (and megatron-core, vLLM, SGLang): 4.x's DeepseekV2 leaves
    yarn's mscale(factor, mscale_all_dim)^2 out of the attention softmax scale (5.x applies it)."""
    import transformers

    config = read_json_object(os.path.join(hf_dir, "config.json"), UnsupportedModelError)
    scaling = config.get("rope_scaling") or {}
    if (
        config.get("model_type") == "deepseek_v2"
        and int(transformers.__version__.split(".")[0]) < 5
        and scaling.get("mscale_all_dim")
    ):
        raise UnsupportedModelError(
            f"{hf_dir}: transformers {transformers.__version__}'s DeepseekV2 leaves yarn's mscale_all_dim factor out "
            "of the attention softmax scale, which DeepSeek's code, vLLM and transformers >= 5 apply: verify "
            "under transformers >= 5 (the directory itself is right)"
        )


@torch.no_grad()
def compare_logits(checkpoint: str, hf_dir: str, batch_size: int = 2, seq_length: int = 32, seed: int = 0) -> dict:
    """Max |logit difference| and top-1 agreement over random token sequences (needs a one-process
    megatron-core parallel state)."""
    from transformers import AutoModelForCausalLM

    from megatron_r1.generation import load_model

    refuse_known_transformers_differences(hf_dir)
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
