"""Our int4 bundle of SmolLM2-135M on onnxruntime-genai, side by side with genai's own model builder output.

For each of our exported folders (packaged here with `qcompile package`) and the builder's int4 CPU folder:
* greedy tokens: genai on our bundle vs our ORT runner (OrtCausalLM) on the same bundle, on chat prompts
  (token ids from transformers' tokenizer; genai's own tokenizer is checked separately, see tokenizer_agreement);
* decode speed, batch 1: a --prompt-len token prompt (WikiText-2 test text) appended, then --new-tokens greedy
  steps, all through genai (interleaved repeats, median); our runner on our bundle for reference. Each round
  times every graph once (the order alternating between rounds); the ratio to the builder is also taken per
  round (median, min, max), which cancels the load changes a shared machine has between rounds;
* WikiText-2 test perplexity on the first --windows windows of 2048 tokens, every graph through one plain ORT
  session code path (the sessions genai would create: same graph, same session options);
* sizes: bundle, graph + weights, vs the fp32 export and the builder's output.

The builder's input is the Hugging Face folder qcompile's loader caches from the GGUF. The builder in
onnxruntime-genai 0.18 imports classes that only transformers 5.x has, so it runs from its own virtual
environment (--builder-python); it is only run when --builder-out does not exist yet.

    python bench/genai_edge.py out/bench/w4a16-g64-rtn --fp32 out/bench/fp32 \\
        --builder-out out/genai_edge/builder-int4 --builder-python /tmp/genai-builder-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import onnxruntime as ort  # noqa: E402
import onnxruntime_genai as og  # noqa: E402

from qcompile.bundle import package  # noqa: E402
from qcompile.bundle.genai import greedy_tokens  # noqa: E402
from qcompile.runtime.ort import OrtCausalLM  # noqa: E402

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a CPU does.",
    "List three fruits that are red.",
]


def folder_bytes(folder: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern) if p.is_file())


def hf_folder() -> Path:
    """The Hugging Face folder qcompile's loader converts the built-in GGUF into (cached)."""
    from qcompile.models.loader import BUILTIN_MODELS, gguf_to_folder, resolve_builtin, sha256_file

    gguf = resolve_builtin(next(iter(BUILTIN_MODELS)))
    return gguf_to_folder(gguf, sha256_file(gguf))


def build_with_builder(out: Path, python: str) -> dict:
    cmd = [python, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_folder()), "-o", str(out),
           "-p", "int4", "-e", "cpu", "-c", str(out.parent / "builder-cache")]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return {"command": " ".join(cmd), "seconds": round(time.perf_counter() - t0, 1)}


