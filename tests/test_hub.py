"""Loading by Hub name from a cache built here in the real Hub layout (``models--org--repo/refs/main``,
``snapshots/<commit>/...``), offline: the id resolves to the cached file, ``revision=`` picks its snapshot, a
missing file is a clear error, and a local path always wins."""

import os

import pytest

from tokenflow_ext import hub

pytest.importorskip("huggingface_hub")

MAIN, OLD = "a" * 40, "b" * 40


def make_cache(root, repo="ByteFlow-AI/TokenFlow", files=None):
    """A Hub cache holding ``files`` ({name: bytes}) at commit MAIN (refs/main) and an older copy at OLD."""
    folder = root / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(MAIN)
    for commit, tag in ((MAIN, b"main"), (OLD, b"old")):
        for name, data in (files or {}).items():
            path = folder / "snapshots" / commit / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(tag + data)
    return root


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = make_cache(tmp_path / "hub", files={"tokenflow_siglip_32k.pt": b"weights", "sub/x.bin": b"x"})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_ids_resolve_to_the_cached_snapshot(offline_cache):
    by_filename = hub.resolve_file("ByteFlow-AI/TokenFlow", filename="tokenflow_siglip_32k.pt")
    by_path = hub.resolve_file("ByteFlow-AI/TokenFlow/tokenflow_siglip_32k.pt")
    assert by_filename == by_path and open(by_path, "rb").read() == b"mainweights"
    assert MAIN in by_path and str(offline_cache) in by_path
    assert open(hub.resolve_file("ByteFlow-AI/TokenFlow/sub/x.bin"), "rb").read() == b"mainx"


def test_revision_picks_its_snapshot(offline_cache):
    old = hub.resolve_file("ByteFlow-AI/TokenFlow", filename="tokenflow_siglip_32k.pt", revision=OLD)
    assert open(old, "rb").read() == b"oldweights"


def test_offline_and_not_cached_is_a_clear_error(offline_cache):
    with pytest.raises(hub.HubError) as error:
        hub.resolve_file("ByteFlow-AI/TokenFlow", filename="tokenflow_clipb_32k_enhanced.pt")
    message = str(error.value)
    assert "ByteFlow-AI/TokenFlow" in message and "tokenflow_clipb_32k_enhanced.pt" in message
    assert str(offline_cache) in message and "HF_HUB_OFFLINE" in message
    with pytest.raises(ValueError, match="say which file .* tokenflow_clipb_32k_enhanced.pt"):
        hub.resolve_file("ByteFlow-AI/TokenFlow")


def test_cache_dir_argument_and_hf_home(tmp_path, monkeypatch):
    cache = make_cache(tmp_path / "elsewhere", repo="org/model", files={"w.pt": b"!"})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    assert open(hub.resolve_file("org/model/w.pt", cache_dir=cache), "rb").read() == b"main!"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    make_cache(tmp_path / "home" / "hub", repo="org/model", files={"w.pt": b"?"})
    assert open(hub.resolve_file("org/model/w.pt"), "rb").read() == b"main?"


def test_a_local_path_always_wins(tmp_path, monkeypatch, offline_cache):
    monkeypatch.chdir(tmp_path)
    local = tmp_path / "ByteFlow-AI" / "TokenFlow"
    local.mkdir(parents=True)
    (local / "tokenflow_siglip_32k.pt").write_bytes(b"local")
    assert hub.resolve_file("ByteFlow-AI/TokenFlow/tokenflow_siglip_32k.pt") == \
        "ByteFlow-AI/TokenFlow/tokenflow_siglip_32k.pt"
    assert hub.resolve_file("ByteFlow-AI/TokenFlow", filename="tokenflow_siglip_32k.pt") == \
        os.path.join("ByteFlow-AI/TokenFlow", "tokenflow_siglip_32k.pt")
    assert hub.resolve_file("./model.pt") == "./model.pt"  # reads as a path, not an id


def test_whole_repository_snapshots(offline_cache):
    folder = hub.resolve_folder("ByteFlow-AI/TokenFlow")
    assert sorted(os.listdir(folder)) == ["sub", "tokenflow_siglip_32k.pt"]
    with pytest.raises(hub.HubError, match="org/absent"):
        hub.resolve_folder("org/absent")


def test_official_files_table():
    assert hub.official_settings("ByteFlow-AI/TokenFlow", "tokenflow_clipb_32k_enhanced.pt") == \
        ("TokenFlowTokenizer", {"config": "clipb_256", "enhanced_decoder": True})
    assert hub.official_settings("ByteFlow-AI/TokenFlow", "unknown.pt") is None


def _cache_with(tmp_path, repo, name, writer):
    folder = tmp_path / "hub" / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(MAIN)
    (folder / "snapshots" / MAIN).mkdir(parents=True)
    writer(folder / "snapshots" / MAIN / name)
    return tmp_path / "hub"


