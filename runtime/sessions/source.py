"""What a session segments: one 2-D image, or a volume seen slice by slice along one axis.

The source turns the file's raw values into the 8-bit images the engines take, with the
export's recorded intensity handling (``Preprocessing``), exactly as casam-infer does: a
volume is windowed once for the whole volume, so slice k in a session is bit-identical to
slice k in ``casam-infer``'s volume mode, and the masks can be compared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from casam_core.errors import InputError
from casam_io.scan import Scan
from runtime.preprocess import Preprocessing, VolumeSlices


@dataclass
class SessionSource:
    """A scan ready for prompting. Build with ``SessionSource.open``."""

    scan: Scan
    axis: Optional[int]  # None for a 2-D image
    image2d: Optional[np.ndarray] = None  # the 8-bit image of a 2-D source
    slices: Optional[VolumeSlices] = None  # slice k → 8-bit, for a volume
    warnings: list[str] = field(default_factory=list)
    #: Frees what the scan still needs on disk (an upload's private folder, when the scan's
    #: voxels are memory-mapped from it); called once, when the session closes or expires.
    cleanup: Optional[Callable[[], None]] = None

    def release(self) -> None:
        """Run ``cleanup`` once (later calls do nothing)."""
        cleanup, self.cleanup = self.cleanup, None
        if cleanup is not None:
            cleanup()

    @classmethod
    def open(cls, scan: Scan, prep: Preprocessing, axis: int = 2) -> "SessionSource":
        """A 2-D scan is prepared now; a volume's slices are prepared on first use."""
        if scan.data.ndim == 3 and scan.is_volume:
            if not 0 <= axis < 3:
                raise InputError(f"axis {axis} does not exist in a 3-D volume (0, 1 or 2)")
            slices = prep.slices(scan, axis)
            return cls(scan, axis, slices=slices, warnings=list(slices.warnings))
        image, warnings = prep.prepare(scan)
        return cls(scan, None, image2d=image, warnings=list(scan.warnings) + list(warnings))

    @property
    def is_volume(self) -> bool:
        return self.axis is not None

    @property
    def shape(self) -> tuple[int, ...]:
        """(H, W) of an image; the volume's 3-D shape."""
        if self.axis is None:
            assert self.image2d is not None
            return tuple(int(s) for s in self.image2d.shape[:2])
        return tuple(int(s) for s in self.scan.data.shape)

    @property
    def depth(self) -> int:
        """Slices along the axis (1 for an image)."""
        return 1 if self.axis is None else self.shape[self.axis]

    @property
    def slice_hw(self) -> tuple[int, int]:
        if self.axis is None:
            h, w = self.shape
            return h, w
        h, w = (s for i, s in enumerate(self.shape) if i != self.axis)
        return h, w

    def check_slice(self, k: Optional[int]) -> int:
        """``k`` as a valid slice index (an image has only slice 0; None is the middle slice)."""
        if k is None:
            return self.depth // 2
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise InputError(f"slice must be a whole number, got {k!r}")
        if not 0 <= int(k) < self.depth:
            what = "a 2-D image has only slice 0" if self.axis is None else \
                f"the volume has slices 0..{self.depth - 1} along axis {self.axis}"
            raise InputError(f"slice {k} does not exist: {what}")
        return int(k)

    def image(self, k: int) -> np.ndarray:
        """Slice k (or the image) as the 8-bit array the encoder takes."""
        if self.axis is None:
            assert self.image2d is not None
            return self.image2d
        assert self.slices is not None
        return self.slices(k)
