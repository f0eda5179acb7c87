"""The tuner's choice of configuration, with the GPU's timing replaced by a fake one (no GPU needed): it times a
CUDA-graph replay of each candidate when the launch can be captured, eager launches when it cannot, skips
candidates that fail, and keeps the fastest."""

import contextlib

import pytest
import torch

from qcompile.runtime.triton import _tune


class FakeCuda:
    """Stands in for torch.cuda's graph capture and triton's do_bench: a candidate "costs" cfg["us"], plus a launch
    gap when it is timed eagerly; capture fails for launches marked ``capturable=False``."""

    def __init__(self, monkeypatch, eager_gap):
        self.capturing = None
        self.timed = []
        self.eager_gap = eager_gap
        fake = self

        class Graph:
            def __init__(self):
                self.cfg = None

            def replay(self):
                fake.last = ("graph", self.cfg)

        @contextlib.contextmanager
        def graph(g):
            fake.capturing = g
            try:
                yield
            finally:
                fake.capturing = None

        def do_bench(fn, warmup, rep):
            fake.last = None
            fn()
            kind, cfg = fake.last
            fake.timed.append((kind, cfg["name"]))
            return cfg["us"] + (fake.eager_gap if kind == "eager" else 0.0)

        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "graph", graph)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
        monkeypatch.setattr("triton.testing.do_bench", do_bench)
        monkeypatch.setattr(_tune, "autotuning", lambda: True)

    def launch(self, cfg):
        if cfg.get("fails"):
            raise RuntimeError("out of shared memory")
        if self.capturing is not None:
            if not cfg.get("capturable", True):
                raise RuntimeError("operation not permitted when stream is capturing")
            self.capturing.cfg = cfg
        else:
            self.last = ("eager", cfg)


@pytest.fixture
def fake(monkeypatch, tmp_path):
    # picks go to a disk cache of this test's own, as from a GPU of this name
    monkeypatch.setattr(_tune, "DISK", _tune.TuningCache(tmp_path / "tuning"))
    monkeypatch.setattr(_tune, "_device_tag", lambda: "Fake GPU-sm90-132sms")
    monkeypatch.delenv("QCOMPILE_TUNE_CACHE", raising=False)
    return FakeCuda(monkeypatch, eager_gap=20.0)


def test_times_graph_replays_and_keeps_the_fastest(fake):
    cands = [dict(name="a", us=30.0), dict(name="b", us=12.0), dict(name="c", us=18.0)]
    tuner = _tune.Tuner("t")
    assert tuner.run("k", cands, fake.launch)["name"] == "b"
    assert tuner.best["k"]["name"] == "b"
    assert [kind for kind, _ in fake.timed] == ["graph"] * 3


def test_tuning_shows_progress_and_a_cached_pick_shows_none(fake, capsys):
    """A first tuning shows a progress bar on stderr (a model's first run on a GPU tunes for tens of seconds);
    a pick read back from the disk cache tunes nothing and shows nothing."""
    cands = [dict(name="a", us=30.0), dict(name="b", us=12.0)]
    assert _tune.Tuner("wq_gemv").run("k", cands, fake.launch)["name"] == "b"
    err = capsys.readouterr().err
    assert "tuning wq_gemv" in err and "/2" in err  # (of 2 candidates)
    assert _tune.Tuner("wq_gemv").run("k", cands, fake.launch)["name"] == "b"  # a new process: from disk
    assert "tuning" not in capsys.readouterr().err


def test_falls_back_to_eager_timing_and_skips_failing_configs(fake):
    # "b" cannot be captured: timed eagerly, its launch gap counts, so "c" (graph-timed) wins; "a" fails outright
    cands = [dict(name="a", us=1.0, fails=True), dict(name="b", us=12.0, capturable=False), dict(name="c", us=18.0)]
    tuner = _tune.Tuner("t")
    assert tuner.run("k", cands, fake.launch)["name"] == "c"
    assert fake.timed == [("eager", "b"), ("graph", "c")]


def test_candidates_timed_through_the_timing_launcher(fake):
    """``timing`` builds, once per tuning, the launcher the candidates are timed with (a chain, for PDL): the
    pick follows its costs, not those of ``launch``, which then runs the pick; a tuned key calls neither again."""
    built = []

    def timing():
        built.append(1)

        def chained(cfg):  # what a chain costs: "b" is the faster alone, "c" overlaps better
            fake.launch(dict(cfg, us={"b": 40.0, "c": 25.0}[cfg["name"]]))
        return chained

    launched = []
    tuner = _tune.Tuner("t")
    cands = [dict(name="b", us=12.0), dict(name="c", us=18.0)]
    assert tuner.run("k", cands, lambda cfg: launched.append(cfg["name"]), timing=timing)["name"] == "c"
    assert built == [1] and launched == ["c"]
    assert tuner.run("k", cands, lambda cfg: launched.append(cfg["name"]), timing=timing)["name"] == "c"
    assert built == [1] and launched == ["c", "c"]


