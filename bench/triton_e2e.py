"""End-to-end decode speed of qcompile's CUDA runtime vs Hugging Face transformers fp16 ``generate``, one GPU.

* A Llama-shaped model of about 1.2B parameters (Llama-3.2-1B geometry: hidden 2048, 16 layers, 32/8 heads of
  64, MLP 8192, vocab 128256, tied embeddings) with random weights, built from a config. Its linears are quantized
  with qcompile's own RTN grid (``QuantizedWeight.from_float``: int4 asymmetric, groups of 128 along the input)
  and handed to ``TritonCausalLM`` in the layout the exported graph carries; lm_head stays fp16, as in the recipes.
  Batch 1, greedy, prompt of --prompt-len tokens, --new-tokens decoded; decode tokens/s = (new - 1) / (time of the
  whole generate minus the time of a 1-token generate), the same for both. The HF model holds the dequantized
  weights, so the logits of both are compared too (a check that the runner computes the same function). Each
  runner row also times its decode step alone (``decode_step_us``: ``greedy_steps`` back to back after a prefill,
  CUDA events), which neither the prefill nor any host wait enters; --variants picks the rows.
* SmolLM2 correctness (--smollm2 FOLDER, an exported folder): greedy tokens of the runner (fp16 and fp32) vs ONNX
  Runtime on five chat prompts.
* On sm_90+, the 16-bit-cache runner again with its decode step's Triton kernels as programmatic dependent launches
  (``pdl=True``: each may launch while the kernel before drains; the GEMVs read their first weight tile then),
  beside the plain launches of the same run; once more with the tensor-core int4 GEMV among the GEMV tuner's
  candidates (``mma_gemv=True``); and once with q|k|v, o and gate|up on the digit-plane GEMV (``digit_gemv=True``:
  ``gemv_digits`` reading planes the RMSNorm or the attention before them writes).

    python bench/triton_e2e.py --out bench/results/triton_e2e.json [--variants pdl,pdl_digits] [--smollm2 DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# a benchmark times the tuner's own picks, not those an earlier run left in the disk cache (_tune.TuningCache)
os.environ.setdefault("QCOMPILE_TUNE_CACHE", "0")

from qcompile.quant.grid import QuantizedWeight, QuantSpec  # noqa: E402
from qcompile.runtime.triton._tune import supports_pdl  # noqa: E402
from qcompile.runtime.triton.runner import (  # noqa: E402
    ROLES,
    ExportedLinear,
    LayerWeights,
    ModelWeights,
    TritonCausalLM,
)

PATHS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
         "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def llama_1b(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                      rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.float16).eval()
    return model


@torch.no_grad()
def quantize_into(model, spec: QuantSpec) -> ModelWeights:
    """RTN-quantize every linear (the HF model keeps the dequantized weight) -> ModelWeights in graph layout."""
    layers = []
    for layer in model.model.layers:
        linears = {}
        for role in ROLES:
            mod = layer.get_submodule(PATHS[role])
            qw = QuantizedWeight.from_float(mod.weight.float(), spec)
            mod.weight.copy_(qw.dequantize().to(mod.weight))
            linears[role] = ExportedLinear(qweight=qw.qweight.t().numpy(), scale=qw.scale.t().numpy(),
                                           zero=None if qw.zero is None else qw.zero.t().numpy(),
                                           bits=4 if spec.bits <= 4 else 8)
        layers.append(LayerWeights(linears=linears, input_norm=layer.input_layernorm.weight.float().cpu().numpy(),
                                   post_attn_norm=layer.post_attention_layernorm.weight.float().cpu().numpy()))
    cfg = model.config
    rotary = model.model.rotary_emb
    return ModelWeights(
        num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
        rms_eps=cfg.rms_norm_eps, inv_freq=rotary.inv_freq.float().cpu().numpy(),
        embed=model.model.embed_tokens.weight.float().cpu().numpy(), lm_head=None, layers=layers,
        final_norm=model.model.norm.weight.float().cpu().numpy(),
        rope_scaling=float(getattr(rotary, "attention_scaling", 1.0)), max_position=cfg.max_position_embeddings)


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def decode_rate(generate, prompt, new_tokens: int, repeats: int) -> dict:
    generate(prompt, 8)  # warm-up (tuning, graph capture already done for ours)
    t_full = timed(lambda: generate(prompt, new_tokens), repeats)
    t_one = timed(lambda: generate(prompt, 1), repeats)
    return {"tokens_per_s": (new_tokens - 1) / (t_full - t_one), "generate_s": t_full, "prefill_s": t_one}


# the runner rows (key suffix -> KV bits, PDL, mma GEMV, digit GEMV); the PDL rows only on sm_90+
VARIANTS = {"plain": (16, False, False, False), "pdl": (16, True, False, False), "pdl_mma": (16, True, True, False),
            "pdl_digits": (16, True, False, True), "kv8": (8, False, False, False), "kv4": (4, False, False, False)}


def step_time_us(runner, prompt, steps: int, repeats: int) -> dict:
    """The decode step alone: after a prefill, ``steps`` steps back to back on the GPU (``greedy_steps``: each fed
    its own argmax, no host round trip), timed with CUDA events; median over ``repeats``. Unlike tokens/s of
    ``generate`` this leaves out the prefill and the host's wait between chunks, which a slow host inflates."""
    times, tokens = [], None
    for _ in range(repeats):
        first = int(torch.argmax(runner.prefill(prompt)))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = runner.greedy_steps(first, steps)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / steps)
        tokens = [first] + out.tolist()
    # the same tokens as the host-fed loop's (the same steps, each fed its argmax from the host)
    host = [int(torch.argmax(runner.prefill(prompt)))]
    while len(host) < steps + 1:
        host.append(int(torch.argmax(runner.decode(host[-1]))))
    return {"decode_step_us": statistics.median(times), "decode_step_us_all": times,
            "greedy_steps_equal_host_fed": tokens == host}


