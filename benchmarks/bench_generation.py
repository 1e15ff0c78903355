"""Generation speed per paradigm on the tiny Shapes recipes: latency per query (batch 1) and
throughput (batch 32), with the KV cache and re-running the sequence every step (what NExT-Chat's
loop did before), and the backbone's greedy decoding against transformers' own ``generate`` on
the same language model, prompt (the spliced image + text embeddings) and greedy setting.

    OMP_NUM_THREADS=1 python benchmarks/bench_generation.py [--queries 8] [--repeats 3]

The models are the recipes' untrained models (nothing is downloaded): token counts differ from
trained ones - pixel2seq's grammar stops a box after 4 coordinate tokens, the others run to their
``max_new_tokens`` - so compare ratios within one run, not absolute times.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch

from vlzoo.build import build

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "shapes"

#: paradigm -> (recipe, overrides); attention_keypoints does not generate (one forward pass)
PARADIGMS: dict[str, tuple[str, list[str]]] = {
    "pixel2seq": ("pixel2seq_rec.yaml", []),
    "pixel2emb": ("pixel2emb_rec.yaml", []),
    "heatmap (route=generated)": ("heatmap_rec.yaml", ["paradigm.route=generated"]),
    "language_modeling": ("base_lmm.yaml", []),
}


def best_of(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Fastest of ``repeats`` timed calls of each function after one warm-up; the functions
    take turns, so each pair of figures saw the same load on the shared machine."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, spent in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return [min(t) for t in times]


def generated_tokens(model, batches) -> float:
    """Mean tokens per query that ``predict`` generates (pad after eos not counted), read at the
    backbone's decoding loop, which every generating paradigm goes through."""
    bb, pad = model.backbone, model.backbone.tokenizer.pad_token_id
    counts = []
    original = bb.decode

    def counting(*args, **kwargs):
        new = original(*args, **kwargs)
        counts.append(int((new != pad).sum()))
        return new

    bb.decode = counting
    try:
        for b in batches:
            model.predict(b)
    finally:
        del bb.decode
    return sum(counts) / len(batches)


def bench_paradigm(name: str, recipe: str, overrides: list[str], *, queries: int, repeats: int) -> dict:
    built = build(RECIPES / recipe, overrides=overrides, with_trainer=False, with_logger=False)
    model = built.model.eval()
    dm = built.datamodule
    dataset = dm.val_datasets["val"]
    collate = dm.collate()
    singles = [collate([dataset[i]]) for i in range(queries)]
    big = collate([dataset[i] for i in range(32)])
    row = {"paradigm": name, "max_new_tokens": model.max_new_tokens}
    with torch.no_grad():
        def run(batches: list, cache: bool) -> Callable[[], object]:
            def call() -> None:
                model.use_cache = cache
                for b in batches:
                    model.predict(b)

            return call

        cached, rerun = best_of([run(singles, True), run(singles, False)], repeats)
        row["latency_cache"], row["latency_rerun"] = cached / queries, rerun / queries
        cached, rerun = best_of([run([big], True), run([big], False)], repeats)
        row["throughput_cache"], row["throughput_rerun"] = 32 / cached, 32 / rerun
        model.use_cache = True
        row["tokens_per_query"] = generated_tokens(model, singles)
    return row


def reference_row(bb, config, batch, *, tokens: int, repeats: int) -> dict:
    """Tokens/s of ``backbone.generate`` and of transformers' ``generate`` on one batch."""
    images, ids, mask = batch.images, batch.prompt_ids, batch.prompt_attention_mask

    def ours() -> torch.Tensor:
        return bb.generate(images, ids, mask, max_new_tokens=tokens, eos_token_id=[])

    def theirs() -> torch.Tensor:
        # the same image encoding and splice, then transformers' own decoding loop
        _, image_tokens = bb.encode_images(images)
        sp = bb.splice(bb.embed_tokens(ids), ids, mask, image_tokens)
        return bb.language.model.generate(inputs_embeds=sp.embeds, attention_mask=sp.attention_mask, generation_config=config)

    with torch.no_grad():
        same = torch.equal(ours(), theirs()[:, -tokens:])
        t_ours, t_theirs = best_of([ours, theirs], repeats)
    size = len(batch)
    return {"batch": size, "ours": size * tokens / t_ours, "hf": size * tokens / t_theirs, "same": same}


def bench_reference(*, tokens: int, repeats: int) -> list[dict]:
    """backbone.generate vs transformers' generate on the same LM, spliced prompt, greedy, no eos."""
    from transformers import GenerationConfig

    built = build(RECIPES / "base_lmm.yaml", with_trainer=False, with_logger=False)
    bb = built.model.backbone.eval()
    dataset, collate = built.datamodule.val_datasets["val"], built.datamodule.collate()
    config = GenerationConfig(
        max_new_tokens=tokens, do_sample=False, eos_token_id=None, pad_token_id=bb.tokenizer.pad_token_id
    )
    return [
        reference_row(bb, config, collate([dataset[i] for i in range(size)]), tokens=tokens, repeats=repeats)
        for size in (1, 32)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--queries", type=int, default=8, help="batch-1 queries per latency figure")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (the fastest is kept)")
    parser.add_argument("--tokens", type=int, default=24, help="tokens per row in the reference comparison")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"generation on the tiny Shapes recipes, one thread, best of {args.repeats}")
    print(
        f"{'paradigm':27s} {'new tok':>7s} {'ms/query b1':>11s} {'re-run':>8s} {'x':>5s}"
        f" {'queries/s b32':>13s} {'re-run':>8s} {'x':>5s}"
    )
    for name, (recipe, overrides) in PARADIGMS.items():
        r = bench_paradigm(name, recipe, overrides, queries=args.queries, repeats=args.repeats)
        print(
            f"{name:27s} {r['tokens_per_query']:7.1f} {1e3 * r['latency_cache']:11.1f} {1e3 * r['latency_rerun']:8.1f}"
            f" {r['latency_rerun'] / r['latency_cache']:5.2f} {r['throughput_cache']:13.1f}"
            f" {r['throughput_rerun']:8.1f} {r['throughput_cache'] / r['throughput_rerun']:5.2f}"
        )
    print(f"\nbackbone.generate vs transformers generate (same LM and spliced prompt, greedy, {args.tokens} tokens/row)")
    print(f"{'batch':>5s} {'vlzoo tok/s':>12s} {'HF tok/s':>10s} {'vlzoo/HF':>9s} {'same tokens':>12s}")
    for r in bench_reference(tokens=args.tokens, repeats=args.repeats):
        print(f"{r['batch']:5d} {r['ours']:12.0f} {r['hf']:10.0f} {r['ours'] / r['hf']:9.2f} {str(r['same']):>12s}")


if __name__ == "__main__":
    main()
