"""Small guarantees: --out must be a folder, and an alignment engine is hashed at every load."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from casam_core.errors import ManifestError
from runtime.pipeline import Pipeline
from runtime.prompts import Prompts
from runtime_support import BOXES, copy_engines, exported, one_error_line, sample_images


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    return exported(tmp_path_factory)


def test_out_pointing_at_a_file_is_named(shipped, tmp_path):
    from casam_export.cli import main as export_main
    from casam_infer.cli import main as infer_main

    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "x.png")
    (tmp_path / "afile").write_text("not a folder")
    runs = [
        (infer_main, [str(tmp_path / "x.png"), "--box", "1", "1", "9", "9", "--engines", str(shipped[1]),
                      "--out", str(tmp_path / "afile")]),
        (infer_main, [str(tmp_path / "x.png"), "--box", "1", "1", "9", "9", "--engines", str(shipped[1]),
                      "--out", str(tmp_path / "afile" / "sub")]),
        (export_main, ["--bundle", str(shipped[0]), "--out", str(tmp_path / "afile"), "--no-verify"]),
    ]
    for main, args in runs:
        result = CliRunner().invoke(main, args)
        line = one_error_line(result)
        assert f"--out {args[-1] if main is infer_main else tmp_path / 'afile'} is a file" in line, line
        assert "File exists" not in line
    assert (tmp_path / "afile").read_text() == "not a folder"


def test_alignment_engine_reloaded_after_eviction_is_hashed_again(shipped, tmp_path):
    engines = copy_engines(shipped[1], tmp_path / "engines")
    pipe = Pipeline.from_manifest(engines, backend="ort-cpu", max_resident=1)
    image = sample_images()[1]
    pipe.predict(image, Prompts.for_image(image.shape, boxes=BOXES[:1]), task="alpha")
    pipe.predict(image, Prompts.for_image(image.shape, boxes=BOXES[:1]), task="beta")  # evicts alpha
    assert pipe.align_engines.resident() == ["beta"] and pipe.align_engines.evictions == 1
    alpha, beta = (pipe.manifest_obj.task(name).graph.path for name in ("alpha", "beta"))
    alpha.write_bytes(beta.read_bytes())  # a swapped graph
    with pytest.raises(ManifestError, match=rf"{alpha.name} \(align/alpha\) has sha256"):
        pipe.predict(image, Prompts.for_image(image.shape, boxes=BOXES[:1]), task="alpha")
