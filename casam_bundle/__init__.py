"""The task bundle format: one home for reading, verifying, locking, writing, packing and
importing bundles.

The trainer writes bundles and the exporter reads them; both import this package, which
imports neither of them (nor torch), just as the runtime and the exporter share
``runtime/manifest.py``. Turning a bundle's files into torch modules is the models' job
(``models/bundle_models.py``). Task packages (``casam_bundle.package``) and their
signatures (``casam_bundle.signing``, which needs ``cryptography``) are imported on use.
"""

from casam_bundle.errors import BundleError
from casam_bundle.format import (
    BUNDLE_FORMAT,
    BUNDLE_FORMAT_VERSION,
    REMOVED_DIR,
    TASK_FILES,
    THRESHOLD_KEYS,
    Bundle,
    TaskRecord,
    check_task_name,
)
from casam_bundle.lock import DEFAULT_WAIT_S, BundleBusy, bundle_lock

__all__ = ["BUNDLE_FORMAT", "BUNDLE_FORMAT_VERSION", "DEFAULT_WAIT_S", "REMOVED_DIR", "TASK_FILES", "THRESHOLD_KEYS",
           "Bundle", "BundleBusy", "BundleError", "TaskRecord", "bundle_lock", "check_task_name"]