def kernel_profile(runner, prompt, steps: int = 16) -> dict:
    """The GPU time of each kernel of a decode step (torch.profiler, CUPTI), summed by kernel name and divided by
    ``steps``: for a runner built with plain launches and no CUDA graph, so that each kernel's time is its own
    (a programmatic dependent's would include its wait for the kernel before)."""
    from torch.profiler import ProfilerActivity, profile

    first = int(torch.argmax(runner.prefill(prompt)))
    runner.greedy_steps(first, 2)  # warm-up: tuning, workspaces
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        runner.greedy_steps(first, steps)
        torch.cuda.synchronize()
    avgs = prof.key_averages()
    rows = sorted(((a.key, a.self_device_time_total / steps, a.count // steps) for a in avgs
                   if a.device_type == torch.autograd.DeviceType.CUDA and a.self_device_time_total > 0),
                  key=lambda r: -r[1])
    return {"kernel_us_per_step": round(sum(r[1] for r in rows), 1),
            "kernels": [{"name": n[:120], "us_per_step": round(t, 2), "launches_per_step": c} for n, t, c in rows],
            "table": avgs.table(sort_by="self_device_time_total", row_limit=30)}


def bench_synthetic(args, save=lambda part: None) -> dict:
    from transformers import GenerationConfig

    model = llama_1b(args.layers)
    n_params = sum(p.numel() for p in model.parameters())
    spec = QuantSpec(bits=4, symmetric=False, group_size=128)
    t0 = time.time()
    weights = quantize_into(model, spec)
    quant_s = time.time() - t0
    prompt = torch.randint(3, model.config.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(1))
    ids = prompt.tolist()
    res = {"params": n_params, "quantization": spec.describe(), "quantize_s": round(quant_s, 1),
           "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}

    gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=1, min_new_tokens=1, pad_token_id=0, eos_token_id=None)

    @torch.inference_mode()
    def hf_generate(p, n):
        x = torch.tensor([p], device="cuda")
        return model.generate(x, attention_mask=torch.ones_like(x), generation_config=gen_cfg, max_new_tokens=n,
                              min_new_tokens=n)[0, len(p):].tolist()

    res["hf_fp16"] = decode_rate(hf_generate, ids, args.new_tokens, args.repeats)
    save(res)
    print(f"HF transformers fp16 generate: {res['hf_fp16']['tokens_per_s']:.1f} tok/s", flush=True)
    if args.hf_static:
        model.generation_config.cache_implementation = "static"
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
        res["hf_fp16_static_compiled"] = decode_rate(hf_generate, ids, args.new_tokens, args.repeats)
        print(f"HF fp16 static cache + torch.compile: {res['hf_fp16_static_compiled']['tokens_per_s']:.1f} tok/s",
              flush=True)

    # the 16-bit cache three times: plain launches, then the decode step's kernels as programmatic dependents
    # (``pdl``), then those with the tensor-core GEMV among the tuner's candidates (``mma_gemv``), where the GPU has
    # them (sm_90+)
    pdl_ok = supports_pdl("cuda")
    runners = [v for v in VARIANTS if v in args.variants and (pdl_ok or not VARIANTS[v][1])]
    for kv_bits, pdl, mma, digits in (VARIANTS[v] for v in runners):
        t0 = time.time()
        runner = TritonCausalLM(weights, dtype=torch.float16, kv_bits=kv_bits, max_seq_len=args.prompt_len +
                                args.new_tokens + 16, pdl=pdl, mma_gemv=mma, digit_gemv=digits)
        setup = time.time() - t0
        r = decode_rate(runner.generate, ids, args.new_tokens, args.repeats)
        r["setup_s"] = round(setup, 1)
        r.update(step_time_us(runner, ids, args.new_tokens - 1, max(3, args.repeats)))
        r["speedup_vs_hf_fp16"] = r["tokens_per_s"] / res["hf_fp16"]["tokens_per_s"]
        if kv_bits == 16 and not pdl:  # the same function: compare prompt logits with HF on the dequantized weights
            with torch.inference_mode():
                ours = runner.prefill(ids, all_logits=True)
                hf = model(torch.tensor([ids], device="cuda")).logits[0].float()
            r["prefill_logits_max_abs_diff_vs_hf"] = (ours - hf).abs().max().item()
            r["logits_max_abs"] = hf.abs().max().item()
            r["argmax_agreement_vs_hf"] = (ours.argmax(-1) == hf.argmax(-1)).float().mean().item()
            r["decode_tokens_equal_hf"] = runner.generate(ids, 32) == hf_generate(ids, 32)
        plain_row, pdl_row = res.get(f"triton_int4_kv{kv_bits}"), res.get(f"triton_int4_kv{kv_bits}_pdl")
        if pdl and plain_row:
            r["speedup_vs_plain_launches"] = r["tokens_per_s"] / plain_row["tokens_per_s"]
        if mma and pdl_row:
            r["speedup_vs_pdl_without_mma"] = r["tokens_per_s"] / pdl_row["tokens_per_s"]
        if digits:
            r["linears_on_digits"] = sum(lin.digits is not None for layer in runner.layers
                                         for lin in (layer.qkv, layer.o, layer.gate_up))
            r["digit_layouts"] = {role: (lin.digits.splits, lin.digits.warps) for role in ("qkv", "o", "gate_up")
                                  if (lin := getattr(runner.layers[0], role)).digits is not None}
            r["notes"] = runner.notes
        if digits and pdl_row:
            r["speedup_vs_pdl_pointer_gemv"] = r["tokens_per_s"] / pdl_row["tokens_per_s"]
            r["step_speedup_vs_pdl_pointer_gemv"] = pdl_row["decode_step_us"] / r["decode_step_us"]
            # the same greedy tokens as the PDL row's runner (fp16 both, other roundings: a near tie may flip)
            r["decode_tokens_equal_pdl_pointer_gemv"] = runner.generate(ids, 32) == pdl_row["tokens_32"]
        if kv_bits == 16 and pdl and not mma and not digits:
            r["tokens_32"] = runner.generate(ids, 32)
        res[f"triton_int4_kv{kv_bits}" + ("_pdl" if pdl else "") + ("_mma" if mma else "")
            + ("_digits" if digits else "")] = r
        save(res)
        print(f"qcompile Triton int4, KV {kv_bits}-bit{', PDL step' if pdl else ''}{', mma GEMV' if mma else ''}"
              f"{', digit GEMV' if digits else ''}: "
              f"{r['tokens_per_s']:.1f} tok/s "
              f"({r['speedup_vs_hf_fp16']:.2f}x HF fp16); decode step {r['decode_step_us']:.1f} us", flush=True)
        del runner
        torch.cuda.empty_cache()
        if args.profile:  # the same row's kernels, each timed alone: plain launches, no CUDA graph
            eager = TritonCausalLM(weights, dtype=torch.float16, kv_bits=kv_bits, max_seq_len=args.prompt_len + 64,
                                   pdl=False, cuda_graph=False, mma_gemv=mma, digit_gemv=digits)
            r["profile_plain_launches"] = prof = kernel_profile(eager, ids)
            save(res)
            print(f"  kernels of a step, each alone: {prof['kernel_us_per_step']:.1f} us; "
                  + "; ".join(f"{k['name'][:48]} {k['us_per_step']:.1f} us x{k['launches_per_step']}"
                              for k in prof["kernels"][:8]), flush=True)
            del eager
            torch.cuda.empty_cache()
    return res


def bench_smollm2(folder: str, new_tokens: int) -> dict:
    """Greedy tokens of the runner vs ORT's (fp32, accuracy level 1) on five chat prompts, for the runner in fp32,
    and in fp16 with the int4 GEMV's per-word decode (``QCOMPILE_GEMV_PAIRS=0``) and row pairs (the default), each
    with the runner's default launches (PDL on sm_90+), row pairs with plain launches too, and (sm_90+) with the
    tensor-core GEMV among the tuner's candidates (``mma_gemv``); and,
    along ORT's own greedy path (the runner fed ORT's tokens one decode step at a time, so every step runs the
    batch-1 GEMVs), how often the runner's top token is ORT's and how far its logits are from ORT's. First
    divergences alone compare badly: one flipped near-tie changes every token after it."""
    from transformers import AutoTokenizer

    from qcompile.runtime.ort import OrtCausalLM

    tok = AutoTokenizer.from_pretrained(folder)
    ort = OrtCausalLM.from_dir(folder, accuracy_level=1)
    prompts = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
               "Explain gravity to a child.", "Translate 'good morning' to Spanish."]
    out = {"folder": folder, "new_tokens": new_tokens}
    refs = []
    for q in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        ref = ort.generate(ids, new_tokens)
        # ORT's logits at the positions that predicted its tokens, one full forward over prompt + tokens
        ref_logits = ort.logits(np.asarray([ids + ref[:-1]], dtype=np.int64))[0, len(ids) - 1:]
        refs.append((q, ids, ref, ref_logits.astype(np.float32)))
    # the runner's default launches (PDL on sm_90+), the default fp16 decode once more with plain launches (PDL
    # GEMVs are tuned as chains: other tiles, other K splits, so other roundings), and with the tensor-core GEMV among
    # the tuner's candidates (``mma_gemv``, sm_90+ as PDL)
    runs = [("fp32", torch.float32, "1", None, False), ("fp16_words", torch.float16, "0", None, False),
            ("fp16_pairs", torch.float16, "1", None, False), ("fp16_pairs_plain", torch.float16, "1", False, False)]
    if supports_pdl("cuda"):
        runs.append(("fp16_mma_gemv", torch.float16, "1", None, True))
    for name, dtype, pairs, pdl, mma in runs:
        with mock.patch.dict(os.environ, {"QCOMPILE_GEMV_PAIRS": pairs}):
            runner = TritonCausalLM.from_dir(folder, dtype=dtype, max_seq_len=512, pdl=pdl, mma_gemv=mma)
            rows = []
            for q, ids, ref, ref_logits in refs:
                got = runner.generate(ids, new_tokens)
                first = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), None)
                steps = [runner.prefill(ids)] + [runner.decode(t) for t in ref[:-1]]
                forced = torch.stack(steps).cpu().numpy()
                diff = forced - ref_logits
                rows.append({"prompt": q, "equal": got == ref, "first_divergence": first,
                             "forced_top1_agree": float((forced.argmax(-1) == ref_logits.argmax(-1)).mean()),
                             "forced_max_abs_logit_err": float(np.abs(diff).max()),
                             "forced_rms_logit_err": float(np.sqrt((diff ** 2).mean())),
                             "text": tok.decode(got, skip_special_tokens=True)})
        out[name] = {"prompts_equal": sum(r["equal"] for r in rows), "of": len(rows),
                     "tokens_before_divergence": sum(new_tokens if r["first_divergence"] is None
                                                     else r["first_divergence"] for r in rows),
                     "forced_top1_agree": statistics.mean(r["forced_top1_agree"] for r in rows),
                     "forced_max_abs_logit_err": max(r["forced_max_abs_logit_err"] for r in rows),
                     "forced_rms_logit_err": statistics.mean(r["forced_rms_logit_err"] for r in rows),
                     "rows": rows, "notes": runner.notes}
        o = out[name]
        o["pdl"] = runner.pdl
        print(f"SmolLM2 {name}{' (PDL)' if runner.pdl else ''}: {o['prompts_equal']}/{len(rows)} prompts with ORT's "
              "greedy tokens "
              f"({o['tokens_before_divergence']} tokens before the first divergence); along ORT's path: top-1 "
              f"{o['forced_top1_agree']:.4f}, logit error max {o['forced_max_abs_logit_err']:.4f} "
              f"rms {o['forced_rms_logit_err']:.5f}", flush=True)
        del runner
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/triton_e2e.json")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", type=lambda v: v.split(","), default=list(VARIANTS),
                    help=f"runner rows to time, comma-separated (default all: {','.join(VARIANTS)}); the ratios "
                         "between rows are written where both ran")
    ap.add_argument("--profile", action="store_true",
                    help="also each row's kernels of a decode step, each timed alone (torch.profiler; plain launches, "
                         "no CUDA graph)")
    ap.add_argument("--hf-static", action="store_true", help="also HF with a static cache + torch.compile")
    ap.add_argument("--smollm2", default=None, help="exported SmolLM2 folder: greedy tokens vs ONNX Runtime")
    ap.add_argument("--skip-synthetic", action="store_true", help="only the SmolLM2 check (with --smollm2)")
    args = ap.parse_args()
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown --variants {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if not torch.cuda.is_available():
        sys.exit("triton_e2e: needs a CUDA GPU")
    import transformers
    import triton

    t0 = time.time()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "transformers": transformers.__version__, "python": platform.python_version()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():  # after every measurement: a run cut short keeps what it measured
        out.write_text(json.dumps(res, indent=2, default=lambda o: o.item() if isinstance(o, np.generic) else str(o)))

    if not args.skip_synthetic:
        res["llama_1b_random"] = bench_synthetic(args, save=lambda part: (res.update(llama_1b_random=part), save()))
        save()
    if args.smollm2:
        res["smollm2"] = bench_smollm2(args.smollm2, 32)
        save()
    if not args.skip_synthetic and "triton_int4_kv16" in res["llama_1b_random"]:
        syn = res["llama_1b_random"]
        res["targets"] = {"decode_speedup_vs_hf_fp16 (>= 2)": syn["triton_int4_kv16"]["speedup_vs_hf_fp16"],
                          "decode_tokens_per_s": syn["triton_int4_kv16"]["tokens_per_s"],
                          "hf_fp16_tokens_per_s": syn["hf_fp16"]["tokens_per_s"]}
        print(json.dumps(res["targets"], indent=2))
    res["seconds"] = round(time.time() - t0, 1)
    save()
    print(f"saved {out}")


if __name__ == "__main__":
    main()
