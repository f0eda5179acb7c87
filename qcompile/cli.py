"""`qcompile` command line: export, eval, run, recipes.

Errors the user can fix print one line (``qcompile: error: ...``) and exit with status 2; nothing half-written
is left behind (outputs are written to a temporary folder and renamed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from qcompile.errors import QCompileError

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "bfloat16": "bfloat16"}


def _torch_dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


def _add_recipe_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--recipe", required=required, help="built-in recipe name (see `qcompile recipes`) or a YAML/JSON file")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="PASS.FIELD=VALUE",
                   help="override one recipe field, e.g. --set gptq.act_order=false (repeatable)")
    p.add_argument("--bits", type=int, default=..., help="weight bits (2-8) for every weight quantizer")
    p.add_argument("--group-size", type=lambda s: None if s in ("none", "null", "0") else int(s), default=...,
                   help="group size along the input dimension; 'none' for per-channel")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="symmetric", action="store_const", const=True, default=...)
    sym.add_argument("--asym", dest="symmetric", action="store_const", const=False)
    p.add_argument("--calib-text", default=..., help="calibration text file (default: WikiText-2 validation split)")
    p.add_argument("--calib-samples", type=int, default=..., help="number of calibration windows")


def _recipe_from_args(args):
    from qcompile.recipe import apply_overrides, load_recipe

    recipe = load_recipe(args.recipe)
    return apply_overrides(recipe, args.sets, bits=args.bits, group_size=args.group_size, symmetric=args.symmetric,
                           calib_text=args.calib_text, calib_samples=args.calib_samples)


def _is_export_dir(path: str) -> bool:
    return (Path(path) / "model.onnx").is_file()


def cmd_export(args) -> int:
    from qcompile.pipeline import compile_model, update_report

    recipe = _recipe_from_args(args)
    print(f"qcompile: {args.model} -> {args.output} with recipe {recipe.name!r}", file=sys.stderr)
    result = compile_model(args.model, args.output, recipe, device=args.device, dtype=_torch_dtype(args.dtype),
                           overwrite=args.overwrite, trust_remote_code=args.trust_remote_code)
    files = result.report["files"]
    print(json.dumps({"output": str(result.out_dir), "files": files}, indent=2))
    if args.eval:
        res = _eval_export_dir(str(result.out_dir), args)
        update_report(result.out_dir, "eval", {res.pop("key"): res})
    return 0


def _eval_windows(args, tokenizer):
    from qcompile.data import resolve_text, token_stream, windows

    text = resolve_text(args.text, "test")
    return text, windows(token_stream(text, tokenizer), args.seq_len, args.limit)


def _eval_export_dir(out_dir: str, args) -> dict:
    from transformers import AutoTokenizer

    from qcompile.eval.perplexity import ort_logits_fn, perplexity
    from qcompile.runtime.ort import OrtCausalLM

    runner = OrtCausalLM.from_dir(out_dir, accuracy_level=args.accuracy_level, threads=args.threads)
    tok = AutoTokenizer.from_pretrained(out_dir)
    text, wins = _eval_windows(args, tok)
    res = perplexity(ort_logits_fn(runner), wins, desc="ppl (ort)")
    res.update(backend="ort", text=str(text), accuracy_level=runner.accuracy_level)
    res["key"] = f"ort:{Path(text).name}:{res['windows']}x{res['seq_len']}:acc{runner.accuracy_level}"
    print(json.dumps({k: v for k, v in res.items() if k != "key"}, indent=2))
    return res


def cmd_eval(args) -> int:
    from qcompile.pipeline import update_report

    if args.backend == "ort":
        if not _is_export_dir(args.target):
            raise QCompileError(f"{args.target} is not an exported folder (no model.onnx); run `qcompile export` "
                                "first or use --backend torch")
        res = _eval_export_dir(args.target, args)
        update_report(args.target, "eval", {res.pop("key"): res})
        return 0
    import torch

    from qcompile.eval.perplexity import perplexity, torch_logits_fn
    from qcompile.models import load
    from qcompile.pipeline import run_passes

    if _is_export_dir(args.target):
        raise QCompileError("--backend torch evaluates a model (folder, GGUF or built-in name) with an optional "
                            "--recipe applied as fake-quant; for an exported folder use --backend ort")
    recipe = _recipe_from_args(args) if args.recipe else None
    handle = load(args.target, dtype=_torch_dtype(args.dtype), device=args.device,
                  trust_remote_code=args.trust_remote_code)
    if recipe is not None:
        run_passes(handle, recipe)
    text, wins = _eval_windows(args, handle.tokenizer)
    with torch.inference_mode():
        res = perplexity(torch_logits_fn(handle.model), wins, desc="ppl (torch)")
    res.update(backend="torch", text=str(text), recipe=recipe.name if recipe else None, dtype=args.dtype)
    print(json.dumps(res, indent=2))
    return 0


def cmd_run(args) -> int:
    from transformers import AutoTokenizer

    from qcompile.runtime.ort import OrtCausalLM

    if not _is_export_dir(args.model_dir):
        raise QCompileError(f"{args.model_dir} is not an exported folder (no model.onnx); run `qcompile export` first")
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    runner = OrtCausalLM.from_dir(args.model_dir, accuracy_level=args.accuracy_level, threads=args.threads)
    if tok.chat_template and not args.raw:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
    else:
        ids = tok(args.prompt, add_special_tokens=True)["input_ids"]
    printed, generated = "", []

    def on_token(token_id: int) -> None:
        nonlocal printed
        generated.append(token_id)
        text = tok.decode(generated, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for complete UTF-8 characters
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text

    runner.generate(list(ids), args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                    top_p=args.top_p, seed=args.seed, eos_token_id=tok.eos_token_id, on_token=on_token)
    sys.stdout.write("\n")
    return 0


def cmd_recipes(args) -> int:
    from qcompile.recipe import builtin_recipes, load_recipe

    for name in builtin_recipes():
        print(f"{name:24s} {load_recipe(name).description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qcompile", description="Compile a Hugging Face causal LM into a quantized ONNX graph.")
    ap.add_argument("--version", action="version", version=f"qcompile {__import__('qcompile').__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    def common_model(p):
        p.add_argument("--device", default="cpu", help="torch device for passes/eval (cpu, cuda)")
        p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="torch dtype for passes/eval")
        p.add_argument("--trust-remote-code", action="store_true", help="allow code shipped with the model (off by default)")

    def common_ort(p):
        p.add_argument("--accuracy-level", type=int, default=None, choices=[0, 1, 2, 3, 4],
                       help="ORT MatMulNBits accuracy level (default: the exported recipe's)")
        p.add_argument("--threads", type=int, default=None, help="ORT intra-op threads")

    def common_eval(p):
        p.add_argument("--text", default=None, help="text file (default: WikiText-2 test split)")
        p.add_argument("--seq-len", type=int, default=2048)
        p.add_argument("--limit", type=int, default=None, help="evaluate only the first N windows")

    p = sub.add_parser("export", help="quantize a model and write an ONNX folder")
    p.add_argument("model", help="Hugging Face folder, .gguf file, or built-in name (smollm2-135m)")
    p.add_argument("-o", "--output", required=True, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--eval", action="store_true", help="measure perplexity through ORT after export")
    _add_recipe_args(p, required=True)
    common_model(p)
    common_ort(p)
    common_eval(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("eval", help="WikiText-2 perplexity of an exported folder (ort) or a model (torch)")
    p.add_argument("target", help="exported folder (--backend ort) or model (--backend torch)")
    p.add_argument("--backend", choices=["torch", "ort"], default="ort")
    _add_recipe_args(p, required=False)
    common_model(p)
    common_ort(p)
    common_eval(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("run", help="generate text from an exported folder (streamed)")
    p.add_argument("model_dir")
    p.add_argument("prompt")
    p.add_argument("--system", default=None, help="system prompt (chat template)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=None)
    common_ort(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("recipes", help="list the built-in recipes")
    p.set_defaults(func=cmd_recipes)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except QCompileError as e:
        print(f"qcompile: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qcompile: interrupted; no output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
