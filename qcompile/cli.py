"""`qcompile` command line: export, eval, run, package, inspect, report, recipes.

Errors the user can fix print one line (``qcompile: error: ...``) and exit with status 2; nothing half-written
is left behind (outputs are written to a temporary folder and renamed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from qcompile.errors import QCompileError, first_line
from qcompile.fsutil import read_json

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "bfloat16": "bfloat16"}


def _torch_dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


def _positive(convert, noun: str, hint: str = ""):
    """An argparse type: ``convert(text)`` (int or float), which must be above 0; ``hint`` ends both errors."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}{hint}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {value}{hint}")
        return value

    return parse


_positive_int = _positive(int, "an integer")
_temperature = _positive(float, "a number")
_group_size_value = _positive(int, "an integer", " (a group size: a positive integer, or 'none' for per-channel)")


def _group_size(text: str) -> int | None:
    return None if text in ("none", "null") else _group_size_value(text)


def _top_p(text: str) -> float:
    value = _temperature(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _export_tokenizer(folder):
    """The tokenizer an export or bundle carries (a clear error where its files are missing or damaged)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        raise QCompileError(f"cannot load the tokenizer in {folder} (are its tokenizer files missing? re-export "
                            f"it): {first_line(e)}") from None


def _check_device(device: str) -> None:
    """The torch device of --device, before any model is read: a clear error for one this machine lacks."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise QCompileError(f"--device {device!r} is not a torch device (use cpu or cuda)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QCompileError(f"--device {device}: no CUDA GPU is available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise QCompileError(f"--device {device}: qcompile runs passes on cpu or cuda")


def _add_recipe_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--recipe", required=required,
                   help="built-in recipe name (see `qcompile recipes`) or a YAML/JSON file")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="PASS.FIELD=VALUE",
                   help="override one recipe field, e.g. --set gptq.act_order=false (repeatable)")
    p.add_argument("--bits", type=int, default=..., help="weight bits (2-8) for every weight quantizer")
    p.add_argument("--group-size", type=_group_size, default=...,
                   help="group size along the input dimension; 'none' for per-channel")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="symmetric", action="store_const", const=True, default=...)
    sym.add_argument("--asym", dest="symmetric", action="store_const", const=False)
    p.add_argument("--calib-text", default=..., help="calibration text file (default: WikiText-2 validation split)")
    p.add_argument("--calib-samples", type=int, default=..., help="number of calibration windows")
    p.add_argument("--train-state", default=None, metavar="DIR",
                   help="learned passes (lwc/lsi/sde, dlqat, bisup, spinquant) save their trained state here and "
                        "resume from it")
    p.add_argument("--kv-prefix", type=int, default=None, metavar="P",
                   help="keep the first P KV-cache positions (a system prompt) in float; recipes with kv_quant")


def _recipe_options_given(args) -> list[str]:
    """The recipe flags on the command line (they change a recipe, so they mean nothing without one)."""
    flags = {"--set": args.sets, "--bits": args.bits is not ..., "--group-size": args.group_size is not ...,
             "--sym/--asym": args.symmetric is not ..., "--calib-text": args.calib_text is not ...,
             "--calib-samples": args.calib_samples is not ..., "--train-state": args.train_state is not None,
             "--kv-prefix": getattr(args, "kv_prefix", None) is not None}
    return [flag for flag, given in flags.items() if given]


def _recipe_from_args(args):
    from qcompile.recipe import apply_overrides, load_recipe

    recipe = load_recipe(args.recipe)
    sets = list(args.sets)
    kv_prefix = getattr(args, "kv_prefix", None)
    if kv_prefix is not None:
        if not any(step.name == "kv_quant" for step in recipe.passes):
            raise QCompileError(f"--kv-prefix needs a recipe that quantizes the KV cache (kv_quant); "
                                f"{recipe.name!r} has none")
        sets.append(f"kv_quant.prefix={kv_prefix}")
    state = getattr(args, "train_state", None)
    if state and Path(state).expanduser().exists() and not Path(state).expanduser().is_dir():
        raise QCompileError(f"--train-state {state} is a file; it must be a folder (created when missing)")
    return apply_overrides(recipe, sets, strict=True, bits=args.bits, group_size=args.group_size,
                           symmetric=args.symmetric, calib_text=args.calib_text, calib_samples=args.calib_samples,
                           state_dir=state or ...)


