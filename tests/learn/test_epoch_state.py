"""Where an epoch-wise training state lives: one file per configuration, the old single file used when it fits."""

import warnings

import pytest
import torch

from qcompile.learn import epoch_state


def _save(path, key):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"fingerprint": key, "epoch": 1, "params": [torch.ones(4)], "optimizer": {}}, path)


def test_each_configuration_has_its_own_file(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fresh folder: nothing to say
        assert epoch_state.state_path(tmp_path, "e2e_state", "00aa") == tmp_path / "e2e_state-00aa.pt"
    _save(tmp_path / "e2e_state-00aa.pt", "00aa")
    with pytest.warns(UserWarning, match=r"other settings \(e2e_state-00aa.pt\).* into e2e_state-11bb.pt"):
        assert epoch_state.state_path(tmp_path, "e2e_state", "11bb") == tmp_path / "e2e_state-11bb.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # its own file: resumed without a word
        assert epoch_state.state_path(tmp_path, "e2e_state", "00aa") == tmp_path / "e2e_state-00aa.pt"


def test_a_state_under_the_old_name_is_used_only_when_it_fits(tmp_path):
    legacy = tmp_path / "state.pt"
    _save(legacy, "00aa")
    before = legacy.read_bytes()
    assert epoch_state.state_path(tmp_path, "state", "00aa") == legacy
    with pytest.warns(UserWarning, match=r"other settings \(state.pt\)"):
        assert epoch_state.state_path(tmp_path, "state", "11bb") == tmp_path / "state-11bb.pt"
    assert legacy.read_bytes() == before
    legacy.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="cannot read the training state .*state.pt"):
        assert epoch_state.state_path(tmp_path, "state", "00aa") == tmp_path / "state-00aa.pt"
