"""casam-infer's inputs: which files a run reads, what each is called, and its prompts.

Everything here is checked before any engine loads where it is cheap (the prompts file,
the mask folder, the CLI prompts), and per input before that input's engine work where it
needs the input read (a mask's shape against its image, a --box3d against its volume).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence


from casam_core.errors import CasamError, InputError
from casam_infer.options import PromptOptions, VolumeOptions
from casam_io.image_io import IMAGE_SUFFIXES, NIFTI_SUFFIXES, Scan
from casam_io.readers import ALL_SUFFIXES, stem_of
from casam_io.volume_io import is_dicom_series
from runtime.prompt_sources import ImagePrompts, boxes_from_masks, group_prompts, has_mask, read_prompt_file

INPUT_SUFFIXES = ALL_SUFFIXES  # every format the reader registry reads


class RunEnding(InputError):
    """An input's problem that ends the whole run when its turn comes (an unusable
    --boxes-from-masks mask, an output that cannot be written), not just that input."""


def expand_inputs(paths: Sequence[Path]) -> list[Path]:
    """Files as given; a DICOM series folder as one volume; other folders → their image
    files (not recursive), sorted by name."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir() and is_dicom_series(path, IMAGE_SUFFIXES + NIFTI_SUFFIXES):
            files.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(INPUT_SUFFIXES))
            if not found:
                raise InputError(f"folder {path} holds no images ({', '.join(INPUT_SUFFIXES)})")
            files.extend(found)
        elif not path.exists():
            raise InputError(f"image {path} does not exist")
        else:
            files.append(path)
    return files


def base_stem(path: Path) -> str:
    """The input's name without its registered suffix: its outputs' stem."""
    return stem_of(path)


def check_prompts(popts: PromptOptions, vol: VolumeOptions) -> Optional[dict[str, ImagePrompts]]:
    """The --prompts table (None without one), and the CLI prompts and mask folder checked,
    all without reading an input. --box3d alone is for volumes only, so it skips the 2-D check."""
    table = read_prompt_file(popts.prompts_file) if popts.prompts_file is not None else None
    if table is None and popts.boxes_from_masks is None and (popts.box or popts.point or not vol.box3d):
        group_prompts(popts.box, popts.point, popts.label)
    if popts.boxes_from_masks is not None and not popts.boxes_from_masks.is_dir():
        raise InputError(f"--boxes-from-masks {popts.boxes_from_masks} is not a folder")
    return table


def check_inputs(images: Sequence[Path], popts: PromptOptions, vol: VolumeOptions, known: Sequence[str] = ()
                 ) -> tuple[Optional[dict[str, ImagePrompts]], list[Path]]:
    """(--prompts table, input files), checked before any engine is loaded: a typo in a prompt
    should not cost an engine load. ``known`` names that a --prompts key may give although
    no input has it (a PACS series that could not be retrieved, reported on its own)."""
    table = check_prompts(popts, vol)
    files = expand_inputs(images)
    if popts.boxes_from_masks is not None:
        _refuse_names([f.name for f in files if not has_mask(popts.boxes_from_masks, base_stem(f))],
                      f"--boxes-from-masks {popts.boxes_from_masks} has no mask for")
    elif table is not None:
        _refuse_names([f.name for f in files if f.name not in table], f"{popts.prompts_file} has no prompts for")
    if table is not None:  # a key naming no input is a typo that would silently go unprompted
        names = {f.name for f in files} | set(known)
        _refuse_names([key for key in table if key not in names],
                      f"{popts.prompts_file} has prompts for a file that is not among the inputs:")
    return table, files


def _refuse_names(names: Sequence[str], what: str) -> None:
    """One InputError naming the first three offending names, if any."""
    if names:
        more = f" (and {len(names) - 3} more)" if len(names) > 3 else ""
        raise InputError(f"{what} {', '.join(names[:3])}{more}")


def prompts_for(path: Path, scan: Scan, table: Optional[dict[str, ImagePrompts]], popts: PromptOptions,
                vol: VolumeOptions, rng: Any) -> ImagePrompts:
    """This input's prompts: its --prompts entry, else boxes from its mask, else the CLI's;
    with --boxes-from-masks its mask is the ground truth either way. A mask that cannot be
    used (empty, unreadable, of another shape than its image) raises RunEnding. (A --prompts
    file that lacks an input and has no mask folder behind it was refused by check_inputs.)"""
    truth = None
    if popts.boxes_from_masks is not None:
        try:
            truth = boxes_from_masks(popts.boxes_from_masks, base_stem(path), scan.is_volume, vol.axis,
                                     popts.box_jitter, rng)
        except CasamError as exc:
            raise RunEnding(str(exc)) from exc
        _check_truth_shape(path, scan, truth, popts.boxes_from_masks)
    entry = table.get(path.name) if table is not None else None
    if entry is None:
        entry = truth or ImagePrompts(boxes=list(popts.box), points=list(popts.point),  # type: ignore[arg-type]
                                      point_labels=list(popts.label) or [1] * len(popts.point), slice=vol.slice,
                                      box3d=list(vol.box3d))
    if truth is not None:
        entry.truth, entry.truth_values = truth.truth, truth.truth_values
    return entry


def _check_truth_shape(path: Path, scan: Scan, truth: ImagePrompts, folder: Path) -> None:
    """A mask must cover its image pixel for pixel (a label volume, its volume voxel for voxel)."""
    shape = scan.data.shape if scan.is_volume else scan.data.shape[:2]
    got = truth.truth.shape if truth.truth is not None else shape
    if tuple(got) != tuple(shape):
        kind = "label volume" if scan.is_volume else "mask"
        raise RunEnding(f"the {kind} for {path.name} in {folder} is {'×'.join(map(str, got))}, but {path.name} "
                        f"is {'×'.join(map(str, shape))}: a --boxes-from-masks mask must have its image's shape")
