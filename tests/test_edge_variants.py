"""The edge rows of the SAM variant table (issue 25): inputs from the table, refusals that
need no weights, and seeded identities per variant. Fast: nothing here runs an encoder
on a full-size image."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from models.casam import CASAM
from models.errors import CheckpointError, ShapeError
from models import sam_loader
from models.sam_loader import (SAM_SPECS, SamSpec, build_tiny_sam, check_preprocessing, download_checkpoint,
                               load_frozen_sam, sam_preprocessing, untrained_seed)
from runtime.preprocess import Preprocessing
from trainer.cli import main as train_main

EDGE = {"mobile_sam": 1024, "efficientvit_sam_l0": 512, "efficientvit_sam_l1": 512,
        "tiny_mobile_sam": 1024, "tiny_efficientvit": 512}


@pytest.mark.parametrize("name,size", sorted(EDGE.items()))
def test_preprocessing_comes_from_the_table(name, size):
    spec = SAM_SPECS[name]
    prep = sam_preprocessing(name)
    assert (prep.size, prep.mean, prep.std, prep.resize) == (size, spec.pixel_mean, spec.pixel_std, "longest")
    assert sam_preprocessing(name, "stretch").resize == "stretch"
    check_preprocessing(name, prep)  # its own input passes


def test_a_preprocessing_of_another_size_is_refused_before_any_weights_load():
    with pytest.raises(CheckpointError) as err:
        check_preprocessing("efficientvit_sam_l0", Preprocessing())  # SAM's 1024², not L0's 512²
    assert "512²" in str(err.value) and "1024²" in str(err.value) and "\n" not in str(err.value)


def test_full_variants_name_their_official_files():
    for name in ("mobile_sam", "efficientvit_sam_l0", "efficientvit_sam_l1"):
        spec = SAM_SPECS[name]
        assert not spec.seeded and spec.url.startswith("https://") and len(spec.sha256) == 64
    assert SAM_SPECS["efficientvit_sam_l0"].norm_eps == 1e-6


def test_a_row_without_a_published_sha256_is_never_downloaded(monkeypatch, tmp_path):
    spec = SAM_SPECS["mobile_sam"]
    monkeypatch.setitem(sam_loader.SAM_SPECS, "mobile_sam", SamSpec(**{**spec.__dict__, "sha256": None,
                                                                         "url": "http://127.0.0.1:9/mobile_sam.pt"}))
    with pytest.raises(CheckpointError, match="no published sha256") as err:
        download_checkpoint("mobile_sam", tmp_path)
    assert "--checkpoint" in str(err.value) and not any(tmp_path.iterdir())


def test_seeded_variants_have_their_own_identity():
    ids = {name: load_frozen_sam(name).checkpoint_sha256 for name in ("tiny", "tiny_mobile_sam", "tiny_efficientvit")}
    assert ids["tiny"] == "untrained-tiny-seed-0"  # bundles written before the edge rows stay valid
    assert len(set(ids.values())) == 3  # one embedding cache key per architecture
    for name, checkpoint_id in ids.items():
        assert untrained_seed(name, checkpoint_id) == 0
    assert untrained_seed("tiny_mobile_sam", ids["tiny_efficientvit"]) is None
    a, b = build_tiny_sam(3, "tiny_efficientvit"), build_tiny_sam(3, "tiny_efficientvit")
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


def test_casam_refuses_an_input_of_another_size():
    model = CASAM(load_frozen_sam("tiny_efficientvit").model)
    assert model.frame_hw == (512, 512)
    with pytest.raises(ShapeError, match="B×3×512×512"):
        model.encode(torch.zeros(1, 3, 1024, 1024))


def test_train_cli_offers_every_variant_of_the_table():
    help_text = CliRunner().invoke(train_main, ["--help"]).output.replace("\n", " ")
    for name in EDGE:
        assert name in help_text


def test_unpacking_a_task_of_another_variant_is_refused_with_one_line(tmp_path):
    from casam_bundle import Bundle
    from conftest import make_random_bundle
    from runtime_support import one_error_line

    make_random_bundle(tmp_path / "site", ("alpha",))  # a 'tiny' bundle
    package = tmp_path / "alpha.casam"
    packed = CliRunner().invoke(train_main, ["pack", "--bundle", str(tmp_path / "site"), "--task", "alpha",
                                             "--out", str(package)])
    assert packed.exit_code == 0, packed.output
    foreign = Bundle.create(tmp_path / "hub", "tiny_mobile_sam", "untrained-tiny_mobile_sam-seed-0",
                            sam_preprocessing("tiny_mobile_sam"), untrained_sam=True)
    result = CliRunner().invoke(train_main, ["unpack", str(package), "--bundle", str(foreign.root)])
    assert result.exit_code == 2
    line = one_error_line(result)
    assert "SAM variant 'tiny'" in line and "'tiny_mobile_sam'" in line and "one encoder variant" in line, line
    assert Bundle.open(foreign.root).task_names == []
