"""casam-infer's options: one frozen dataclass per group, the click options that fill it,
and a help page that shows them in those groups.

Every option belongs to exactly one group, and the group is the dataclass whose field has
the option's name: the dataclasses are the one table both ``--help`` and the code read
(``InferCommand.format_options`` renders a section per dataclass; ``InferOptions.from_params``
fills them). A new option is one field and one ``click.option`` in its group's list.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Optional

import click

from casam_core.cli_frame import CasamCommand
from casam_io.image_io import DEFAULT_MAX_PIXELS
from casam_pacs.retrieve import DEFAULT_MAX_SERIES_BYTES
from runtime.backends import BACKENDS, backends_help
from runtime.remote import DEFAULT_READY_TIMEOUT_S
from runtime.sessions.clicks import DEFAULT_TOLERANCE_MM, MAX_CLICKS
from runtime.volume import DEFAULT_BATCH, DEFAULT_MARGIN, DEFAULT_MIN_AREA

DEFAULT_OUT = Path("casam_out")


@dataclass(frozen=True)
class GeneralOptions:
    """Which export runs, and whether routing is forced."""

    engines: Optional[Path] = None  # None: $CASAM_ENGINES, then ./casam_engines
    task: Optional[str] = None


@dataclass(frozen=True)
class PromptOptions:
    """Where each input's prompts come from, and what it is scored against."""

    box: tuple[tuple[float, ...], ...] = ()
    point: tuple[tuple[float, ...], ...] = ()
    label: tuple[int, ...] = ()
    prompts_file: Optional[Path] = None
    boxes_from_masks: Optional[Path] = None
    box_jitter: float = 0.0
    clicks: Optional[int] = None  # the interactive protocol (casam_infer/evaluation.py)
    nsd_tolerance: float = DEFAULT_TOLERANCE_MM
    expect_task: Optional[str] = None


@dataclass(frozen=True)
class VolumeOptions:
    """How volumes are read and segmented, and the input size limit."""

    slice: Optional[int] = None
    axis: int = 2
    volume: Optional[int] = None
    box3d: tuple[tuple[float, ...], ...] = ()
    per_slice: bool = False
    batch: Optional[int] = None  # by the backend's device (runtime.volume.DEFAULT_BATCH)
    margin: float = DEFAULT_MARGIN
    min_area: int = DEFAULT_MIN_AREA
    allow_gaps: bool = False
    single_slice: bool = False
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class OutputOptions:
    """Where outputs go, which ones, and what is printed."""

    out: Path = DEFAULT_OUT
    overwrite: bool = False
    overlay: bool = False
    as_json: bool = False
    timings: bool = False
    quiet: bool = False
    fail_fast: bool = False
    rtstruct: bool = False


@dataclass(frozen=True)
class SpeedOptions:
    """How the local engines run, and how many requests are in flight."""

    backend: str = "auto"
    max_resident: int = 8
    concurrency: int = 1


@dataclass(frozen=True)
class ServerOptions:
    """A casam-serve server instead of local engines."""

    server: Optional[str] = None
    server_timeout: float = DEFAULT_READY_TIMEOUT_S


@dataclass(frozen=True)
class PacsOptions:
    """A DICOMweb server (PACS) instead of IMAGE arguments: where the series come from and
    whether the SEGs go back (docs/PACS.md)."""

    dicomweb: Optional[str] = None
    study: Optional[str] = None
    series: tuple[str, ...] = ()
    store: bool = False
    ca_bundle: Optional[Path] = None
    max_series_mb: int = DEFAULT_MAX_SERIES_BYTES // 1024 ** 2

    @property
    def used(self) -> bool:
        """Whether any PACS option was given (each but --dicomweb needs --dicomweb)."""
        return self != PacsOptions()


#: (help section title, dataclass), in the order --help shows them.
SECTIONS: tuple[tuple[str, type], ...] = (
    ("Engines and routing", GeneralOptions), ("Prompts", PromptOptions), ("Volumes", VolumeOptions),
    ("Outputs", OutputOptions), ("Speed", SpeedOptions), ("Server", ServerOptions), ("PACS", PacsOptions),
)
SECTION_OF = {f.name: title for title, cls in SECTIONS for f in fields(cls)}
#: Options that act instead of a run (eager, no value in the run's options), by section.
ACTIONS = {"verify_deployment": "Engines and routing"}