def test_tokenizer_by_hub_id_equals_by_path_and_official_files_need_no_config(tmp_path, monkeypatch):
    import torch

    from tokenflow_ext.models import TokenFlowTokenizer
    from tokenflow_tiny import TINY_CLIP, tiny_tokenizer

    model = tiny_tokenizer()
    local = tmp_path / "tiny.pt"
    model.save_pretrained(local)
    cache = _cache_with(tmp_path, "org/tiny", "tiny.pt", model.save_pretrained)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    by_id = TokenFlowTokenizer.from_pretrained("org/tiny", filename="tiny.pt", cache_dir=cache)
    by_path = TokenFlowTokenizer.from_pretrained(local)
    for key, value in by_path.state_dict().items():
        assert torch.equal(value, by_id.state_dict()[key]), key
    # an official file's settings come from OFFICIAL_FILES: a bare state dict (as released) loads by name alone
    from tokenflow_ext.models.tokenflow.config import resolve_config

    monkeypatch.setitem(hub.OFFICIAL_FILES, ("org/tiny", "bare.pt"),
                        ("TokenFlowTokenizer", {"config": resolve_config("clipb_256", **TINY_CLIP)}))
    torch.save({"model": model.state_dict()}, cache / "models--org--tiny" / "snapshots" / MAIN / "bare.pt")
    official = TokenFlowTokenizer.from_pretrained("org/tiny/bare.pt", cache_dir=cache)
    assert official.config.codebook_size == TINY_CLIP["codebook_size"]
    with pytest.raises(hub.HubError, match="org/tiny file absent.pt"):
        TokenFlowTokenizer.from_pretrained("org/tiny", filename="absent.pt", cache_dir=cache)


@pytest.mark.parametrize("shard_bytes", [None, 200_000])
def test_tokenizer_folder_round_trip_sharded_or_not(tmp_path, shard_bytes):
    import torch

    from tokenflow_ext.models import TokenFlowTokenizer
    from tokenflow_tiny import tiny_tokenizer

    model = tiny_tokenizer()
    folder = model.save_pretrained(tmp_path / "tok", max_shard_bytes=shard_bytes)
    names = os.listdir(folder)
    assert "config.json" in names and (("model.safetensors.index.json" in names) == (shard_bytes is not None))
    loaded = TokenFlowTokenizer.from_pretrained(folder)
    assert loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_flowtok_by_hub_id(tmp_path, monkeypatch):
    import torch

    from tokenflow_ext.models import FlowTok
    from tokenflow_ext.models._checkpoint import write_checkpoint

    torch.manual_seed(0)
    model = FlowTok((2, 32, 2), text_encoder=False, tokenizer=False, clip_dim=24, text_layers=1, text_heads=2,
                    text_hidden=32)
    meta = {"preset": [2, 32, 2], "flow_kwargs": {"clip_dim": 24, "text_layers": 1, "text_heads": 2, "text_hidden": 32}}
    cache = _cache_with(tmp_path, "org/flow", "flow.pt",
                        lambda path: write_checkpoint(str(path), model.nnet.state_dict(), meta))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = FlowTok.from_pretrained("org/flow", filename="flow.pt", cache_dir=cache)
    for key, value in model.nnet.state_dict().items():
        assert torch.equal(value, loaded.nnet.state_dict()[key]), key


@pytest.mark.parametrize("form", ["file.pt", "file.safetensors", "folder", "sharded"])
def test_flowtok_save_pretrained_round_trips_without_a_preset(tmp_path, form):
    import torch

    from tokenflow_ext.models import FlowTok

    torch.manual_seed(0)
    model = FlowTok("2,32,2", text_encoder=False, tokenizer=False, clip_dim=24, text_layers=1, text_heads=2,
                    text_hidden=32)
    target = tmp_path / ("flow" if form in ("folder", "sharded") else form)
    written = model.save_pretrained(target, max_shard_bytes=50_000 if form == "sharded" else None)
    if form == "sharded":
        assert os.path.exists(os.path.join(written, "model.safetensors.index.json"))
    loaded = FlowTok.from_pretrained(written)
    assert loaded.preset == (2, 32, 2) and loaded.flow_kwargs["clip_dim"] == 24
    for key, value in model.nnet.state_dict().items():
        assert torch.equal(value, loaded.nnet.state_dict()[key]), key


@pytest.mark.parametrize("form", ["file.pt", "file.safetensors", "folder", "sharded"])
def test_flowtitok_save_pretrained_round_trips(tmp_path, form):
    import torch

    from tokenflow_ext.models import FlowTiTok

    torch.manual_seed(0)
    model = FlowTiTok(image_size=32, patch_size=8, encoder_size=(32, 1, 2), decoder_size=(32, 1, 2), text_dim=24)
    target = tmp_path / ("titok" if form in ("folder", "sharded") else form)
    written = model.save_pretrained(target, max_shard_bytes=100_000 if form == "sharded" else None)
    loaded = FlowTiTok.from_pretrained(written)
    import json

    assert json.dumps(loaded.settings) == json.dumps(model.settings)  # tuples come back as lists
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
