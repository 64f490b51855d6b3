"""Sample text from one of our checkpoints (one CPU/GPU process, any saved TP/PP/EP layout), with a
KV cache (megatron-core's StaticInferenceContext).

    python tools/generate.py --load ckpt --prompt "Once upon a time" --max-new-tokens 64
    python tools/generate.py --load ckpt --prompt-file prompt.txt --temperature 0.8 --top-p 0.95 --seed 7
    python tools/generate.py --load sft_ckpt --chat --prompt "What is 3 + 4?" [--system "Be brief."]

Greedy by default (--temperature 0); generation stops after --max-new-tokens or at the end-of-document
token. --prompt-ids takes token ids instead of text (no tokenizer needed). --chat asks a fine-tuned
model: the prompt is a user turn rendered with the fine-tuning chat template (megatron_r1/data/sft.py),
the reply ends at the end of the assistant turn.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_r1.tokenizer import MODEL_TOKENIZER_TYPES  # noqa: E402


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="checkpoint: --save root or an iter_XXXXXXX directory")
    parser.add_argument("--ckpt-step", type=int, default=None, help="this iteration, not the latest")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument("--prompt-file", help="file whose text is the prompt")
    prompt.add_argument("--prompt-ids", type=int, nargs="+", help="prompt as token ids")
    parser.add_argument("--chat", action="store_true", help="the prompt is a user turn of the chat template")
    parser.add_argument("--system", default=None, help="with --chat: a system turn before the user's")
    parser.add_argument("--tokenizer-model", default=None, help="default: the tokenizer saved with the checkpoint")
    parser.add_argument("--tokenizer-type", choices=MODEL_TOKENIZER_TYPES, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0: no top-k filter")
    parser.add_argument("--top-p", type=float, default=1.0, help="1: no nucleus filter")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-kv-cache", action="store_true", help="recompute the whole sequence per token")
    parser.add_argument(
        "--ignore-eod",
        action="store_true",
        help="do not stop at the end-of-document token (with --chat: the end of the turn)",
    )
    return parser


def _prompt_and_stop_ids(args, tokenizer) -> tuple[list[int], list[int]]:
    """The prompt's token ids (given, tokenized, or the chat template's rendering up to the assistant
    turn) and the ids generation stops after (the end of the document, or of the assistant turn)."""
    from megatron_r1.data.sft import ChatTemplate

    stop_ids = [tokenizer.eod] if tokenizer and tokenizer.eod is not None else []
    if args.prompt_ids:
        return args.prompt_ids, stop_ids
    text = args.prompt if args.prompt is not None else open(args.prompt_file, encoding="utf-8").read()
    if not args.chat:
        return tokenizer.tokenize(text), stop_ids
    template = ChatTemplate(tokenizer)
    turns = [{"role": "system", "content": args.system}] if args.system is not None else []
    prompt = template.render([*turns, {"role": "user", "content": text}], add_generation_prompt=True)[0]
    return prompt, template.end_ids


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1 or args.max_new_tokens < 1:
        parser.error("need --temperature >= 0, --top-k >= 0, 0 < --top-p <= 1, --max-new-tokens >= 1")
    if args.prompt_file and not os.path.isfile(args.prompt_file):
        parser.error(f"--prompt-file {args.prompt_file}: no such file")
    if args.chat and args.prompt_ids:
        parser.error("--chat renders a text prompt: give --prompt or --prompt-file, not --prompt-ids")
    if args.system is not None and not args.chat:
        parser.error("--system is a turn of the chat template: add --chat")
    from tqdm import tqdm

    from megatron_r1.checkpointing import CheckpointError, checkpoint_dir
    from megatron_r1.distributed import destroy_distributed, initialize_distributed
    from megatron_r1.generation import generate, load_model
    from megatron_r1.hf.config import resolve_checkpoint
    from megatron_r1.tokenizer import build_tokenizer, tokenizer_type_for_model

    initialize_distributed()
    try:
        checkpoint = (
            checkpoint_dir(args.load, args.ckpt_step) if args.ckpt_step is not None else resolve_checkpoint(args.load)
        )
        model_args, model = load_model(checkpoint)
    except (CheckpointError, FileNotFoundError) as error:
        parser.error(str(error))
    tokenizer_model = args.tokenizer_model or model_args.tokenizer_model
    tokenizer = None
    if tokenizer_model:
        tokenizer = build_tokenizer(
            tokenizer_type_for_model(args.tokenizer_type, model_args.tokenizer_type), tokenizer_model
        )
    elif not args.prompt_ids:
        parser.error(
            "text prompts need a tokenizer: --tokenizer-model (none was saved with the checkpoint), or use --prompt-ids"
        )
    prompt, stop_ids = _prompt_and_stop_ids(args, tokenizer)
    vocab_size = model_args.vocab_size or model_args.padded_vocab_size
    if not prompt or max(prompt) >= vocab_size or min(prompt) < 0:
        parser.error(f"the prompt must be 1+ token ids in [0, {vocab_size})")
    if len(prompt) + args.max_new_tokens > model_args.max_position_embeddings:
        parser.error(
            f"prompt ({len(prompt)} tokens) + --max-new-tokens ({args.max_new_tokens}) exceeds the model's "
            f"{model_args.max_position_embeddings} positions"
        )
    if args.ignore_eod:
        stop_ids = []
    start = time.perf_counter()
    with tqdm(total=args.max_new_tokens, desc="generating", unit="tok", file=sys.stderr) as bar:
        new = generate(
            model,
            prompt,
            args.max_new_tokens,
            vocab_size,
            stop_ids,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            use_kv_cache=not args.no_kv_cache,
            on_token=lambda _: bar.update(),
        )
    elapsed = time.perf_counter() - start
    destroy_distributed()
    ended = bool(new) and new[-1] in stop_ids
    if tokenizer:  # a chat reply without the id that ends the turn
        print(tokenizer.detokenize(new[:-1] if ended and args.chat else new))
    print(f"prompt token ids: {' '.join(map(str, prompt))}")
    print(f"new token ids: {' '.join(map(str, new))}")
    stopped = ("end of the assistant turn" if args.chat else "end of document") if ended else "--max-new-tokens"
    print(
        f"generated {len(new)} tokens after a {len(prompt)}-token prompt in {elapsed:.2f} s "
        f"({len(new) / elapsed:.1f} tokens/s), stopped at {stopped}"
    )


if __name__ == "__main__":
    main()