@dataclass(frozen=True)
class InferOptions:
    """All of one casam-infer run's options, by group."""

    general: GeneralOptions = GeneralOptions()
    prompts: PromptOptions = PromptOptions()
    volumes: VolumeOptions = VolumeOptions()
    outputs: OutputOptions = OutputOptions()
    speed: SpeedOptions = SpeedOptions()
    server: ServerOptions = ServerOptions()
    pacs: PacsOptions = PacsOptions()

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "InferOptions":
        """click's keyword arguments → the groups (every option lands in exactly one)."""
        groups = [group(**{f.name: params[f.name] for f in fields(group) if f.name in params}) for _, group in SECTIONS]
        left = set(params) - set(SECTION_OF)
        if left:  # an option without a group: a programming error, caught by the help test too
            raise TypeError(f"casam-infer options without a group: {', '.join(sorted(left))}")
        return cls(*groups)


class InferCommand(CasamCommand):
    """casam-infer's command: casam's error frame, and options listed by group in --help."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows: dict[str, list[tuple[str, str]]] = {title: [] for title, _ in SECTIONS}
        rows["Other options"] = []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx) if isinstance(param, click.Option) else None
            if record is not None:
                name = param.name or ""
                rows[SECTION_OF.get(name, ACTIONS.get(name, "Other options"))].append(record)
        for title, records in rows.items():
            if records:
                with formatter.section(title):
                    formatter.write_dl(records)


_GENERAL = [
    click.option("--engines", type=click.Path(path_type=Path), default=None,
                 help="casam-export folder. Default: $CASAM_ENGINES, then ./casam_engines."),
    click.option("--task", default=None, metavar="NAME|identity",
                 help="Force a task's alignment, or 'identity' for plain SAM. Default: route by the ELBO scores."),
]
_PROMPTS = [
    click.option("--box", "box", nargs=4, type=float, multiple=True, metavar="X0 Y0 X1 Y1",
                 help="A box prompt in original pixels; repeat for several objects (one mask each)."),
    click.option("--point", "point", nargs=2, type=float, multiple=True, metavar="X Y",
                 help="A click in original pixels. All points form one prompt (with at most one --box)."),
    click.option("--label", "label", type=click.IntRange(0, 1), multiple=True,
                 help="Label of each --point in order: 1 foreground (default), 0 background."),
    click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), default=None, metavar="FILE",
                 help="JSON or CSV giving each file its own boxes, points and slice, keyed by file name "
                      "(see docs/MEDICAL.md); a key that names no input is an error."),
    click.option("--boxes-from-masks", type=click.Path(path_type=Path, file_okay=False), default=None,
                 metavar="DIR",
                 help="One box per structure from each image's mask (DIR/<stem>.png or .nii.gz); also reports "
                      "IoU and BIoU against those masks, per image, per route and overall."),
    click.option("--box-jitter", type=click.FloatRange(min=0), default=0.0, show_default=True, metavar="PX",
                 help="Move each coordinate of a --boxes-from-masks box by up to ±PX pixels (seeded)."),
    click.option("--clicks", type=click.IntRange(0, MAX_CLICKS), default=None, metavar="N",
                 help="With --boxes-from-masks: the interactive protocol of the CVPR 2025 challenge through a "
                      "session (the box, then N simulated clicks, each at the centre of the largest error); "
                      "writes Dice and NSD after each interaction and their AUC to evaluation.json only."),
    click.option("--nsd-tolerance", type=click.FloatRange(min=0), default=DEFAULT_TOLERANCE_MM, show_default=True,
                 metavar="MM", help="With --clicks: NSD's tolerance in mm (pixels for images without spacing)."),
    click.option("--expect-task", default=None, metavar="NAME|identity",
                 help="The task every input should be routed to: reports the routing accuracy."),
]
_VOLUMES = [
    click.option("--slice", "slice", type=int, default=None, metavar="K",
                 help="Volumes: the slice --box is drawn on (default: the middle slice along --axis)."),
    click.option("--axis", type=click.IntRange(0, 2), default=2, show_default=True,
                 help="Volumes: the slicing axis (2: the last, axial for the usual orientations)."),
    click.option("--volume", "volume", type=click.IntRange(min=0), default=None, metavar="K",
                 help="The volume of a 4-D NIfTI to segment (required for 4-D files in volume mode)."),
    click.option("--box3d", "box3d", nargs=6, type=float, multiple=True, metavar="X0 Y0 Z0 X1 Y1 Z1",
                 help="Volumes: a 3-D box; every slice Z0..Z1 (inclusive) is segmented, from the middle one "
                      "(prompted with the box) outward, each next slice prompted with the previous mask's box; "
                      "repeat for several labels (after those of --box)."),
    click.option("--route-per-slice", "per_slice", is_flag=True,
                 help="Volumes: route every slice on its own instead of one route for the volume."),
    click.option("--batch", type=click.IntRange(min=1), default=None,
                 help="Volumes: slices per encoder call [default: "
                      + ", ".join(f"{n} on {d.upper()}" for d, n in DEFAULT_BATCH.items())
                      + "; on the CPU, batches measured slower per slice]."),
    click.option("--margin", type=click.FloatRange(min=0), default=DEFAULT_MARGIN, show_default=True,
                 help="Volumes: pixels added around the previous slice's mask box when propagating."),
    click.option("--min-area", type=click.IntRange(min=1), default=DEFAULT_MIN_AREA, show_default=True,
                 help="Volumes: propagation stops when a mask has fewer pixels than this."),
    click.option("--allow-gaps", is_flag=True,
                 help="Accept a DICOM series with uneven slice positions (with a warning)."),
    click.option("--single-slice", is_flag=True,
                 help="Segment only slice --slice of a volume, as a 2-D image (PNG masks), without propagation."),
    click.option("--max-pixels", type=click.IntRange(min=1), default=DEFAULT_MAX_PIXELS, show_default=True,
                 help="Refuse images with more pixels than this (decoding them could exhaust memory)."),
]
_OUTPUTS = [
    click.option("--out", "out", type=click.Path(path_type=Path), default=DEFAULT_OUT, show_default=True,
                 help="Folder for <image>_mask<k>.png, <image>_overlay.png and <image>.json. Never a bundle "
                      "or export folder; a folder holding files casam-infer did not write needs --overwrite."),
    click.option("--overwrite", is_flag=True,
                 help="Write into an --out folder that holds other files, replacing those with an output's name."),
    click.option("--overlay", is_flag=True, help="Also write the image with the masks and prompts drawn on it."),
    click.option("--json", "as_json", is_flag=True,
                 help="Print each image's JSON record on stdout (one line per image) instead of a summary line."),
    click.option("--timings", is_flag=True, help="Print per-stage milliseconds for each image."),
    click.option("--quiet", is_flag=True, help="No progress bar and no per-image lines; errors still go to stderr."),
    click.option("--fail-fast", is_flag=True,
                 help="Stop at the first image that fails. Default: report it and go on; exit 2 if any failed."),
    click.option("--rtstruct", is_flag=True,
                 help="DICOM series: also write <stem>_rtstruct.dcm, an RT Structure Set of the labels' contours "
                      "referencing the series (stored too with --dicomweb --store)."),
]
_SPEED = [
    click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True, help=backends_help()),
    click.option("--max-resident", type=click.IntRange(min=1), default=8, show_default=True,
                 help="Alignment engines kept loaded at once (least recently used ones are dropped)."),
    click.option("--concurrency", type=click.IntRange(min=1), default=1, show_default=True,
                 help="Images in flight at once (with --server, lets the server batch its encoder runs). "
                      "Outputs are written in input order."),
]
_SERVER = [
    click.option("--server", default=None, metavar="URL",
                 help="Send each image to a casam-serve server (http://HOST:8000 or grpc://HOST:8001) "
                      "instead of running local engines; outputs are the same."),
    click.option("--server-timeout", type=click.FloatRange(min=0), default=DEFAULT_READY_TIMEOUT_S,
                 show_default=True, metavar="SECONDS",
                 help="With --server: how long to wait for a starting server to load its models."),
]
_PACS = [
    click.option("--dicomweb", default=None, metavar="URL",
                 help="Read the series of --study from this DICOMweb root (QIDO/WADO-RS) instead of IMAGE "
                      "arguments, e.g. http://127.0.0.1:8042/dicom-web. Credentials come from the environment "
                      "only: CASAM_DICOMWEB_USER and CASAM_DICOMWEB_PASSWORD, or CASAM_DICOMWEB_TOKEN."),
    click.option("--study", default=None, metavar="UID", help="With --dicomweb: the StudyInstanceUID to segment."),
    click.option("--series", "series", multiple=True, metavar="UID",
                 help="With --dicomweb: only this series (repeat for several). Default: every image series "
                      "of the study (SEG, SR, PR … skipped). A --prompts file is keyed by series UID."),
    click.option("--store", is_flag=True,
                 help="With --dicomweb: also store each volume's DICOM SEG on the server (STOW-RS, one request "
                      "per SEG); outputs are written to --out either way."),
    click.option("--ca-bundle", type=click.Path(path_type=Path, dir_okay=False), default=None, metavar="FILE",
                 help="With --dicomweb: the CA certificate(s) that signed the server's TLS certificate "
                      "(TLS is always verified)."),
    click.option("--max-series-mb", type=click.IntRange(min=1), default=DEFAULT_MAX_SERIES_BYTES // 1024 ** 2,
                 show_default=True, help="With --dicomweb: refuse a series whose files pass this size."),
]


def infer_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Apply every casam-infer option, group by group, in the order --help lists them."""
    for option in reversed(_GENERAL + _PROMPTS + _VOLUMES + _OUTPUTS + _SPEED + _SERVER + _PACS):
        command = option(command)
    return command
