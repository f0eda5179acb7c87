"""Quantize SmolLM2-135M-Instruct to int4 with the Python API, then chat with it through Optimum.

    python examples/quantize_with_api.py                 # under a minute on 2 CPU cores
    python examples/quantize_with_api.py --method gptq   # GPTQ on 16 calibration windows: about 9 minutes

Round-to-nearest needs no calibration data, so the default run is quick; GPTQ gives lower perplexity (see
docs/BENCHMARKS.md). The folder also gets the HTML report (report/report.html).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import onnxruntime as ort
from optimum.onnxruntime import ORTModelForCausalLM
from transformers import AutoTokenizer

from qcompile import QCompileConfig, QCompileQuantizer


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="Hugging Face folder, .gguf file or built-in name")
    ap.add_argument("--out", default="out/smollm2-w4-api", help="output folder")
    ap.add_argument("--method", default="rtn", choices=["rtn", "gptq"])
    ap.add_argument("--prompt", default="What is the capital of France?")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)

    # the same as the built-in recipe w4a16-g64-rtn (or -gptq): int4 asymmetric weights in groups of 64
    extra = {"calib_samples": 16} if args.method == "gptq" else {}
    config = QCompileConfig(method=args.method, bits=4, group_size=64, symmetric=False, **extra)
    quantizer = QCompileQuantizer.from_pretrained(args.model)
    save_dir = quantizer.quantize(save_dir=args.out, config=config, overwrite=args.overwrite, report=True)
    print(f"exported to {save_dir}; report: {save_dir / 'report' / 'report.html'}")

    # Optimum does not read qcompile.json: hand it the session options the recipe chose (MatMulNBits accuracy level)
    options = ort.SessionOptions()
    for key, value in json.loads((Path(save_dir) / "qcompile.json").read_text())["ort_session_options"].items():
        options.add_session_config_entry(key, value)
    model = ORTModelForCausalLM.from_pretrained(save_dir, session_options=options)
    tokenizer = AutoTokenizer.from_pretrained(save_dir)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    output = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=48,
                            do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"{args.prompt}\n→ {answer}")
    return answer


if __name__ == "__main__":
    main()
