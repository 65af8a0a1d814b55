"""Trials per hour: what one candidate costs — merge, then evaluation — measured side by side in one run.

For each model shape, a random-weights Llama base and N sources (the base plus noise) are written as HF
directories into a temporary folder and made resident in the engine, as a search holds them. Per candidate:

- merge: `Engine.materialize` of a task-arithmetic recipe into the resident target model;
- generation: `--docs` prompts of `--prompt-len` random tokens decoded greedily for exactly `--new-tokens`
  tokens (no stop token), by the native evaluator with each of `--decoders` (the KV cache grown per step, static,
  static with the decode step compiled: CUDA graphs on a GPU; see evaluate/decoding.py), by HF `generate` on the
  same batches and by lm-eval's HFLM (`generate_until` on the prompts as text, its own batching); whether each
  one's generated tokens equal HF `generate`'s is printed;
- multiple choice: the same prompts with 4 continuations of 4 tokens each, native log-likelihood scoring of
  whole sequences, and with `shared_prefix` (each prompt run once, its cache copied to its 4 continuations;
  the largest difference of a log-likelihood sum between the two is printed);
- trials/hour = 3600 / (merge + native generation with the device's default decoder + native multiple choice).
The native evaluator shares batches among CPU threads for small models (`workers`, see evaluate/native.py).

    python benchmarks/search_throughput.py                                  # CPU: the demo zoo's shape, ~100M
    python benchmarks/search_throughput.py --device cuda --dtype bfloat16 --shapes 1b 7b --sources 1 --docs 64
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from evomerge.evaluate.decoding import DECODERS  # noqa: E402

SHAPES = {  # LlamaConfig arguments
    "zoo": dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=6, intermediate_size=512, vocab_size=64),
    "100m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=2048),
    "1b": dict(
        hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, intermediate_size=8192
    ),
    "7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=11008),
}


def word_tokenizer(vocab: int):
    """Token i is the word "t<i>": prompts of random ids become text that encodes back to the same ids (lm-eval's
    HFLM takes text), and an end-of-text token the model cannot emit (id `vocab`) keeps every generator running
    for exactly --new-tokens tokens. Every generator's text leaves out "t0" (the padding token, special)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({**{f"t{i}": i for i in range(vocab)}, "<eot>": vocab}, unk_token="<eot>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=words, pad_token="t0", eos_token="<eot>")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    fn()  # warm-up
    sync(device)
    times, value = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        value = fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), value


def write_family(root: Path, shape: str, n_sources: int, dtype: torch.dtype) -> tuple[str, list[str]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(  # no end-of-sequence token: both generators run for exactly --new-tokens tokens
        **{"vocab_size": 32000, **SHAPES[shape]},
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(root / "base")
    sources = []
    for i in range(n_sources):
        g = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            noise = [
                (p, torch.randn(p.shape, generator=g, dtype=torch.float32).to(dtype) * 0.01) for p in model.parameters()
            ]
            for p, d in noise:
                p.add_(d)
            model.save_pretrained(root / f"src{i}")
            for p, d in noise:
                p.sub_(d)
        sources.append(str(root / f"src{i}"))
    return str(root / "base"), sources


def run_shape(shape: str, args) -> dict:
    from evomerge.engine import Engine
    from evomerge.evaluate.native import NativeEvaluator
    from evomerge.evaluate.tasks import Task, TaskSpec
    from evomerge.recipe import Recipe

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        base, sources = write_family(Path(tmp), shape, args.sources, dtype)
        engine = Engine(base, sources, device=args.device, dtype=dtype)
        model = engine.load_target_model().eval()
        target = engine.bind(model)
    params = sum(p.numel() for p in model.parameters())
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.docs)]
    gen = Task(
        TaskSpec("gen", "generate", {}, max_new_tokens=args.new_tokens, stop=[]),
        "search",
        [{"prompt_ids": p, "answer": ""} for p in prompts],
    )
    choices = [[torch.randint(1, vocab, (4,), generator=g).tolist() for _ in range(4)] for _ in prompts]
    mc = Task(
        TaskSpec("mc", "multiple_choice", {}, metric="acc"),
        "search",
        [{"pairs_ids": [(p + c, len(p)) for c in cs], "label": 0} for p, cs in zip(prompts, choices)],
    )
    tok = word_tokenizer(vocab)
    native = NativeEvaluator(model, tok, [gen, mc], batch_size=args.batch_size)
    decoders = {d: NativeEvaluator(model, tok, [gen], batch_size=args.batch_size, decoder=d) for d in args.decoders}
    mc_once = Task(dataclasses.replace(mc.spec, name="mc_once", shared_prefix=True), "search", mc.items)
    once = NativeEvaluator(model, tok, [mc_once], batch_size=args.batch_size)
    rng = torch.Generator().manual_seed(1)

    def merge():
        weights = torch.rand(len(sources), generator=rng).tolist()
        recipe = Recipe.from_dict(
            {
                "merge_method": "task_arithmetic",
                "base_model": base,
                "models": [{"model": s, "parameters": {"weight": w}} for s, w in zip(sources, weights)],
            }
        )
        engine.materialize(recipe, target)

    def hf_generate():
        out = {}
        for batch in native._batches_for(gen, native._prepared["gen"]["encoded"], list(range(len(prompts)))):
            with torch.inference_mode():
                ids = model.generate(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    max_new_tokens=args.new_tokens,
                    do_sample=False,
                    pad_token_id=0,
                )
            for r, i in enumerate(batch.index):
                out[i] = tok.decode(ids[r, batch.input_ids.shape[1] :].tolist(), skip_special_tokens=True)
        return out

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size, max_length=args.prompt_len + args.new_tokens)
    settings = {"until": [], "max_gen_toks": args.new_tokens, "do_sample": False}
    requests = [Instance("generate_until", {}, (tok.decode(p), settings), i) for i, p in enumerate(prompts)]

    def hflm_generate():
        return dict(enumerate(lm.generate_until(requests, disable_tqdm=True)))

    t_merge, _ = timed(merge, device, args.repeats)
    t_hf, hf_text = timed(hf_generate, device, args.repeats)
    t_hflm, hflm_text = timed(hflm_generate, device, args.repeats)
    per_decoder = {}
    for name, ev in decoders.items():
        t = time.perf_counter()
        ev.generate(gen)  # a compiled step compiles here
        first = time.perf_counter() - t
        t_dec, text = timed(lambda: ev.generate(gen), device, args.repeats)
        per_decoder[name] = {"time": t_dec, "first": first, "equal": text == hf_text}
    t_gen = (
        per_decoder[native.decoder]["time"]
        if native.decoder in per_decoder
        else timed(lambda: native.generate(gen), device, args.repeats)[0]
    )
    t_mc, _ = timed(lambda: native.evaluate({"mc": list(range(len(prompts)))}), device, args.repeats)
    t_once, _ = timed(lambda: once.evaluate(), device, args.repeats)
    which, rows = list(range(len(prompts))), native._prepared["mc"]["rows"]
    with torch.inference_mode():
        whole = {k: v for b in native._mc_batches(rows, which) for k, v in native._loglik(b).items()}
        shared = {k: v for b in once._shared_batches(mc_once, which) for k, v in once._loglik_shared(b).items()}
    tokens = args.docs * args.new_tokens
    return {
        "shape": shape,
        "params": params,
        "merge": t_merge,
        "native_gen": t_gen,
        "decoder": native.decoder,
        "decoders": per_decoder,
        "hf_gen": t_hf,
        "hflm_gen": t_hflm,
        "hflm_equal": {i: t.strip() for i, t in hflm_text.items()} == hf_text,
        "mc": t_mc,
        "mc_once": t_once,
        "mc_diff": max(abs(whole[k] - shared[k]) for k in whole),
        "tokens": tokens,
        "hf_tps": tokens / t_hf,
        "trials_per_hour": 3600 / (t_merge + t_gen + t_mc),
        "workers": native.workers,
    }


