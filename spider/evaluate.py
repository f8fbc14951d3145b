"""Ask a model every question of a dataset and score the answers.

    python -m spider.evaluate --model sample_checkpoints/tiny-llava-base --data builtin:upstream

prints progress to stderr and one JSON object (``spider.metrics.score_predictions``'s result
plus ``n``, ``seconds``, ``examples_per_second``) as the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence

import torch

from spider.data.collate import GenerationCollator
from spider.data.records import Example
from spider.errors import CliParser, UserError, cli_main, positive_int


def stop_token_ids(model, tokenizer) -> list[int]:
    """Tokens that end an answer: the tokenizer's end-of-sequence token and every one the
    model's generation config names (Gemma 3 stops at ``<end_of_turn>`` as well as ``<eos>``)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    ids = [tokenizer.eos_token_id, *configured]
    return list(dict.fromkeys(i for i in ids if isinstance(i, int)))


@torch.no_grad()
def generate_answers(
    model,
    processor,
    examples: Sequence[Example],
    batch_size: int = 32,
    max_new_tokens: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Greedy answers to each example's last question, in order.

    Batched, left-padded prompts; ``generate`` with the KV cache; only the new tokens are
    decoded (special tokens dropped, whitespace stripped). ``progress(done, total)`` is
    called after each batch. The model's train/eval mode is restored afterwards.
    """
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, not {batch_size}.")
    collate = GenerationCollator(processor)
    tokenizer = processor.tokenizer
    stop_ids = stop_token_ids(model, tokenizer)
    device = next(model.parameters()).device
    float_dtype = next(model.parameters()).dtype
    was_training = model.training
    model.eval()
    answers: list[str] = []
    try:
        for start in range(0, len(examples), batch_size):
            batch = [examples[i] for i in range(start, min(start + batch_size, len(examples)))]
            inputs = collate(batch)
            inputs = {
                k: v.to(device, dtype=float_dtype if v.is_floating_point() else None)
                if torch.is_tensor(v) else v
                for k, v in inputs.items()
            }
            output = model.generate(
                **inputs,
                do_sample=False,
                use_cache=True,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id
                if tokenizer.pad_token_id is not None
                else tokenizer.eos_token_id,
                eos_token_id=stop_ids,
            )
            new_tokens = output[:, inputs["input_ids"].shape[1] :]
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            answers += [text.strip() for text in texts]
            if progress is not None:
                progress(len(answers), len(examples))
    finally:
        model.train(was_training)
    return answers


def evaluate(
    model,
    processor,
    dataset: Sequence[Example],
    batch_size: int = 32,
    limit: int | None = None,
    max_new_tokens: int = 32,
    progress: Callable[[int, int], None] | None = None,
    keep_predictions: bool = False,
) -> dict:
    """Score ``model`` on the first ``limit`` examples of ``dataset`` (all when ``None``).

    Returns ``spider.metrics.score_predictions``'s dict (``score`` in [0, 1], per-task
    results) with ``n``, ``seconds`` (generation and scoring) and ``examples_per_second``;
    with ``keep_predictions``, ``predictions`` too (the answers, in example order).
    """
    from spider.metrics import score_predictions

    count = len(dataset) if limit is None else min(limit, len(dataset))
    if count == 0:
        raise UserError("there are no examples to evaluate.")
    examples = [dataset[i] for i in range(count)]
    start = time.perf_counter()
    predictions = generate_answers(model, processor, examples, batch_size, max_new_tokens, progress)
    result = dict(score_predictions(examples, predictions))
    seconds = time.perf_counter() - start
    result.update(n=count, seconds=round(seconds, 3), examples_per_second=round(count / seconds, 3))
    if keep_predictions:
        result["predictions"] = predictions
    return result


def _parser() -> argparse.ArgumentParser:
    parser = CliParser(
        prog="python -m spider.evaluate",
        description="Answer every question of a dataset with a model and print the scores as JSON.",
    )
    parser.add_argument(
        "--model",
        required=True,
        help="model directory (saved with save_pretrained: config, weights, processor)",
    )
    parser.add_argument(
        "--data", required=True, help="dataset spec: builtin:NAME[:CELL] or a LLaVA-style JSON file"
    )
    parser.add_argument(
        "--split", default="test", help="split of a built-in dataset (default: test)"
    )
    parser.add_argument(
        "--image-folder",
        default=None,
        help="folder that a JSON file's image paths are relative to (LLaVA's --image-folder; "
        "default: the JSON file's folder)",
    )
    parser.add_argument(
        "--held-out",
        action="store_true",
        help="evaluate only the records of a JSON file that spider.train holds out of "
        "training when it has no --eval-data (1 in 20, evenly spaced)",
    )
    parser.add_argument(
        "--limit",
        type=positive_int,
        default=None,
        help="evaluate only the first N examples (default: all)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=32,
        help="examples generated together (default: 32)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=32,
        help="longest answer generated, in tokens (default: 32)",
    )
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA when available), cpu or cuda (default: auto)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of a built-in dataset's content (default: 0)"
    )
    return parser


@cli_main
def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m spider.evaluate``."""
    args = _parser().parse_args(argv)
    from spider.data import load_dataset
    from spider.models import load_model

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    log(f"loading model {args.model}")
    model, processor = load_model(args.model, device=args.device)
    if args.held_out and args.data.startswith("builtin:"):
        raise UserError("--held-out applies to a JSON --data file; built-in data has a test split.")
    dataset = load_dataset(args.data, split="test" if args.held_out else args.split,
                           seed=args.seed, image_folder=args.image_folder,
                           hold_out=args.held_out)
    total = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    log(
        f"evaluating {total} examples of {args.data} ({args.split}) on {next(model.parameters()).device}"
    )
    result = evaluate(
        model,
        processor,
        dataset,
        batch_size=args.batch_size,
        limit=args.limit,
        max_new_tokens=args.max_new_tokens,
        progress=lambda done, n: log(f"  {done}/{n} answered"),
    )
    split = "held-out" if args.held_out else args.split
    print(json.dumps({"model": args.model, "data": args.data, "split": split, **result}))


if __name__ == "__main__":
    main()