def _is_export_dir(path: str) -> bool:
    return (Path(path) / "model.onnx").is_file()


def _is_bundle_dir(path: str) -> bool:
    """A folder made by ``qcompile package`` (its files are listed and hashed in a manifest)."""
    from qcompile.bundle.pack import MANIFEST_FILE

    return (Path(path) / MANIFEST_FILE).is_file()


def cmd_export(args) -> int:
    from qcompile.pipeline import compile_model, update_report

    recipe = _recipe_from_args(args)
    _check_device(args.device)
    if args.eval:  # the evaluation text is found and checked before the export is written, not after
        from qcompile.data import precheck_text, resolve_text

        precheck_text(resolve_text(args.text, "test"), args.seq_len)
    if args.report:
        from qcompile.eval.report import require_matplotlib

        require_matplotlib()
    print(f"qcompile: {args.model} -> {args.output} with recipe {recipe.name!r}", file=sys.stderr)
    result = compile_model(args.model, args.output, recipe, device=args.device, dtype=_torch_dtype(args.dtype),
                           overwrite=args.overwrite, trust_remote_code=args.trust_remote_code)
    files = result.report["files"]
    print(json.dumps({"output": str(result.out_dir), "files": files}, indent=2))
    if args.eval:
        try:
            res = _eval_export_dir(str(result.out_dir), args)
        except Exception as e:  # e.g. a text of enough bytes but too few tokens: the export itself stands
            skipped = " (and --report was not written)" if args.report else ""
            raise QCompileError(f"the export in {result.out_dir} is complete, but --eval failed{skipped}: "
                                f"{first_line(e)}; evaluate it with `qcompile eval {result.out_dir}` and the "
                                "options that fit") from None
        update_report(result.out_dir, "eval", {res.pop("key"): res})
    if args.report:
        from qcompile.eval.report import write_report

        print(f"qcompile: report: {write_report(result.out_dir)}", file=sys.stderr)
    return 0


def _eval_windows(args, tokenizer):
    from qcompile.data import resolve_text, token_stream, windows

    text = resolve_text(args.text, "test")
    return text, windows(token_stream(text, tokenizer), args.seq_len, args.limit)


def _system_prefix(args, tokenizer):
    """Token ids of ``--system-prompt`` as a chat-templated system turn, or None."""
    from qcompile.data import system_prompt_ids

    return system_prompt_ids(tokenizer, args.system_prompt) if getattr(args, "system_prompt", None) else None


def _eval_export_dir(out_dir: str, args) -> dict:
    from qcompile.eval.perplexity import ort_logits_fn, perplexity
    from qcompile.runtime.ort import OrtCausalLM

    runner = OrtCausalLM.from_dir(out_dir, accuracy_level=args.accuracy_level, threads=args.threads)
    tok = _export_tokenizer(out_dir)
    text, wins = _eval_windows(args, tok)
    prefix = _system_prefix(args, tok)
    res = perplexity(ort_logits_fn(runner), wins, desc="ppl (ort)", prefix=prefix)
    res.update(backend="ort", text=str(text), accuracy_level=runner.accuracy_level)
    res["key"] = f"ort:{Path(text).name}:{res['windows']}x{res['seq_len']}:acc{runner.accuracy_level}"
    if prefix is not None:
        res["key"] += f":system{prefix.numel()}"
    print(json.dumps({k: v for k, v in res.items() if k != "key"}, indent=2))
    return res


