"""The whole toolkit on the edge encoders (issue 25): train, pack, export, infer.

Each edge family runs the chain once on its tiny seeded configuration (same modules as
the full model, small widths): ``casam-train`` with ``--sam``, the bundle and manifest
recording the variant and its input (EfficientViT-SAM's is 512², not 1024²), a verified
``casam-export``, ``casam-infer`` on a picture and on a NIfTI volume, and the refusals that
keep a bundle on one encoder variant.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from casam_bundle import Bundle
from casam_core.files import atomic_write_json, read_json
from casam_export.cli import main as export_main
from casam_infer.cli import main as infer_main
from models.sam_loader import SAM_SPECS
from runtime_support import one_error_line
from trainer.cli import main as train_main
from trainer.vae_training import single_thread
from volume_support import oblique_affine, save_nifti, sphere_volume

VARIANTS = ("tiny_mobile_sam", "tiny_efficientvit")
TRAIN = ["--epochs", "1", "--batch-size", "4", "--masks-per-image", "1", "--vae-epochs", "20", "--device", "cpu",
         "--quiet"]
# The second export of each chain: int8 for MobileSAM (the README's CPU path), fp16 for EfficientViT.
SECOND = {"tiny_mobile_sam": ["--int8", "--calibration-count", "2", "--verify-count", "2"],
          "tiny_efficientvit": ["--fp16"]}


def invoke(main, args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)


@pytest.fixture(scope="module", params=VARIANTS)
def chain(request, tmp_path_factory):
    """Synthetic data, one task trained on the variant, exported twice (fp32, then SECOND)."""
    variant = request.param
    base = tmp_path_factory.mktemp(variant)
    env = {"CASAM_CACHE": str(base / "casam_cache")}
    with single_thread():
        for style in ("stripes", "dots"):
            assert invoke(train_main, ["synth", base / style, "--style", style, "--count", 5, "--seed", 3]).exit_code == 0
            stems = sorted(p.stem for p in (base / style / "images").iterdir())
            atomic_write_json(base / style / "split.json", {"train": stems[:3], "test": stems[3:]})
        result = invoke(train_main, ["--bundle", base / "bundle", "--task", "stripes", "--data", base / "stripes",
                                     "--sam", variant, "--cache-dir", base / "cache"] + TRAIN, env)
        assert result.exit_code == 0, result.output
        for out, extra in (("out32", []), ("out2", SECOND[variant])):
            result = invoke(export_main, ["--bundle", base / "bundle", "--out", base / out, "--quiet"] + extra, env)
            assert result.exit_code == 0, result.output
    return {"variant": variant, "base": base, "env": env}


def test_bundle_and_manifests_record_the_variant_and_its_input(chain):
    variant, base = chain["variant"], chain["base"]
    spec = SAM_SPECS[variant]
    bundle = Bundle.open(base / "bundle")
    assert bundle.sam_model == variant
    prep = bundle.preprocessing
    assert (prep.size, prep.mean, prep.std, prep.resize) == (spec.image_size, spec.pixel_mean, spec.pixel_std, "longest")
    for out in ("out32", "out2"):
        manifest = read_json(base / out / "manifest.json")
        assert manifest["sam"]["model"] == variant
        assert manifest["preprocessing"]["size"] == spec.image_size
        image = next(t for t in manifest["graphs"]["encoder"]["inputs"] if t["name"] == "image")
        assert image["shape"][1:] == [3, spec.image_size, spec.image_size]
    parity = read_json(base / "out32" / "parity.json")
    assert parity["passed"] and parity["summary"]["routes_identical"], parity["summary"]
    if variant == "tiny_mobile_sam":  # int8 must have really quantised the encoder, not fallen back
        assert read_json(base / "out2" / "manifest.json")["graphs"]["encoder"]["precision"] == "int8"


@pytest.mark.parametrize("engines", ["out32", "out2"])
def test_infer_on_a_picture_and_a_volume(chain, engines, tmp_path):
    base = chain["base"]
    picture = sorted((base / "stripes" / "images").iterdir())[0]
    out = tmp_path / "2d"
    result = invoke(infer_main, [picture, "--box", 10, 10, 100, 120, "--engines", base / engines, "--out", out, "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output.strip().splitlines()[-1])
    mask = np.asarray(Image.open(out / record["prompts"][0]["mask"]))
    assert mask.shape == np.asarray(Image.open(picture)).shape[:2]
    volume, _ = sphere_volume()
    path = save_nifti(tmp_path / "sphere.nii.gz", volume, oblique_affine())
    result = invoke(infer_main, [path, "--box3d", 18, 20, 4, 44, 48, 8, "--engines", base / engines,
                                 "--out", tmp_path / "3d", "--json"])
    assert result.exit_code == 0, result.output
    import nibabel as nib

    written = [p for p in (tmp_path / "3d").iterdir() if p.name.endswith(".nii.gz")]
    assert len(written) == 1 and nib.load(str(written[0])).shape == volume.shape


def test_a_bundle_refuses_tasks_of_another_encoder_variant(chain, tmp_path):
    """Training into it with another --sam, and unpacking a package of another variant,
    are each refused with one line that names both variants."""
    variant, base, env = chain["variant"], chain["base"], chain["env"]
    other = next(v for v in VARIANTS if v != variant)
    result = CliRunner().invoke(train_main, ["--bundle", str(base / "bundle"), "--task", "dots", "--data",
                                             str(base / "dots"), "--sam", other] + TRAIN, env=env)
    assert result.exit_code == 2
    line = one_error_line(result)
    assert variant in line and other in line, line
    package = tmp_path / "stripes.casam"
    assert invoke(train_main, ["pack", "--bundle", base / "bundle", "--task", "stripes", "--out", package]).exit_code == 0
    foreign = Bundle.create(tmp_path / "foreign", other, f"untrained-{other}-seed-0",
                            Bundle.open(base / "bundle").preprocessing, untrained_sam=True)
    result = CliRunner().invoke(train_main, ["unpack", str(package), "--bundle", str(foreign.root)])
    assert result.exit_code == 2
    line = one_error_line(result)
    assert f"SAM variant {variant!r}" in line and repr(other) in line, line
    assert invoke(train_main, ["unpack", package, "--bundle", tmp_path / "fresh"]).exit_code == 0
    assert Bundle.open(tmp_path / "fresh").sam_model == variant  # the variant travels with the package
