"""Bundles: `qcompile package`, the checks `qcompile run` makes before loading one, safe archive extraction,
`qcompile inspect`, and onnxruntime-genai generating from a bundle as it is."""

import io
import json
import stat
import tarfile
import zipfile

import onnx
import pytest

from qcompile.bundle import genai_config, package, verify
from qcompile.bundle.genai import greedy_tokens, tokenizer_note
from qcompile.cli import main
from qcompile.errors import QCompileError
from qcompile.runtime.ort import OrtCausalLM

PROMPTS = [[1, 7, 80, 90, 33, 250, 12, 5], [1, 40, 41, 42], [1] + list(range(100, 140))]


def _export(src, out, *extra):
    assert main(["export", str(src), "-o", str(out), "--recipe", "w4a16-g64-rtn", "--group-size", "16",
                 *extra]) == 0
    return out


@pytest.fixture(scope="module")
def exported(tiny_model_dirs, tmp_path_factory):
    return _export(tiny_model_dirs["llama"], tmp_path_factory.mktemp("export") / "w4")


@pytest.fixture(scope="module")
def bundle(exported, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "b"
    package(exported, out)
    return out


def _copy_bundle(bundle, tmp_path):
    import shutil

    dest = tmp_path / "copy"
    shutil.copytree(bundle, dest)
    return dest


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("qcompile: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def _hidden(parent):
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_package_writes_manifest_and_genai_config(exported, bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    meta = json.loads((exported / "qcompile.json").read_text())
    assert manifest["format"] == "qcompile-bundle" and manifest["recipe"]["name"] == "w4a16-g64-rtn"
    assert manifest["source"]["sha256"] == meta["source"]["sha256"] and len(meta["source"]["sha256"]) == 64
    assert manifest["runtime"]["session_options"] == {"session.qdq_matmulnbits_accuracy_level": "4"}
    assert manifest["runtime"]["onnxruntime"]["min_version"] == "1.19.0"
    expected = {"model.onnx", "model.onnx_data", "config.json", "generation_config.json", "qcompile.json",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                "genai_config.json"}
    assert set(manifest["files"]) == expected
    assert sorted(p.name for p in bundle.iterdir()) == sorted(expected | {"manifest.json"})
    for name in expected - {"genai_config.json"}:  # byte-for-byte copies of the export
        assert (bundle / name).read_bytes() == (exported / name).read_bytes(), name
    data = manifest["files"]["model.onnx_data"]
    assert data["bytes"] == (bundle / "model.onnx_data").stat().st_size > 0 and len(data["sha256"]) == 64

    cfg = json.loads((bundle / "genai_config.json").read_text())
    dec = cfg["model"]["decoder"]
    assert cfg["model"]["type"] == "llama" and cfg["model"]["eos_token_id"] == 2 and cfg["model"]["vocab_size"] == 320
    assert (dec["num_hidden_layers"], dec["num_key_value_heads"], dec["head_size"]) == (2, 2, 16)
    graph = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    graph_inputs = {i.name for i in graph.graph.input}
    assert {dec["inputs"]["input_ids"], dec["inputs"]["attention_mask"], dec["inputs"]["position_ids"]} <= graph_inputs
    assert dec["inputs"]["past_key_names"] % 1 in graph_inputs
    assert dec["session_options"]["session.qdq_matmulnbits_accuracy_level"] == "4"
    assert cfg["search"]["past_present_share_buffer"] is False
    assert verify(bundle) == manifest


def test_genai_config_refuses_a_graph_genai_cannot_feed(exported):
    graph = onnx.load(str(exported / "model.onnx"), load_external_data=False)
    graph.graph.input.append(onnx.helper.make_tensor_value_info("token_type_ids", onnx.TensorProto.INT64, [1, 1]))
    with pytest.raises(QCompileError, match="cannot feed: token_type_ids"):
        genai_config(exported, graph)
    graph = onnx.load(str(exported / "model.onnx"), load_external_data=False)
    del graph.graph.output[1]  # present.0.key
    with pytest.raises(QCompileError, match="lacks present.0.key"):
        genai_config(exported, graph)


@pytest.mark.parametrize("suffix", ["", ".zip", ".tar.gz"])
def test_run_bundle_round_trip(exported, tmp_path, capsys, suffix):
    out = tmp_path / f"b{suffix}"
    assert main(["package", str(exported), "-o", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["files"] == 10 and summary["bytes"] > 0
    assert out.is_dir() if not suffix else out.is_file()
    if suffix == ".zip":
        assert zipfile.ZipFile(out).namelist()[0] == "chat_template.jinja"
    assert main(["run", str(exported), "hello", "--max-new-tokens", "6"]) == 0
    reference = capsys.readouterr().out
    assert main(["run", str(out), "hello", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == reference
    assert _hidden(tmp_path) == []


def test_archives_are_deterministic(exported, tmp_path):
    for fmt in ("zip", "tar.gz"):
        a, b = tmp_path / f"a.{fmt}", tmp_path / f"b.{fmt}"
        package(exported, a)
        package(exported, b)
        assert a.read_bytes() == b.read_bytes(), fmt


@pytest.mark.parametrize(
    "damage, message",
    [
        ("flip", "model.onnx_data does not match its sha256 in manifest.json (altered or corrupted)"),
        ("truncate", "model.onnx_data has"),
        ("delete", "incomplete: model.onnx_data is missing"),
        ("delete_tokenizer", "incomplete: tokenizer.json is missing"),
        ("delete_manifest", "incomplete: manifest.json is missing"),
        ("bad_manifest", "unreadable manifest.json"),
    ],
)
def test_damaged_bundle_is_refused(bundle, tmp_path, capsys, damage, message):
    b = _copy_bundle(bundle, tmp_path)
    data = b / "model.onnx_data"
    if damage == "flip":
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0x01  # one bit of one weight byte
        data.write_bytes(bytes(raw))
    elif damage == "truncate":
        data.write_bytes(data.read_bytes()[:-100])
    elif damage == "delete":
        data.unlink()
    elif damage == "delete_tokenizer":
        (b / "tokenizer.json").unlink()
    elif damage == "delete_manifest":
        (b / "manifest.json").unlink()
    elif damage == "bad_manifest":
        (b / "manifest.json").write_text("{not json")
    assert main(["run", str(b), "hello", "--max-new-tokens", "2"]) == 2
    line = _one_error(capsys)
    assert message in line, line
    if damage == "truncate":
        assert "truncated or altered" in line
    assert capsys.readouterr().out == ""  # nothing was generated


def test_tampered_archive_is_refused(bundle, tmp_path, capsys):
    b = _copy_bundle(bundle, tmp_path)
    raw = bytearray((b / "model.onnx_data").read_bytes())
    raw[-1] ^= 0xFF
    (b / "model.onnx_data").write_bytes(bytes(raw))
    archive = tmp_path / "t.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for p in sorted(b.iterdir()):
            tf.add(p, arcname=p.name)
    assert main(["run", str(archive), "hello"]) == 2
    message = _one_error(capsys)
    assert "model.onnx_data does not match its sha256" in message
    assert f"bundle archive {archive} is damaged" in message and "qcompile-bundle-" not in message  # not the tmp


def test_bundle_needing_newer_onnxruntime_is_refused(bundle, tmp_path, capsys):
    b = _copy_bundle(bundle, tmp_path)
    manifest = json.loads((b / "manifest.json").read_text())
    manifest["runtime"]["onnxruntime"]["min_version"] = "99.0.0"
    (b / "manifest.json").write_text(json.dumps(manifest))
    assert main(["run", str(b), "hello"]) == 2
    assert "needs onnxruntime >= 99.0.0" in _one_error(capsys)


def _zip_with(path, name, data=b"x", symlink=False):
    with zipfile.ZipFile(path, "w") as zf:
        info = zipfile.ZipInfo(name)
        if symlink:
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, data)
        zf.writestr("manifest.json", "{}")


def _tar_with(path, name, kind="file", link="/etc/passwd"):
    with tarfile.open(path, "w:gz") as tf:
        info = tarfile.TarInfo(name)
        if kind == "file":
            info.size = 1
            tf.addfile(info, io.BytesIO(b"x"))
        else:
            info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
            info.linkname = link
            tf.addfile(info)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: _zip_with(p / "evil.zip", "../evil.txt"), "escapes the extraction folder ('../evil.txt')"),
        (lambda p: _zip_with(p / "evil.zip", "a/../../evil.txt"), "escapes the extraction folder"),
        (lambda p: _zip_with(p / "evil.zip", "/tmp/evil.txt"), "absolute path ('/tmp/evil.txt')"),
        (lambda p: _zip_with(p / "evil.zip", "link", b"/etc/passwd", symlink=True), "symbolic link ('link')"),
        (lambda p: _tar_with(p / "evil.tar.gz", "../evil.txt"), "escapes the extraction folder ('../evil.txt')"),
        (lambda p: _tar_with(p / "evil.tar.gz", "/tmp/evil.txt"), "absolute path ('/tmp/evil.txt')"),
        (lambda p: _tar_with(p / "evil.tar.gz", "model.onnx", "symlink"), "has a link ('model.onnx' -> '/etc/passwd')"),
        (lambda p: _tar_with(p / "evil.tar.gz", "model.onnx", "hardlink"), "has a link"),
    ],
)
def test_unsafe_archive_is_refused(tmp_path, capsys, make, message):
    (tmp_path / "in").mkdir()
    make(tmp_path / "in")
    archive = next((tmp_path / "in").iterdir())
    assert main(["run", str(archive), "hello"]) == 2
    line = _one_error(capsys)
    assert message in line and "refusing to extract it" in line, line
    assert not (tmp_path / "evil.txt").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_corrupt_archive_is_refused(tmp_path, capsys):
    bad = tmp_path / "b.zip"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    assert main(["run", str(bad), "hello"]) == 2
    assert "cannot read archive" in _one_error(capsys)


@pytest.mark.parametrize("suffix", ["", ".zip"])
def test_interrupted_package_leaves_nothing(exported, tmp_path, monkeypatch, capsys, suffix):
    import qcompile.bundle.pack as pkg

    real = pkg._copy_hashed
    calls = []

    def interrupted(src, dest):
        calls.append(src.name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(src, dest)

    monkeypatch.setattr(pkg, "_copy_hashed", interrupted)
    out = tmp_path / f"b{suffix}"
    assert main(["package", str(exported), "-o", str(out)]) == 130
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(exported, tmp_path, capsys):
    out = tmp_path / "b.zip"
    out.write_bytes(b"old")
    assert main(["package", str(exported), "-o", str(out)]) == 2
    assert "already exists" in _one_error(capsys) and out.read_bytes() == b"old"
    assert main(["package", str(exported), "-o", str(out), "--overwrite"]) == 0
    assert zipfile.is_zipfile(out) and _hidden(tmp_path) == []
    assert main(["package", str(tmp_path / "nothing"), "-o", str(tmp_path / "x")]) == 2
    assert "not an exported folder" in _one_error(capsys)


def test_inspect_text_and_json(exported, bundle, tmp_path, capsys):
    assert main(["inspect", str(bundle), "--verify"]) == 0
    text = capsys.readouterr().out
    for needle in ("(bundle)", "recipe        w4a16-g64-rtn", "session.qdq_matmulnbits_accuracy_level=4",
                   "needs         onnxruntime >= 1.19.0", "checksums     all files match manifest.json",
                   "DequantizeLinear 14", "quantized weights (14): 14 uint4 g16 asym",
                   "layers 0-1     7 x uint4 g16 asym", "uint4 weights", "zero points", "model.onnx_data"):
        assert needle in text, (needle, text)

    assert main(["inspect", str(bundle), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    weights = info["graph"]["quantized_weights"]
    assert len(weights) == 14 and {(w["type"], w["bits"], w["group_size"], w["zero_point"]) for w in weights} == {
        ("uint4", 4, 16, True)}
    q = next(w for w in weights if w["name"].startswith("model.layers.0.self_attn.q_proj"))
    assert q["shape"] == [64, 64] and q["bytes"] == 64 * 64 // 2 and q["consumer"] == "MatMul"
    kinds = info["graph"]["bytes_by_kind"]
    assert kinds["uint4 weights"] == sum(w["bytes"] for w in weights)
    assert sum(kinds.values()) == (bundle / "model.onnx_data").stat().st_size
    assert info["graph"]["ops"]["DequantizeLinear"] == 14 and info["graph"]["kv_cache_layers"] == 2

    archive = tmp_path / "b.tar.gz"
    package(exported, archive)
    assert main(["inspect", str(archive), "--json"]) == 0
    from_archive = json.loads(capsys.readouterr().out)
    assert from_archive["kind"] == "bundle archive" and from_archive["graph"] == info["graph"]
    assert main(["inspect", str(exported)]) == 0
    assert "(exported folder)" in capsys.readouterr().out

    b = _copy_bundle(bundle, tmp_path)
    (b / "config.json").write_text("{}")
    assert main(["inspect", str(b), "--verify"]) == 2
    assert "config.json has" in _one_error(capsys)


def test_inspect_refuses_a_folder_without_its_weights(exported, tmp_path, capsys):
    import shutil

    src = tmp_path / "partial"
    shutil.copytree(exported, src)
    (src / "model.onnx_data").unlink()
    assert main(["inspect", str(src)]) == 2
    assert "model.onnx_data are missing" in _one_error(capsys)
    shutil.copy(exported / "model.onnx_data", src / "model.onnx_data")
    with open(src / "model.onnx_data", "r+b") as f:
        f.truncate(100)
    assert main(["inspect", str(src)]) == 2
    assert "is truncated (100 bytes" in _one_error(capsys)
    (src / "model.onnx").write_bytes((src / "model.onnx").read_bytes()[:50])  # the graph itself cut short
    assert main(["inspect", str(src)]) == 2
    assert "cannot read model.onnx in" in _one_error(capsys)


def test_tokenizer_note(bundle, tmp_path):
    assert tokenizer_note(bundle) is None  # the tiny byte tokenizer declares no byte fallback
    tok = json.loads((bundle / "tokenizer.json").read_text())
    tok["model"]["byte_fallback"] = True
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    assert "byte_fallback=true" in tokenizer_note(tmp_path)


def test_gguf_style_tokenizer_is_fixed_for_genai(bundle, tmp_path):
    """transformers' GGUF conversion writes byte_fallback=true and a SentencePiece decoder chain into a byte-level
    BPE; the loader's fix clears both, after which transformers encodes/decodes as before and genai agrees."""
    og = pytest.importorskip("onnxruntime_genai")
    from transformers import AutoTokenizer

    from qcompile.models.loader import fix_byte_level_tokenizer_json

    b = _copy_bundle(bundle, tmp_path)
    text = "Hello, bundle world! Ünïcödé and 42 tabs\t."
    before = AutoTokenizer.from_pretrained(bundle)
    tok = json.loads((b / "tokenizer.json").read_text())
    byte_level = tok["decoder"]
    tok["model"]["byte_fallback"] = True
    tok["decoder"] = {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}, byte_level]}
    (b / "tokenizer.json").write_text(json.dumps(tok))
    assert tokenizer_note(b) is not None
    assert fix_byte_level_tokenizer_json(b / "tokenizer.json") is True
    assert fix_byte_level_tokenizer_json(b / "tokenizer.json") is False  # idempotent
    assert tokenizer_note(b) is None
    after = AutoTokenizer.from_pretrained(b)
    ids = before(text)["input_ids"]
    assert after(text)["input_ids"] == ids and after.decode(ids) == before.decode(ids)
    assert [int(t) for t in og.Tokenizer(og.Model(str(b))).encode(text)] == ids


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_onnxruntime_genai_generates_our_greedy_tokens(tiny_model_dirs, tmp_path, family):
    og = pytest.importorskip("onnxruntime_genai")
    b = tmp_path / "b"
    package(_export(tiny_model_dirs[family], tmp_path / "w4"), b)
    ours = OrtCausalLM.from_dir(b)  # the accuracy level from qcompile.json; genai gets it from genai_config.json
    for prompt in PROMPTS:
        expected = ours.generate(prompt, 24, eos_token_id=2)  # genai stops at eos too, and includes it
        assert greedy_tokens(og.Model(str(b)), prompt, 24) == expected, (family, prompt)

    from transformers import AutoTokenizer

    tok = og.Tokenizer(og.Model(str(b)))
    text = "Hello, bundle world!"
    assert [int(t) for t in tok.encode(text)] == AutoTokenizer.from_pretrained(b)(text)["input_ids"]


@pytest.mark.parametrize(("family", "fuse"), [("llama", False), ("qwen3", False), ("llama", True), ("qwen2", True)])
def test_genai_shares_the_cache_buffer_of_a_gqa_export(tiny_model_dirs, tmp_path, family, fuse):
    """export.attention=gqa: genai_config turns past_present_share_buffer on (GroupQueryAttention writes into the
    max-length cache in place) and genai's greedy tokens are still our runner's; also with fused projections
    (q|k|v packed into GroupQueryAttention, what the genai recipes export)."""
    og = pytest.importorskip("onnxruntime_genai")
    b = tmp_path / "b"
    package(_export(tiny_model_dirs[family], tmp_path / "w4", "--set", "export.attention=gqa", "--set",
                    f"export.fuse_projections={str(fuse).lower()}"), b)
    assert json.loads((b / "genai_config.json").read_text())["search"]["past_present_share_buffer"] is True
    ours = OrtCausalLM.from_dir(b)
    for prompt in PROMPTS:
        assert greedy_tokens(og.Model(str(b)), prompt, 24) == ours.generate(prompt, 24, eos_token_id=2), prompt


@pytest.mark.slow
def test_smollm2_bundle_runs_in_onnxruntime_genai(tmp_path):
    """The real model: an RTN int4 bundle (zip) verified, extracted and run by genai with our greedy tokens."""
    og = pytest.importorskip("onnxruntime_genai")
    from transformers import AutoTokenizer

    from qcompile.bundle import inspect, opened

    out = tmp_path / "w4"
    assert main(["export", "smollm2-135m", "-o", str(out), "--recipe", "w4a16-g64-rtn"]) == 0
    archive = tmp_path / "smollm2-w4.zip"
    manifest = package(out, archive)
    assert manifest["runtime"]["onnxruntime_genai"]["tokenizer_note"] is None  # the loader fixed tokenizer.json
    assert manifest["files"]["model.onnx_data"]["bytes"] < 0.35 * 538e6
    with opened(archive) as b:
        tok = AutoTokenizer.from_pretrained(b)
        ours = OrtCausalLM.from_dir(b)
        for question in ("What is the capital of France?", "Name three colours."):
            ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                          tokenize=True)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            expected = ours.generate(ids, 16, eos_token_id=tok.eos_token_id)
            assert greedy_tokens(og.Model(str(b)), ids, 16) == expected, question
            prompt = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                             tokenize=False)
            assert [int(t) for t in og.Tokenizer(og.Model(str(b))).encode(prompt)] == ids, question
        info = inspect(b)
    weights = info["graph"]["quantized_weights"]
    assert len(weights) == 210 and {(w["type"], w["group_size"]) for w in weights} == {("uint4", 64)}
    assert info["graph"]["bytes_by_kind"]["float embeddings (shared with lm_head)"] == 49152 * 576 * 4


def test_package_refuses_a_truncated_weights_file(exported, tmp_path, capsys):
    import shutil

    src = tmp_path / "short"
    shutil.copytree(exported, src)
    data = src / "model.onnx_data"
    data.write_bytes(data.read_bytes()[:-100])
    out = tmp_path / "b"
    assert main(["package", str(src), "-o", str(out)]) == 2
    assert "model.onnx_data is truncated" in _one_error(capsys) and not out.exists()


@pytest.mark.parametrize("command", ["run", "eval"])
def test_damaged_graph_gives_one_error(exported, tmp_path, capsys, command):
    import shutil

    src = tmp_path / "damaged"
    shutil.copytree(exported, src)
    (src / "model.onnx").write_bytes((src / "model.onnx").read_bytes()[:500])
    args = [command, str(src), "hello"] if command == "run" else [command, str(src), "--limit", "1"]
    assert main(args) == 2
    assert "ONNX Runtime cannot load" in _one_error(capsys)


@pytest.mark.parametrize("damage,message", [("qcompile.json", "is damaged (not valid JSON"),
                                            ("tokenizer", "cannot load the tokenizer")])
def test_damaged_export_metadata_gives_one_error(exported, tmp_path, capsys, damage, message):
    import shutil

    src = tmp_path / "damaged"
    shutil.copytree(exported, src)
    if damage == "tokenizer":
        for p in src.iterdir():
            if p.name.startswith(("tokenizer", "special_tokens")):
                p.unlink()
    else:
        (src / damage).write_text("{not json")
    assert main(["run", str(src), "hello"]) == 2
    assert message in _one_error(capsys)