def genai_timed(model: og.Model, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, seconds for new_tokens decode steps). genai runs the model for a token at the start of the
    next generate_next_token call, so the first call only picks the prompt's next token; the timed calls after it
    are one forward pass each. No eos can stop it: min_length covers the whole run."""
    params = og.GeneratorParams(model)
    total = len(prompt) + new_tokens + 1
    params.set_search_options(max_length=total, min_length=total, do_sample=False)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(prompt)
    gen.generate_next_token()
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        gen.generate_next_token()
    return t1 - t0, time.perf_counter() - t1


def ours_timed(runner: OrtCausalLM, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """The same measurement with our numpy-fed runner (as bench/decode_speed.py does)."""
    ids = np.array([prompt], np.int64)
    t0 = time.perf_counter()
    logits, past = runner.forward(ids)
    t1 = time.perf_counter()
    length = ids.shape[1]
    for _ in range(new_tokens):
        nxt = np.array([[int(logits[0, -1].argmax())]], np.int64)
        length += 1
        logits, past = runner.forward(nxt, np.ones((1, length), np.int64), np.array([[length - 1]], np.int64), past)
    return t1 - t0, time.perf_counter() - t1


class GraphLogits:
    """Full-sequence logits of any decoder-with-past graph described by a genai_config.json: one ORT session
    with the config's session options, an empty past (the builder's cache dims are symbolic in the graph)."""

    def __init__(self, folder: Path):
        cfg = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
        opts = ort.SessionOptions()
        for key, value in cfg["session_options"].items():
            if isinstance(value, str) and key != "log_id":
                opts.add_session_config_entry(key, value)
        self.session = ort.InferenceSession(str(folder / cfg["filename"]), opts, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.cfg = cfg

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        batch, seq = ids.shape
        feed = {"input_ids": ids.astype(np.int64)}
        if "attention_mask" in self.inputs:
            feed["attention_mask"] = np.ones((batch, seq), np.int64)
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.arange(seq, dtype=np.int64)[None].repeat(batch, 0)
        empty = np.zeros((batch, self.cfg["num_key_value_heads"], 0, self.cfg["head_size"]), np.float32)
        for i in range(self.cfg["num_hidden_layers"]):
            feed[f"past_key_values.{i}.key"] = feed[f"past_key_values.{i}.value"] = empty
        return self.session.run(["logits"], feed)[0]


def perplexity(logits_fn: GraphLogits, windows: np.ndarray) -> dict:
    """Mean token NLL over the windows, as qcompile.eval.perplexity computes it."""
    import torch

    from qcompile.eval.perplexity import perplexity as qc_perplexity

    return qc_perplexity(lambda ids: torch.from_numpy(logits_fn(ids.numpy())), torch.from_numpy(windows),
                         desc="ppl")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ours", nargs="+", help="our exported folders (int4), each packaged into a bundle here")
    ap.add_argument("--fp32", required=True, help="our fp32 export (size reference)")
    ap.add_argument("--builder-out", required=True, help="onnxruntime-genai builder output (built if missing)")
    ap.add_argument("--builder-python", default=sys.executable, help="python with onnxruntime-genai + transformers 5")
    ap.add_argument("--work", default="out/genai_edge", help="where the bundles are written")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--greedy-tokens", type=int, default=32)
    ap.add_argument("--windows", type=int, default=8, help="WikiText-2 test windows of 2048 tokens for ppl")
    ap.add_argument("--out", default="bench/results/genai_edge.json")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from qcompile.data import resolve_text, token_stream, windows

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    builder = Path(args.builder_out)
    builder_info = {"command": "(existing folder)"}
    if not (builder / "genai_config.json").is_file():
        builder_info = build_with_builder(builder, args.builder_python)

    bundles = {}
    for folder in map(Path, args.ours):
        b = work / f"bundle-{folder.name}"
        t0 = time.perf_counter()
        package(folder, b, overwrite=True)
        bundles[f"qcompile {folder.name}"] = (folder, b, round(time.perf_counter() - t0, 2))
    tok = AutoTokenizer.from_pretrained(next(iter(bundles.values()))[1])
    text = resolve_text(None, "test")
    stream = token_stream(text, tok)
    prompt = stream[: args.prompt_len].tolist()
    wins = windows(stream, 2048, args.windows).numpy()
    result: dict = {
        "command": " ".join(["python"] + sys.argv),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "onnxruntime": ort.__version__,
                    "onnxruntime_genai": og.__version__, "load_average_at_start": os.getloadavg()},
        "settings": {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
                     "ppl_windows": int(wins.shape[0]), "ppl_seq_len": 2048, "ppl_text": text.name},
        "builder": builder_info,
        "graphs": {},
    }

    # greedy tokens: genai on each bundle vs our runner on the same bundle
    chats = []
    for q in QUESTIONS:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
        chats.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    models = {label: og.Model(str(b)) for label, (_, b, _) in bundles.items()}
    models["genai builder int4"] = og.Model(str(builder))
    runners = {label: OrtCausalLM.from_dir(b) for label, (_, b, _) in bundles.items()}
    for label, (folder, b, seconds) in bundles.items():
        same = []
        for ids in chats:
            ours = runners[label].generate(ids, args.greedy_tokens, eos_token_id=tok.eos_token_id)
            same.append(greedy_tokens(models[label], ids, args.greedy_tokens) == ours)
        manifest = json.loads((b / "manifest.json").read_text())
        result["graphs"][label] = {
            "export": str(folder), "bundle": str(b), "package_seconds": seconds,
            "greedy_identical_genai_vs_ours": f"{sum(same)}/{len(same)}",
            "session_options": manifest["runtime"]["session_options"],
        }
    result["graphs"]["genai builder int4"] = {"export": str(builder)}
    builder_vs_ours = []
    first = next(iter(bundles))
    for ids in chats:
        builder_vs_ours.append(greedy_tokens(models["genai builder int4"], ids, args.greedy_tokens)
                               == greedy_tokens(models[first], ids, args.greedy_tokens))
    result["greedy_identical_builder_vs_" + first.replace(" ", "_")] = f"{sum(builder_vs_ours)}/{len(chats)}"

    gtok = og.Tokenizer(models[first])
    agree = [[int(t) for t in gtok.encode(q)] == tok(q, add_special_tokens=False)["input_ids"] for q in QUESTIONS]
    result["tokenizer_agreement_genai_vs_transformers"] = f"{sum(agree)}/{len(agree)}"

    # decode speed, interleaved
    timers = {label: (lambda m=m: genai_timed(m, prompt, args.new_tokens)) for label, m in models.items()}
    for label, runner in runners.items():
        timers[f"{label} (qcompile runner)"] = lambda r=runner: ours_timed(r, prompt, args.new_tokens)
    for fn in timers.values():  # warm-up
        fn()
    samples = {label: ([], []) for label in timers}
    order = list(timers)
    for r in range(args.repeats):
        # every round times every graph once; the order alternates so that a drift in the machine's load within
        # a round does not always favour the same graph
        for label in order if r % 2 == 0 else order[::-1]:
            p, d = timers[label]()
            samples[label][0].append(p)
            samples[label][1].append(d)
    speed = {}
    builder_decode = samples["genai builder int4"][1]
    for label, (pre, dec) in samples.items():
        # per-round ratio: this graph against the builder timed in the same round (the noise they share cancels)
        ratios = [b / d for d, b in zip(dec, builder_decode)]
        speed[label] = {"decode_tokens_per_s": args.new_tokens / statistics.median(dec),
                        "prefill_tokens_per_s": args.prompt_len / statistics.median(pre),
                        "decode_tokens_per_s_per_round": [args.new_tokens / d for d in dec],
                        "decode_vs_builder_per_round": {"median": statistics.median(ratios), "min": min(ratios),
                                                        "max": max(ratios), "rounds": ratios}}
    ref = speed["genai builder int4"]["decode_tokens_per_s"]
    for label, s in speed.items():
        s["decode_vs_builder"] = s["decode_tokens_per_s"] / ref
    result["speed"] = speed

    # sizes
    folders = {label: b for label, (_, b, _) in bundles.items()} | {"genai builder int4": builder,
                                                                     "fp32 export": Path(args.fp32)}
    fp32_model = folder_bytes(Path(args.fp32), "model.onnx*")
    sizes = {}
    for label, f in folders.items():
        model_bytes = folder_bytes(f, "model.onnx*")
        sizes[label] = {"folder_bytes": folder_bytes(f), "model_bytes": model_bytes,
                        "model_vs_fp32": model_bytes / fp32_model}
    result["sizes"] = sizes

    # perplexity, the same code path for every graph
    ppl = {}
    for label, f in folders.items():
        if label == "fp32 export":
            continue
        res = perplexity(GraphLogits(f), wins)
        ppl[label] = {"ppl": res["ppl"], "windows": res["windows"], "seconds": round(res["seconds"], 1)}
    result["ppl"] = ppl

    for label in folders:
        s, z, p = speed.get(label, {}), sizes[label], ppl.get(label, {})
        rounds = s.get("decode_vs_builder_per_round", {})
        print(f"{label:36s} decode {s.get('decode_tokens_per_s', math.nan):6.1f} tok/s "
              f"(x{s.get('decode_vs_builder', math.nan):.2f} builder; per round median "
              f"{rounds.get('median', math.nan):.2f} [{rounds.get('min', math.nan):.2f}, "
              f"{rounds.get('max', math.nan):.2f}])  prefill "
              f"{s.get('prefill_tokens_per_s', math.nan):6.1f} tok/s  ppl {p.get('ppl', math.nan):7.3f}  "
              f"model {z['model_bytes'] / 1e6:6.1f} MB  folder {z['folder_bytes'] / 1e6:6.1f} MB")
    for label in runners:
        s = speed[f"{label} (qcompile runner)"]
        print(f"{label + ' (qcompile runner)':36s} decode {s['decode_tokens_per_s']:6.1f} tok/s  "
              f"prefill {s['prefill_tokens_per_s']:6.1f} tok/s")
    print(json.dumps({k: v for k, v in result.items() if k.startswith(("greedy", "tokenizer"))}, indent=2))
    print({label: g.get("greedy_identical_genai_vs_ours") for label, g in result["graphs"].items()})
    result["machine"]["load_average_at_end"] = os.getloadavg()  # the CPU is shared: context for the speeds
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
