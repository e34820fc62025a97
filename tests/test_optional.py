"""casam_core.optional: a missing extra is one line naming the extra, in the caller's error type."""

from __future__ import annotations

import pytest

from casam_core.errors import CasamError, InputError
from casam_core.optional import optional_import


def test_a_missing_module_names_its_extra_in_the_callers_error_type() -> None:
    with pytest.raises(InputError) as info:
        optional_import("casam_no_such_module", "medical", "reading DICOM", InputError)
    message = str(info.value)
    assert "\n" not in message and "reading DICOM needs casam_no_such_module" in message
    assert "pip install 'casam[medical]'" in message


def test_a_present_module_is_returned_and_the_default_error_is_casams() -> None:
    assert optional_import("json", "x", "y").dumps([1]) == "[1]"
    with pytest.raises(CasamError, match="pip install nvidia-pytriton"):
        optional_import("casam_no_such_module", "", "casam-serve", package="nvidia-pytriton")
