"""The qcompile command end to end on a tiny model: export, eval, run, and the errors a user sees."""

import json

import pytest

from qcompile.cli import main
from qcompile.errors import QCompileError

TEXT = ("The quick brown fox jumps over the lazy dog. " * 40 + "\n") * 10


@pytest.fixture()
def text_file(tmp_path):
    f = tmp_path / "text.txt"
    f.write_text(TEXT)
    return f


def _no_leftovers(parent):
    return not [p for p in parent.iterdir() if p.name.startswith(".")]


def test_export_eval_run(tmp_path, tiny_model_dirs, text_file, capsys):
    out = tmp_path / "w4"
    rc = main(["export", str(tiny_model_dirs["llama"]), "-o", str(out), "--recipe", "w4a16-g64-rtn",
               "--group-size", "16", "--eval", "--text", str(text_file), "--seq-len", "64", "--limit", "3"])
    assert rc == 0
    for name in ("model.onnx", "model.onnx_data", "config.json", "generation_config.json", "qcompile.json",
                 "report.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"]["name"] == "w4a16-g64-rtn"
    assert report["recipe"]["passes"][1]["group_size"] == 16
    assert report["quantization"]["linears_by_spec"] == {"int4 asym g16": 14}
    (key, ev), = report["eval"].items()
    assert ev["windows"] == 3 and ev["seq_len"] == 64 and ev["ppl"] > 1
    capsys.readouterr()

    assert main(["eval", str(out), "--text", str(text_file), "--seq-len", "64", "--limit", "2",
                 "--accuracy-level", "1"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["backend"] == "ort" and res["windows"] == 2 and res["accuracy_level"] == 1

    assert main(["eval", str(tiny_model_dirs["llama"]), "--backend", "torch", "--recipe", "w4a16-g64-rtn",
                 "--group-size", "16", "--text", str(text_file), "--seq-len", "64", "--limit", "2"]) == 0
    torch_res = json.loads(capsys.readouterr().out)
    assert abs(torch_res["ppl"] - res["ppl"]) / res["ppl"] < 1e-3  # same fake-quant model, same windows

    assert main(["run", str(out), "hello", "--max-new-tokens", "5"]) == 0
    assert main(["run", str(out), "hello", "--max-new-tokens", "5", "--sample", "--seed", "1"]) == 0
    assert _no_leftovers(tmp_path)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["export", "/no/such/model", "--recipe", "fp32"], "does not exist"),
        (["export", "{llama}", "--recipe", "w4a16-g64-rtn", "--bits", "0"], "bits must be an integer from 2 to 8"),
        (["export", "{llama}", "--recipe", "w4a16-g64-rtn", "--group-size", "48"], "does not divide in_features 64"),
        (["export", "{llama}", "--recipe", "w4a16-g64-rtn", "--set", "rtn.bitz=3"], "unknown field"),
        (["export", "{llama}", "--recipe", "nonsense"], "unknown recipe 'nonsense'"),
        (["eval", "{llama}", "--backend", "ort"], "not an exported folder"),
        (["run", "{llama}", "hi"], "not an exported folder"),
        (["export", "{llama}", "--recipe", "w4a16-g64-rtn", "--set", "rtn.bits=[4"], "not valid YAML"),
        (["export", "{llama}", "--recipe", "w4a16-g64-cqe", "--train-state", "{afile}"], "is a file"),
    ],
)
def test_bad_input_one_message_nonzero_exit_no_output(argv, message, tmp_path, tiny_model_dirs, capsys):
    out = tmp_path / "out"
    (tmp_path / "afile").write_text("x")
    argv = [a.replace("{llama}", str(tiny_model_dirs["llama"])).replace("{afile}", str(tmp_path / "afile"))
            for a in argv]
    if argv[0] == "export":
        argv += ["-o", str(out)]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    errors = [line for line in err.splitlines() if line.startswith("qcompile: error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err
    assert not out.exists() and _no_leftovers(tmp_path)


@pytest.mark.parametrize("change,message", [
    (lambda c: {**c, "num_hidden_layers": 1}, "config.json has no place for"),  # the checkpoint has 2 layers
    (lambda c: [c], "must hold a JSON object"),
])
def test_config_that_does_not_describe_the_checkpoint_is_refused(change, message, tiny_model_dirs, tmp_path, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dirs["llama"], model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(change(cfg)))
    assert main(["export", str(model), "-o", str(tmp_path / "o"), "--recipe", "fp32"]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_run_with_an_empty_prompt_is_refused(tiny_model_dirs, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["export", str(tiny_model_dirs["llama"]), "-o", str(out), "--recipe", "w4a16-g64-rtn"]) == 0
    capsys.readouterr()
    assert main(["run", str(out), "", "--raw"]) == 2
    assert "prompt is empty" in capsys.readouterr().err


def test_existing_output_needs_overwrite(tmp_path, tiny_model_dirs, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(tiny_model_dirs["llama"]), "-o", str(out), "--recipe", "fp32"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["export", str(tiny_model_dirs["llama"]), "-o", str(out), "--recipe", "fp32", "--overwrite"]) == 0
    assert (out / "model.onnx").is_file() and not (out / "keep.txt").exists()


def test_failure_during_export_leaves_nothing(tmp_path, tiny_model_dirs, monkeypatch):
    import qcompile.export.artifact as artifact

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(artifact, "write_artifact", boom)
    out = tmp_path / "out"
    args = ["export", str(tiny_model_dirs["llama"]), "-o", str(out), "--recipe", "fp32"]
    assert main(args) == 1  # an unexpected error: one line, exit 1 (test_unexpected_error_is_one_line)
    assert not out.exists() and _no_leftovers(tmp_path)
    monkeypatch.setenv("QCOMPILE_DEBUG", "1")  # the traceback, for debugging
    with pytest.raises(RuntimeError, match="disk full"):
        main(args)
    assert not out.exists() and _no_leftovers(tmp_path)


@pytest.mark.parametrize("value", ["0", "-64", "abc"])
def test_group_size_must_be_positive_or_none(value, capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", "smollm2-135m", "-o", "unused", "--recipe", "w4a16-g64-rtn", "--group-size", value])
    assert e.value.code == 2 and "group size" in capsys.readouterr().err


def test_unexpected_error_is_one_line(tmp_path, tiny_model_dirs, monkeypatch, capsys):
    """A failure with no message of its own still ends in one line naming it and exit 1, not a traceback."""
    import qcompile.export.artifact as artifact

    monkeypatch.setattr(artifact, "write_artifact", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    assert main(["export", str(tiny_model_dirs["llama"]), "-o", str(tmp_path / "o"), "--recipe", "fp32"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "qcompile: error: OSError: disk full" in err and "QCOMPILE_DEBUG" in err


@pytest.mark.parametrize("args", [["eval", "unused", "--seq-len", "0"], ["eval", "unused", "--limit", "-1"],
                                  ["run", "unused", "hi", "--max-new-tokens", "0"],
                                  ["run", "unused", "hi", "--temperature", "-1"],
                                  ["run", "unused", "hi", "--top-p", "5"], ["run", "unused", "hi", "--threads", "0"]])
def test_impossible_numbers_are_refused_before_any_work(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and "must be" in capsys.readouterr().err


@pytest.mark.parametrize("device,message", [("meta", "qcompile runs passes on cpu or cuda"),
                                            ("tpu", "is not a torch device")])
def test_unusable_device_is_refused_before_loading(tiny_model_dirs, tmp_path, capsys, device, message):
    out = tmp_path / "o"
    assert main(["export", str(tiny_model_dirs["llama"]), "-o", str(out), "--recipe", "fp32", "--device", device]) == 2
    assert message in capsys.readouterr().err and not out.exists()



def test_output_under_a_file_is_refused_before_loading(tiny_model_dirs, tmp_path, capsys, monkeypatch):
    import qcompile.pipeline as pipeline

    blocker = tmp_path / "afile"
    blocker.write_text("x")
    monkeypatch.setattr(pipeline, "load", lambda *a, **k: pytest.fail("loaded the model before checking the output"))
    assert main(["export", str(tiny_model_dirs["llama"]), "-o", str(blocker / "sub" / "out"), "--recipe", "fp32"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_overwrite_never_replaces_the_working_folder_or_the_input(tiny_model_dirs, tmp_path, capsys, monkeypatch):
    """--overwrite replaces the whole output folder: an empty path, the current folder (or one above it) and the
    model being read are refused before anything is loaded or written."""
    import shutil

    import qcompile.pipeline as pipeline

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dirs["llama"], model)
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    monkeypatch.setattr(pipeline, "load", lambda *a, **k: pytest.fail("loaded the model before checking the output"))
    for out, message in (("", "output path is empty"), (".", "current folder"), ("..", "current folder"),
                         (str(model), "would replace the input")):
        assert main(["export", str(model), "-o", out, "--recipe", "fp32", "--overwrite"]) == 2
        assert message in capsys.readouterr().err
    assert (work / "keep.txt").read_text() == "mine" and (model / "config.json").is_file()
    monkeypatch.undo()
    export = tmp_path / "export"
    assert main(["export", str(model), "-o", str(export), "--recipe", "w4a16-g64-rtn"]) == 0
    for out in (str(export), ""):  # a bundle folder over its own export
        assert main(["package", str(export), "-o", out, "--overwrite"]) == 2
    assert (export / "model.onnx").is_file()


def test_export_eval_with_a_missing_text_fails_before_writing(tiny_model_dirs, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["export", str(tiny_model_dirs["llama"]), "-o", str(out), "--recipe", "fp32", "--eval",
                 "--text", str(tmp_path / "missing.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("content, message", [(b"too short", "9 bytes, too few for one window of 64 tokens"),
                                              (b"\xff\xfe" * 64, "is not UTF-8 text")], ids=["short", "not-utf8"])
def test_export_eval_with_an_unusable_text_fails_before_writing(content, message, tiny_model_dirs, tmp_path,
                                                                  capsys):
    text, out = tmp_path / "t.txt", tmp_path / "o"
    text.write_bytes(content)
    assert main(["export", str(tiny_model_dirs["llama"]), "-o", str(out), "--recipe", "fp32", "--eval",
                 "--text", str(text), "--seq-len", "64"]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_export_eval_that_fails_after_the_export_says_the_export_stands(tiny_model_dirs, text_file, tmp_path,
                                                                          capsys, monkeypatch):
    """Enough bytes but too few tokens shows only once the export's tokenizer has read the text (the tiny models'
    byte tokenizer has one token per byte, so the evaluation's failure is stood in for here): the error says the
    export is complete and how to evaluate it, and the export stays."""
    import qcompile.cli as cli

    def too_few_tokens(out_dir, args):
        raise QCompileError("the text has 200 tokens, fewer than one window of 256")

    monkeypatch.setattr(cli, "_eval_export_dir", too_few_tokens)
    out = tmp_path / "o"
    assert main(["export", str(tiny_model_dirs["llama"]), "-o", str(out), "--recipe", "fp32", "--eval",
                 "--text", str(text_file), "--seq-len", "256"]) == 2
    err = capsys.readouterr().err
    assert f"the export in {out} is complete, but --eval failed: the text has 200 tokens" in err
    assert f"qcompile eval {out}`" in err and (out / "model.onnx").is_file()


def test_eval_and_report_leave_a_bundle_folder_as_shipped(tiny_model_dirs, text_file, tmp_path, capsys):
    """eval on a bundle folder prints its figures but writes nothing there; report refuses one (a bundle has no
    report.json) and names the exported folder instead."""
    export, bundle = tmp_path / "export", tmp_path / "bundle"
    assert main(["export", str(tiny_model_dirs["llama"]), "-o", str(export), "--recipe", "w4a16-g64-rtn",
                 "--group-size", "16"]) == 0
    assert main(["package", str(export), "-o", str(bundle)]) == 0
    before = sorted(p.name for p in bundle.iterdir())
    capsys.readouterr()
    assert main(["eval", str(bundle), "--text", str(text_file), "--seq-len", "64", "--limit", "1"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["windows"] == 1 and "left unchanged" in out.err
    assert main(["report", str(bundle)]) == 2
    assert "is a bundle" in capsys.readouterr().err
    assert sorted(p.name for p in bundle.iterdir()) == before


def test_an_opset_onnx_does_not_know_is_refused(capsys):
    assert main(["export", "smollm2-135m", "-o", "unused", "--recipe", "fp32", "--set", "export.opset=99"]) == 2
    assert "export.opset must be 21" in capsys.readouterr().err


@pytest.mark.parametrize("field", ["rtn.lm_head_bits=0", "rtn.lm_head_group_size=0"])
def test_lm_head_fields_of_zero_are_refused_not_taken_for_unset(field, tiny_model_dirs, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["export", str(tiny_model_dirs["llama"]), "-o", str(out), "--recipe", "w4a16-g64-rtn",
                 "--set", "rtn.quantize_lm_head=true", "--set", field]) == 2
    assert "lm_head:" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("command,damage", [
    *((c, ("qcompile.json", "[1, 2, 3]")) for c in ("eval", "run", "package", "inspect")),
    ("package", ("report.json", "{not json")),  # the one command that reads the report
])
def test_damaged_metadata_is_one_message(command, damage, tiny_model_dirs, tmp_path, capsys):
    """qcompile.json that is JSON but not an object, or a report.json that is not JSON: one message naming the
    file, exit 2, no output."""
    out = tmp_path / "o"
    assert main(["export", str(tiny_model_dirs["llama"]), "-o", str(out), "--recipe", "w4a16-g64-rtn"]) == 0
    name, text = damage
    (out / name).write_text(text)
    argv = {"eval": ["eval", str(out), "--limit", "1", "--seq-len", "32"], "run": ["run", str(out), "hi"],
            "package": ["package", str(out), "-o", str(tmp_path / "b")], "inspect": ["inspect", str(out)]}[command]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert name in err and "damaged" in err and "Traceback" not in err, err
    assert not (tmp_path / "b").exists()


def test_empty_graph_and_damaged_files_are_named_in_the_users_folder(tiny_model_dirs, tmp_path, capsys):
    """An empty model.onnx is an error for inspect and package (inspect printed an empty summary with exit 0), and
    package names the export's own files, not its temporary copy."""
    out = tmp_path / "o"
    assert main(["export", str(tiny_model_dirs["llama"]), "-o", str(out), "--recipe", "w4a16-g64-rtn"]) == 0
    (out / "config.json").write_text("{damaged")
    capsys.readouterr()
    assert main(["package", str(out), "-o", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert str(out / "config.json") in err and ".tmp-" not in err, err
    (out / "model.onnx").write_bytes(b"")
    for argv in (["inspect", str(out)], ["package", str(out), "-o", str(tmp_path / "b")]):
        assert main(argv) == 2
        assert "holds no graph" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("argv,message", [
    (["eval", "{llama}", "--backend", "torch", "--bits", "3"], "give one with --recipe"),
    (["eval", "{export}", "--recipe", "w4a16-g64-rtn"], "already quantized"),
    (["export", "{llama}", "-o", "{new}", "--recipe", "fp32", "--bits", "3"], "no pass of recipe 'fp32' takes it"),
    (["export", "{llama}", "-o", "{new}", "--recipe", "w4a16-g64-rtn", "--calib-samples", "4"], "--calib-samples"),
    (["run", "{export}", "hi", "--kv-bits", "4"], "--device cuda"),
    (["run", "{export}", "hi", "--pdl"], "--device cuda"),
    (["run", "{export}", "hi", "--no-pdl"], "--device cuda"),
    (["run", "{export}", "hi", "--mma-gemv"], "--device cuda"),
    (["run", "{export}", "hi", "--digit-gemv"], "--device cuda"),
    (["run", "{export}", "hi", "--max-new-tokens", "100000"], "exceed the model's"),
    (["package", "{export}", "-o", "{new}.zip", "--format", "tar.gz"], "make them agree"),
])
def test_options_that_would_change_nothing_are_refused(argv, message, tiny_model_dirs, tmp_path, capsys):
    """A flag the command would silently ignore (a quantization on an already quantized export, a weight flag on a
    recipe without weight quantization, the Triton KV cache on the CPU) is an error, not a surprise later."""
    export = tmp_path / "export"
    assert main(["export", str(tiny_model_dirs["llama"]), "-o", str(export), "--recipe", "w4a16-g64-rtn"]) == 0
    capsys.readouterr()
    subs = {"{llama}": str(tiny_model_dirs["llama"]), "{export}": str(export), "{new}": str(tmp_path / "new")}
    assert main([a.replace("{new}", subs["{new}"]) if a.startswith("{new}") else subs.get(a, a) for a in argv]) == 2
    assert message in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("new")]


def test_a_built_in_name_is_not_taken_for_a_folder_beside_it(tmp_path, monkeypatch):
    """Re-exporting the built-in model into a folder named after it is allowed: the name is not read from there
    (the same folder given as a path is, and is refused)."""
    import qcompile.pipeline as pipeline
    from qcompile.errors import QCompileError
    from qcompile.fsutil import check_output
    from qcompile.recipe import load_recipe

    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2-135m").mkdir()
    monkeypatch.setattr(pipeline, "load", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("past the check")))
    with pytest.raises(RuntimeError, match="past the check"):
        pipeline.compile_model("smollm2-135m", "smollm2-135m", load_recipe("fp32"), overwrite=True)
    with pytest.raises(QCompileError, match="would replace the input"):
        check_output("smollm2-135m", True, inputs=("smollm2-135m",))


def test_a_model_folder_without_tokenizer_is_refused_before_its_weights(tiny_model_dirs, tmp_path, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dirs["llama"], model)
    for f in model.glob("tokenizer*"):
        f.unlink()
    assert main(["export", str(model), "-o", str(tmp_path / "o"), "--recipe", "fp32"]) == 2
    assert "has no tokenizer" in capsys.readouterr().err and not (tmp_path / "o").exists()