def cmd_eval(args) -> int:
    from qcompile.pipeline import update_report

    given = _recipe_options_given(args)
    if args.backend == "ort" and not _is_export_dir(args.target):
        raise QCompileError(f"{args.target} is not an exported folder (no model.onnx); run `qcompile export` "
                            "first or use --backend torch")
    if args.backend == "ort" and (given or args.recipe):
        raise QCompileError(f"{', '.join((['--recipe'] if args.recipe else []) + given)}: an exported folder is "
                            "already quantized; to evaluate a recipe, export with it, or use --backend torch on the "
                            "model")
    if given and not args.recipe:
        raise QCompileError(f"{', '.join(given)} change a recipe: give one with --recipe")
    if args.backend == "ort":
        res = _eval_export_dir(args.target, args)
        if _is_bundle_dir(args.target):  # a packaged bundle stays as it was shipped
            print(f"qcompile: {args.target} is a bundle: left unchanged, the figures above are not stored",
                  file=sys.stderr)
        else:
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
    _check_device(args.device)
    handle = load(args.target, dtype=_torch_dtype(args.dtype), device=args.device,
                  trust_remote_code=args.trust_remote_code)
    if recipe is not None:
        run_passes(handle, recipe)
    text, wins = _eval_windows(args, handle.tokenizer)
    with torch.inference_mode():
        res = perplexity(torch_logits_fn(handle.model), wins, desc="ppl (torch)",
                         prefix=_system_prefix(args, handle.tokenizer))
    res.update(backend="torch", text=str(text), recipe=recipe.name if recipe else None, dtype=args.dtype)
    print(json.dumps(res, indent=2))
    return 0


def cmd_run(args) -> int:
    from qcompile.bundle import opened

    with opened(args.model_dir) as model_dir:  # a bundle is verified (and an archive extracted) first
        return _run_folder(str(model_dir), args)


