"""The task bundle format: one home for reading, verifying and writing bundles.

The trainer writes bundles and the exporter reads them; both import this package, which
imports neither of them (nor torch), just as the runtime and the exporter share
``runtime/manifest.py``. Turning a bundle's files into torch modules is the models' job
(``models/bundle_models.py``).
"""

from casam_bundle.format import (
    BUNDLE_FORMAT,
    BUNDLE_FORMAT_VERSION,
    TASK_FILES,
    THRESHOLD_KEYS,
    Bundle,
    BundleError,
    TaskRecord,
    check_task_name,
)

__all__ = ["BUNDLE_FORMAT", "BUNDLE_FORMAT_VERSION", "TASK_FILES", "THRESHOLD_KEYS", "Bundle", "BundleError",
           "TaskRecord", "check_task_name"]
