"""Model folders in the Hugging Face layout: one file or shards with the standard index, round trips, and
clear errors for incomplete folders."""

import json
import os

import pytest
import torch

from tokenflow_ext.models import _folder
from tokenflow_ext.models._checkpoint import CheckpointError

pytest.importorskip("safetensors")


def state():
    torch.manual_seed(0)
    return {"a.weight": torch.randn(64, 32), "a.bias": torch.randn(64), "b.weight": torch.randn(128, 64),
            "steps": torch.tensor(3)}


def test_single_file_round_trip(tmp_path):
    _folder.save_folder(tmp_path, state(), {"name": "x"})
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    loaded, config = _folder.load_folder(tmp_path)
    assert config == {"name": "x"} and loaded.keys() == state().keys()
    assert all(torch.equal(loaded[k], v) for k, v in state().items())


def test_sharded_round_trip_with_the_standard_index(tmp_path):
    _folder.save_folder(tmp_path, state(), {"name": "x"}, max_shard_bytes=128 * 64 * 4 + 8)
    names = sorted(os.listdir(tmp_path))
    assert names == ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                     "model.safetensors.index.json"]
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    assert index["weight_map"] == {"a.weight": names[1], "a.bias": names[1], "b.weight": names[2],
                                   "steps": names[2]}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state().values())
    loaded, _ = _folder.load_folder(tmp_path)
    assert all(torch.equal(loaded[k], v) for k, v in state().items())
    # saving again unsharded replaces the layout: no stale index misleads a reader
    _folder.save_folder(tmp_path, state(), {"name": "y"})
    assert not os.path.exists(tmp_path / "model.safetensors.index.json")
    assert _folder.load_folder(tmp_path)[1] == {"name": "y"}


def test_incomplete_folders_are_clear_errors(tmp_path):
    _folder.save_folder(tmp_path, state(), {}, max_shard_bytes=1)
    os.remove(tmp_path / "model-00002-of-00004.safetensors")
    with pytest.raises(CheckpointError, match="names the shard model-00002-of-00004.safetensors, which is missing"):
        _folder.load_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        _folder.load_folder(tmp_path / "nothing")