def test_every_config_failing_is_an_error(fake):
    with pytest.raises(RuntimeError, match="every configuration failed"):
        _tune.Tuner("t").run("k", [dict(name=n, us=1.0, fails=True) for n in "ab"], fake.launch)


KEY = (1, 4096, 14336, 4, 128, torch.float16, None, "pdl")  # a key as the GEMV tuner builds it


def new_process(monkeypatch, root):
    """What a later process sees: an empty in-memory tuner and the disk cache read afresh."""
    monkeypatch.setattr(_tune, "DISK", _tune.TuningCache(root))
    return _tune.Tuner("t")


def test_picks_persist_on_disk_for_the_next_process(fake, monkeypatch, tmp_path):
    cands = [dict(name="a", us=30.0), dict(name="b", us=12.0), dict(name="c", us=18.0)]
    assert _tune.Tuner("t").run(KEY, cands, fake.launch)["name"] == "b"
    assert len(fake.timed) == 3
    files = list((tmp_path / "tuning").glob("*.json"))
    assert len(files) == 1 and files[0].name.startswith("Fake-GPU-sm90-132sms-triton")
    launched = []
    tuner = new_process(monkeypatch, tmp_path / "tuning")
    assert tuner.run(KEY, cands, lambda cfg: launched.append(cfg["name"]))["name"] == "b"
    assert len(fake.timed) == 3 and launched == ["b"] and tuner.best[KEY]["name"] == "b"  # not timed again
    # another key, or candidates that no longer hold the pick, are tuned
    assert new_process(monkeypatch, tmp_path / "tuning").run(KEY[:-1], cands, fake.launch)["name"] == "b"
    assert len(fake.timed) == 6
    assert new_process(monkeypatch, tmp_path / "tuning").run(KEY, cands[::2], fake.launch)["name"] == "c"
    assert len(fake.timed) == 8


def test_disk_cache_off_or_damaged_costs_a_tuning_not_the_run(fake, monkeypatch, tmp_path):
    cands = [dict(name="a", us=30.0), dict(name="b", us=12.0)]
    monkeypatch.setenv("QCOMPILE_TUNE_CACHE", "0")
    assert _tune.Tuner("t").run(KEY, cands, fake.launch)["name"] == "b"
    assert not (tmp_path / "tuning").exists()
    monkeypatch.delenv("QCOMPILE_TUNE_CACHE")
    _tune.Tuner("t").run(KEY, cands, fake.launch)
    (path,) = (tmp_path / "tuning").glob("*.json")
    path.write_text("{damaged")
    with pytest.warns(UserWarning, match="ignoring the kernel tuning cache"):
        assert new_process(monkeypatch, tmp_path / "tuning").run(KEY, cands, fake.launch)["name"] == "b"
    assert len(fake.timed) == 6  # tuned again, and the file rewritten whole
    assert new_process(monkeypatch, tmp_path / "tuning").run(KEY, cands, fake.launch)["name"] == "b"
    assert len(fake.timed) == 6
    # no GPU to name: the pick still holds in memory, with a warning instead of a failure

    def no_device():
        raise RuntimeError("Found no NVIDIA driver on your system")

    monkeypatch.setattr(_tune, "_device_tag", no_device)
    tuner = new_process(monkeypatch, tmp_path / "tuning")
    with pytest.warns(UserWarning, match="tuning cache"):
        assert tuner.run(KEY, cands, fake.launch)["name"] == "b"


def test_launch_opts_splits_meta_parameters_from_launch_options(monkeypatch):
    """num_warps, num_stages and a register cap (maxnreg) are launch options, never kernel arguments; under the
    interpreter, which takes none of them, only the meta-parameters remain."""
    cfg = dict(BLOCK_S=32, SPLITS=132, num_warps=1, num_stages=2, maxnreg=128, PDL=True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    meta, opts = _tune.launch_opts(cfg)
    assert meta == dict(BLOCK_S=32, SPLITS=132, PDL=True)
    assert opts == dict(num_warps=1, num_stages=2, maxnreg=128)
    assert "maxnreg" not in _tune.launch_opts(dict(BLOCK_S=32))[1]  # no cap unless a config names one
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _tune.launch_opts(cfg) == (dict(BLOCK_S=32, SPLITS=132, PDL=True), {})