def main() -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["zoo", "100m"], choices=list(SHAPES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--sources", type=int, default=3)
    ap.add_argument("--docs", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decoders", nargs="+", default=list(DECODERS), choices=list(DECODERS))
    args = ap.parse_args()
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {args.device}, {args.dtype}, "
        f"{torch.get_num_threads()} threads; {args.docs} prompts × {args.prompt_len} tokens, {args.new_tokens} new "
        f"tokens, batch {args.batch_size}, {args.sources} sources, median of {args.repeats}"
    )
    print(
        f"{'shape':6s} {'params':>8s} {'merge':>9s} {'generation':>11s} {'MC':>9s} {'MC shared':>10s} "
        f"{'max |Δ|':>8s} {'trials/h':>9s} {'workers':>8s}"
    )
    results = []
    for shape in args.shapes:
        r = run_shape(shape, args)
        results.append(r)
        print(
            f"{r['shape']:6s} {r['params'] / 1e6:7.1f}M {r['merge'] * 1e3:7.0f}ms {r['native_gen'] * 1e3:9.0f}ms "
            f"{r['mc'] * 1e3:7.0f}ms {r['mc_once'] * 1e3:8.0f}ms {r['mc_diff']:8.1e} {r['trials_per_hour']:9.0f} "
            f"{r['workers']:8d}",
            flush=True,
        )
    print(f"\ngeneration, side by side (trials/hour above: the {results[0]['decoder']!r} decoder)")
    print(f"{'shape':6s} {'generator':>22s} {'time':>9s} {'first call':>11s} {'tok/s':>9s} {'vs HF':>7s} {'equal':>6s}")
    for r in results:
        print(f"{r['shape']:6s} {'HF generate':>22s} {r['hf_gen'] * 1e3:7.0f}ms {'':>11s} {r['hf_tps']:9.0f}")
        print(
            f"{r['shape']:6s} {'lm-eval HFLM':>22s} {r['hflm_gen'] * 1e3:7.0f}ms {'':>11s} "
            f"{r['tokens'] / r['hflm_gen']:9.0f} {r['hf_gen'] / r['hflm_gen']:6.2f}× {str(r['hflm_equal']):>6s}"
        )
        for name, d in r["decoders"].items():
            print(
                f"{r['shape']:6s} {'native, ' + name:>22s} {d['time'] * 1e3:7.0f}ms {d['first'] * 1e3:9.0f}ms "
                f"{r['tokens'] / d['time']:9.0f} {r['hf_gen'] / d['time']:6.2f}× {str(d['equal']):>6s}"
            )


if __name__ == "__main__":
    main()
