"""Loading a frozen SAM: official architectures, tiny test model, checkpoints, downloads."""

import http.server
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from models import sam_loader
from models.errors import CheckpointError, UnknownModelError
from models.sam_loader import SamSpec, build_sam_architecture, load_frozen_sam
from casam_core.files import sha256_file


def test_unknown_model_lists_known_ones():
    with pytest.raises(UnknownModelError, match="vit_b, vit_l, vit_h, tiny"):
        load_frozen_sam("vit_x")


def test_tiny_is_frozen_eval_seeded_and_says_untrained(caplog):
    with caplog.at_level("WARNING"):
        a = load_frozen_sam("tiny")
    assert "untrained" in caplog.text
    assert a.untrained and a.checkpoint_sha256.startswith("untrained-tiny")
    assert not a.model.training and all(not p.requires_grad for p in a.model.parameters())
    b = load_frozen_sam("tiny")
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    other = load_frozen_sam("tiny", tiny_seed=1).model
    assert not torch.equal(a.model.image_encoder.patch_embed.proj.weight, other.image_encoder.patch_embed.proj.weight)
    assert a.model.image_encoder(torch.zeros(1, 3, 1024, 1024)).shape == (1, 256, 64, 64)


@pytest.mark.slow
def test_vit_b_parameter_count_and_checkpoint_round_trip(tmp_path):
    sam = build_sam_architecture("vit_b")
    assert sum(p.numel() for p in sam.parameters()) == 93_735_472
    path = tmp_path / "sam_vit_b_random.pth"
    torch.save(sam.state_dict(), path)  # the official files are plain state dicts
    loaded = load_frozen_sam("vit_b", path)
    assert loaded.checkpoint_sha256 == sha256_file(path)
    assert all(not p.requires_grad for p in loaded.model.parameters()) and not loaded.model.training
    original = sam.state_dict()
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, original[key]), key


def test_tiny_checkpoint_round_trip_via_safetensors(tmp_path):
    from safetensors.torch import save_file

    sam = sam_loader.build_tiny_sam(seed=3)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in sam.state_dict().items()}, str(path))
    loaded = load_frozen_sam("tiny", path)
    assert not loaded.untrained
    assert torch.equal(loaded.model.mask_decoder.iou_token.weight, sam.mask_decoder.iou_token.weight)


def test_mismatched_checkpoint_names_missing_and_unexpected_keys(tmp_path):
    state = sam_loader.build_tiny_sam().state_dict()
    state.pop("mask_decoder.iou_token.weight")
    state["extra.head.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        load_frozen_sam("tiny", path)
    assert "missing keys: mask_decoder.iou_token.weight" in str(err.value)
    assert "unexpected keys: extra.head.weight" in str(err.value)


def test_truncated_checkpoint_is_reported(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save(sam_loader.build_tiny_sam().state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        load_frozen_sam("tiny", path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_frozen_sam("vit_b", tmp_path / "nope.pth")


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "obj": SamSpec(1, 1, 1, (0,))}, path)
    with pytest.raises(CheckpointError, match="is not a plain tensor checkpoint; refused for safety") as info:
        load_frozen_sam("tiny", path)
    assert "SamSpec" in str(info.value) and "weights_only" not in str(info.value)


@pytest.fixture
def file_server(tmp_path):
    root = tmp_path / "srv"
    root.mkdir()
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(root), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_once_with_sha_check(tmp_path, file_server, monkeypatch):
    root, url = file_server
    payload = tmp_path / "payload.pth"
    torch.save(sam_loader.build_tiny_sam().state_dict(), payload)
    (root / "sam_tiny.pth").write_bytes(payload.read_bytes())
    spec = SamSpec(32, 2, 2, (1,), 2.0, 256, 64, url=f"{url}/sam_tiny.pth", sha256=sha256_file(payload))
    monkeypatch.setitem(sam_loader.SAM_SPECS, "tiny_dl", spec)
    cache = tmp_path / "cache"
    got = sam_loader.download_checkpoint("tiny_dl", cache)
    assert got == cache / "sam_tiny.pth" and sha256_file(got) == spec.sha256
    (root / "sam_tiny.pth").unlink()  # a second call must use the cache, not the network
    assert sam_loader.download_checkpoint("tiny_dl", cache) == got
    bad = SamSpec(32, 2, 2, (1,), url=f"{url}/other.pth", sha256="0" * 64)
    (root / "other.pth").write_bytes(b"tampered")
    monkeypatch.setitem(sam_loader.SAM_SPECS, "tiny_bad", bad)
    with pytest.raises(CheckpointError, match="expected 0000"):
        sam_loader.download_checkpoint("tiny_bad", cache)
    assert sorted(p.name for p in cache.iterdir()) == ["sam_tiny.pth"], "no partial file may remain"


def test_offline_without_checkpoint_says_how_to_pass_one(tmp_path, monkeypatch):
    spec = sam_loader.SAM_SPECS["vit_b"]
    monkeypatch.setitem(sam_loader.SAM_SPECS, "vit_b", SamSpec(**{**spec.__dict__, "url": "http://127.0.0.1:9/sam_vit_b.pth"}))
    with pytest.raises(CheckpointError) as err:
        load_frozen_sam("vit_b", cache_dir=tmp_path)
    message = str(err.value)
    assert "--checkpoint" in message and "\n" not in message


def test_segment_anything_init_is_never_run():
    code = (
        "import sys, models; from models.sam_loader import load_frozen_sam; load_frozen_sam('tiny');"
        "assert 'segment_anything.predictor' not in sys.modules;"
        "assert 'torchvision' not in sys.modules; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