def _run_folder(model_dir: str, args) -> int:
    from qcompile.runtime.ort import OrtCausalLM

    if not _is_export_dir(model_dir):
        raise QCompileError(f"{args.model_dir} is not an exported folder or bundle (no model.onnx); run "
                            "`qcompile export` first")
    if args.kv_bits not in (None, 16) and args.device != "cuda":
        raise QCompileError("--kv-bits sets the Triton runtime's KV cache (--device cuda); on the CPU, ONNX Runtime "
                            "runs the KV cache the graph was exported with")
    if args.pdl is not None and args.device != "cuda":
        raise QCompileError("--pdl / --no-pdl set how the Triton runtime launches its kernels (--device cuda); ONNX "
                            "Runtime on the CPU has no such launches")
    for flag, on in (("--mma-gemv", args.mma_gemv), ("--digit-gemv", args.digit_gemv)):
        if on and args.device != "cuda":
            raise QCompileError(f"{flag} picks the Triton runtime's int4 GEMV (--device cuda); ONNX Runtime on the "
                                "CPU runs its own")
    tok = _export_tokenizer(model_dir)
    if args.device == "cuda":  # qcompile's Triton kernels (qcompile/runtime/triton); ONNX Runtime otherwise
        from qcompile.runtime.triton.runner import TritonCausalLM, system_prefix_length

        runner = TritonCausalLM.from_dir(model_dir, kv_bits=args.kv_bits, pdl=args.pdl, mma_gemv=args.mma_gemv,
                                         digit_gemv=args.digit_gemv)
    else:
        runner = OrtCausalLM.from_dir(model_dir, accuracy_level=args.accuracy_level, threads=args.threads)
    if tok.chat_template and not args.raw:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
    else:
        ids = tok(args.prompt, add_special_tokens=True)["input_ids"]
    if not len(ids):
        raise QCompileError("the prompt is empty (no tokens to start from); give some text")
    cfg = read_json(Path(model_dir) / "config.json")
    positions = cfg.get("max_position_embeddings")
    scaling = cfg.get("rope_scaling")
    if isinstance(positions, int) and isinstance(scaling, dict) and isinstance(scaling.get("factor"), (int, float)):
        # RoPE scaling (YaRN, linear) extends the context; some configs keep the unscaled length here
        base = scaling.get("original_max_position_embeddings")
        positions = max(positions, int((base if isinstance(base, int) else positions) * scaling["factor"]))
    if isinstance(positions, int) and len(ids) + args.max_new_tokens > positions:
        raise QCompileError(f"{len(ids)} prompt + {args.max_new_tokens} new tokens exceed the model's {positions} "
                            "positions (max_position_embeddings); lower --max-new-tokens")
    printed, generated = "", []

    def on_token(token_id: int) -> None:
        nonlocal printed
        generated.append(token_id)
        text = tok.decode(generated, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for complete UTF-8 characters
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text

    _note_kv_prefix(model_dir, tok, args)
    extra = {}
    if args.device == "cuda" and args.system and not args.raw:  # BiSup: the system turn's KV cache stays float
        extra["float_prefix"] = system_prefix_length(tok, args.system, list(ids))
    runner.generate(list(ids), args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                    top_p=args.top_p, seed=args.seed, eos_token_id=tok.eos_token_id, on_token=on_token, **extra)
    sys.stdout.write("\n")
    return 0


def _note_kv_prefix(model_dir: str, tok, args) -> None:
    """The float KV prefix is fixed at export (it is in the graph); say when the system turn does not fit in it."""
    meta_path = Path(model_dir) / "qcompile.json"
    kv = read_json(meta_path).get("runtime_quantization", {}).get("kv_cache")
    if not kv or not args.system or args.raw or not tok.chat_template:
        return
    ids = tok.apply_chat_template([{"role": "system", "content": args.system}], tokenize=True)
    n = len(ids["input_ids"] if hasattr(ids, "keys") else ids)
    if n > kv["prefix"]:
        print(f"qcompile: note: the system turn takes {n} tokens; the KV cache keeps only its first {kv['prefix']} "
              f"positions in float (export with --kv-prefix {n} to keep all of it)", file=sys.stderr)


def cmd_package(args) -> int:
    from qcompile.bundle import package

    manifest = package(args.model_dir, args.output, fmt=args.format, overwrite=args.overwrite)
    note = manifest["runtime"]["onnxruntime_genai"].get("tokenizer_note")
    if note:
        print(f"qcompile: warning: {note}", file=sys.stderr)
    files = manifest["files"]
    print(json.dumps({"bundle": str(Path(args.output).expanduser().resolve()), "files": len(files),
                      "bytes": sum(f["bytes"] for f in files.values())}, indent=2))
    return 0


def cmd_inspect(args) -> int:
    from qcompile.bundle import format_text, inspect

    info = inspect(args.path, check=args.verify)
    print(json.dumps(info, indent=2, default=str) if args.json else format_text(info))
    return 0


def cmd_report(args) -> int:
    from qcompile.eval.report import write_report

    if _is_bundle_dir(args.out_dir):
        raise QCompileError(f"{args.out_dir} is a bundle (it has a manifest): it is left as it was shipped and has "
                            "no report.json; run `qcompile report` on the exported folder it was packaged from")
    print(write_report(args.out_dir, args.compare))
    return 0


def cmd_recipes(args) -> int:
    from qcompile.recipe import builtin_recipes, load_recipe

    for name in builtin_recipes():
        print(f"{name:24s} {load_recipe(name).description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qcompile",
                                 description="Compile a Hugging Face causal LM into a quantized ONNX graph.")
    ap.add_argument("--version", action="version", version=f"qcompile {__import__('qcompile').__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    def common_model(p):
        p.add_argument("--device", default="cpu", help="torch device for passes/eval (cpu, cuda)")
        p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="torch dtype for passes/eval")
        p.add_argument("--trust-remote-code", action="store_true",
                       help="allow code shipped with the model (off by default)")

    def common_ort(p):
        p.add_argument("--accuracy-level", type=int, default=None, choices=[0, 1, 2, 3, 4],
                       help="ORT MatMulNBits accuracy level (default: the exported recipe's)")
        p.add_argument("--threads", type=_positive_int, default=None, help="ORT intra-op threads")

    def common_eval(p):
        p.add_argument("--text", default=None, help="text file (default: WikiText-2 test split)")
        p.add_argument("--seq-len", type=_positive_int, default=2048)
        p.add_argument("--limit", type=_positive_int, default=None, help="evaluate only the first N windows")
        p.add_argument("--system-prompt", default=None, metavar="TEXT",
                       help="read every window after this system turn (chat template); only the text is scored")

    p = sub.add_parser("export", help="quantize a model and write an ONNX folder")
    p.add_argument("model", help="Hugging Face folder, .gguf file, or built-in name (smollm2-135m)")
    p.add_argument("-o", "--output", required=True, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output (only once the new one is complete)")
    p.add_argument("--eval", action="store_true", help="measure perplexity through ORT after export")
    p.add_argument("--report", action="store_true", help="write OUT/report/ (HTML + PNG figures) after export/eval")
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

    p = sub.add_parser("run", help="generate text from an exported folder or a bundle (streamed)")
    p.add_argument("model_dir")
    p.add_argument("prompt")
    p.add_argument("--system", default=None, help="system prompt (chat template)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--max-new-tokens", type=_positive_int, default=128)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=_temperature, default=0.7)
    p.add_argument("--top-p", type=_top_p, default=0.9)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cpu: ONNX Runtime; cuda: qcompile's Triton kernels on an NVIDIA GPU")
    p.add_argument("--kv-bits", type=int, choices=[16, 8, 4], default=None,
                   help="KV cache bits with --device cuda (the system prompt's keys/values stay float); default: the "
                        "graph's own (16 unless the recipe quantizes the KV cache, whose layout it fixes)")
    p.add_argument("--pdl", action=argparse.BooleanOptionalAction, default=None,
                   help="with --device cuda: launch the decode step's kernels as programmatic dependent launches, "
                        "each overlapping the end of the one before (5.9-14.7 %% faster decode in four H100 runs; "
                        "the first run's kernel tuning takes longer, later runs read it from the tuning cache). "
                        "Default: on where the GPU supports it (sm_90+, Hopper); --no-pdl for plain launches")
    p.add_argument("--mma-gemv", action="store_true",
                   help="with --device cuda on sm_90+: also keep int4 weights (groups of 64 or 128) in the tensor-core "
                        "GEMV's layout, twice their int4 memory; the decode's GEMV tuner keeps whichever kernel is "
                        "faster per shape")
    p.add_argument("--digit-gemv", action="store_true",
                   help="with --device cuda on sm_90+: the decode's q|k|v, o and gate|up GEMVs run the exact int4 "
                        "GEMV on the int8 tensor cores (gemv_digits), reading digit planes that the RMSNorm or the "
                        "attention before them writes; for int4 weights in groups of 128 with 512, 1024, 2048 or "
                        "4096 inputs, kept a second time in its layout")
    common_ort(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("package", help="pack an exported folder into a bundle (folder, .zip or .tar.gz) with "
                       "genai_config.json and a checksummed manifest.json")
    p.add_argument("model_dir", help="exported folder")
    p.add_argument("-o", "--output", required=True, help="bundle folder or archive (written atomically)")
    p.add_argument("--format", choices=["dir", "zip", "tar.gz"], default=None,
                   help="default: from the output name (.zip, .tar.gz/.tgz), else a folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output (only once the new one is complete)")
    p.set_defaults(func=cmd_package)

    p = sub.add_parser("inspect", help="show what an exported folder or bundle holds, without running it")
    p.add_argument("path", help="exported folder, bundle folder, or .zip/.tar.gz bundle")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.add_argument("--verify", action="store_true", help="also check a bundle folder's checksums")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("report", help="HTML report with figures (perplexity, per-layer error, sizes, speed)")
    p.add_argument("out_dir", help="exported folder; the report goes to OUT/report/")
    p.add_argument("compare", nargs="*", help="other exported folders to compare with (e.g. the fp32 export)")
    p.set_defaults(func=cmd_report)

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
        print("qcompile: interrupted; no partial output was left", file=sys.stderr)
        return 130
    except Exception as e:  # a failure without its own message: one line, not a traceback (unless debugging)
        if os.environ.get("QCOMPILE_DEBUG"):
            raise
        first = first_line(e) if str(e).strip() else ""
        print(f"qcompile: error: {type(e).__name__}{': ' + first if first else ''} (no partial output was left; "
              "set QCOMPILE_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
