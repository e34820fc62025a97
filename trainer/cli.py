"""``casam-train``: add a task to a bundle, evaluate a bundle, run the continual protocol.

    casam-train add --bundle DIR --task NAME --data PATH [options]   add one task
    casam-train --bundle DIR --task NAME --data PATH [options]       the same (alias)
    casam-train eval --bundle DIR --data NAME=PATH ... [--ood PATH ...]
    casam-train sequence --bundle DIR --tasks NAME=PATH ... [--methods casam,naive,sam] [--ood NAME=PATH ...]
    casam-train synth OUT --style S --count N --seed K
    casam-train pack --bundle DIR --task NAME --out T.casam [--sign KEY] [--redact-split] [--overwrite]
    casam-train unpack --bundle DIR T.casam [--as NAME] [--trust KEYS/] [--check-data DIR [--strict]]
    casam-train remove --bundle DIR --task NAME [--keep]
    casam-train keygen --out site_key [--overwrite]

Every command runs in casam's CLI frame (casam_core.cli_frame): a casam error or a usage
error ends it with one line ``casam-train: error: …`` on stderr and exit code 2. Every
command that writes a bundle holds its lock; a second writer waits up to --wait seconds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import click

from casam_bundle.lock import DEFAULT_WAIT_S
from casam_core.cli_frame import CasamCommand, CasamGroup
from casam_core.errors import InputError
from casam_core.ownership import refuse_existing
from casam_io.intensity import INTENSITY_MODES, WINDOW_PRESETS, intensity_from_options
from models.sam_loader import known_models
from runtime.preprocess import RESIZE_MODES
from trainer.session import DEVICES
from trainer.train_task import STATE_FILE, TrainConfig

PROG = "casam-train"
GREEDY_OPTIONS = ("--tasks", "--data", "--ood")
#: Subcommands that may run under torchrun: only the training of one task is data-parallel.
DATA_PARALLEL = ("add",)


class GreedyCommand(CasamCommand):
    """Lets ``--tasks a=X b=Y`` mean ``--tasks a=X --tasks b=Y`` (one flag, several values)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        out: list[str] = []
        current: Optional[str] = None
        for arg in args:
            if arg.startswith("-"):
                current = arg if arg in GREEDY_OPTIONS else None
                out.append(arg)
            elif current is not None and out and out[-1] != current:
                out += [current, arg]
            else:
                out.append(arg)
        return super().parse_args(ctx, out)


def _report_file(path: Optional[str], option: str) -> None:
    """A report file (--json-summary, eval's --out) is checked before any work: never a
    folder, a bundle's bundle.json or an export's manifest.json (casam_core.ownership)."""
    if path:
        refuse_existing(path, overwrite=True, option=option)


def _emit_summary(summary: dict[str, Any], json_path: Optional[str], quiet: bool) -> None:
    text = json.dumps(summary, indent=2, default=str)
    if json_path:
        from casam_core.files import atomic_write_text

        atomic_write_text(json_path, text + "\n")
    if not quiet or not json_path:
        click.echo(text)


def _apply(func: Callable[..., Any], options: Sequence[Callable[[Any], Any]]) -> Callable[..., Any]:
    for option in reversed(options):
        func = option(func)
    return func


def wait_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--wait SECONDS``: how long a writer waits for a bundle another command is writing."""
    return click.option(
        "--wait", "wait", type=click.FloatRange(min=0), default=DEFAULT_WAIT_S, show_default=True,
        help="Seconds to wait when another command is writing the bundle (it says so on stderr); "
             "0 fails at once with 'bundle … is busy (pid N)'.")(func)


def overwrite_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--overwrite``: the one flag, in every casam command, that lets a file be replaced."""
    return click.option("--overwrite", is_flag=True,
                        help="Replace an existing --out file (a bundle.json or manifest.json never).")(func)


def _session(kw: dict[str, Any]) -> Any:
    """The SessionOptions of the session options given (without ``--sam``, a bundle's own SAM
    is used by the commands that open one)."""
    from trainer.session import SessionOptions

    names = ("sam", "checkpoint", "device", "cache_dir", "quiet")
    return SessionOptions(**{k: kw[k] for k in names if k in kw and kw[k] is not None})


def session_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """How the frozen SAM is loaded and run: ``--checkpoint --device --cache-dir --quiet``,
    defined once for every subcommand that runs SAM."""
    return _apply(func, [
        click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
                     help="SAM checkpoint file (.pth or .safetensors); an existing bundle's must have the sha256 it "
                          "records. Default: the official one, downloaded once into $CASAM_CACHE; 'tiny' uses its "
                          "seeded random weights."),
        click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
                     help="Torch device; auto = cuda when available. On cuda the frozen encoder runs under bf16/fp16 "
                          "autocast; the alignment layer trains in fp32."),
        click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
                     help="Embedding cache folder. Default: $CASAM_CACHE/embeddings or ~/.cache/casam/embeddings."),
        click.option("--quiet", is_flag=True, help="No progress bars."),
    ])


def training_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The SAM variant and the METHOD.md hyperparameters, shared by ``add`` and ``sequence``."""
    d = TrainConfig()
    return _apply(session_options(func), [
        click.option("--sam", "sam", type=click.Choice(known_models()), default="vit_b", show_default=True,
                     help="Frozen SAM model. A new bundle records it; an existing bundle refuses another."),
        click.option("--epochs", type=int, default=d.epochs, show_default=True, help="Alignment-layer epochs."),
        click.option("--batch-size", type=int, default=d.batch_size, show_default=True, help="Images per batch (alignment layer and VAE)."),
        click.option("--lr", type=float, default=d.lr, show_default=True, help="Adam learning rate of the alignment layer (constant)."),
        click.option("--masks-per-image", type=int, default=d.masks_per_image, show_default=True,
                     help="Structures prompted per image and step (sampled with replacement if fewer)."),
        click.option("--vae-epochs", type=int, default=d.vae_epochs, show_default=True, help="Task-VAE epochs."),
        click.option("--vae-lr", type=float, default=d.vae_lr, show_default=True, help="Task-VAE Adam learning rate."),
        click.option("--beta", type=float, default=d.beta, show_default=True, help="KL weight β of the VAE score."),
        click.option("--folds", type=int, default=d.folds, show_default=True, help="K of the K-fold threshold calibration."),
        click.option("--percentile", type=float, default=d.percentile, show_default=True,
                     help="Percentile of the pooled held-out scores used as the routing threshold τ."),
        click.option("--resize", type=click.Choice(RESIZE_MODES), default=None,
                     help="Preprocessing: 'longest' side to the SAM's input size + pad (SAM), or 'stretch' to a square "
                          "(authors); the size is the --sam variant's (1024, or 512 for EfficientViT-SAM). "
                          "Default: the bundle's, or 'longest' for a new bundle."),
        click.option("--seed", type=int, default=d.seed, show_default=True, help="Seed of the train/test split, prompts and initialisation."),
        click.option("--json-summary", type=click.Path(dir_okay=False), default=None,
                     help="Also write the JSON summary to this file (with --quiet it is then not printed)."),
    ])


def task_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The options of adding a task (``add``, and the bare ``casam-train`` that is its alias)."""
    return _apply(wait_option(training_options(func)), [
        click.option("--bundle", type=click.Path(file_okay=False), default=None, help="Bundle folder (created if it does not exist)."),
        click.option("--task", default=None, help="Name of the task to add (letters, digits, '_', '.', '-')."),
        click.option("--data", type=click.Path(exists=True, file_okay=False), default=None,
                     help="Dataset: images/ + masks/ (matching stems, optional split.json), or volumes: "
                          "images/<case>.nii.gz or images/<case>/ (a DICOM series) with labels/<case>.nii.gz."),
        click.option("--replace", is_flag=True, help="Retrain a task that is already in the bundle."),
        click.option("--resume", is_flag=True,
                     help="Continue an interrupted run of this task from its last finished epoch (an error when "
                          "there is none)."),
        # --- volumes and intensity (casam_io.intensity; recorded in bundle.json, applied by casam-infer) ---
        click.option("--axis", type=click.IntRange(0, 2), default=2, show_default=True,
                     help="Axis along which volumes are sliced (2: the last, axial for the usual orientations)."),
        click.option("--volume", type=click.IntRange(min=0), default=None, metavar="K",
                     help="Which volume of 4-D NIfTI images to train on (0-based); recorded in the task's split."),
        click.option("--intensity", "intensity_mode", type=click.Choice(list(INTENSITY_MODES)), default=None,
                     help="How raw values become 8-bit, for a new bundle (default auto). "
                          + "; ".join(f"{k}: {v}" for k, v in INTENSITY_MODES.items()) + "."),
        click.option("--window", "window", type=float, nargs=2, default=None, metavar="CENTER WIDTH",
                     help="A fixed window in stored units (Hounsfield for CT), e.g. --window 40 400."),
        click.option("--window-preset", type=click.Choice(list(WINDOW_PRESETS)), default=None,
                     help="A named CT window: " + ", ".join(f"{k} {c:g}/{w:g}" for k, (c, w) in WINDOW_PRESETS.items())
                          + " (center/width HU)."),
    ])


def _config(kw: dict[str, Any]) -> TrainConfig:
    return TrainConfig(epochs=kw["epochs"], batch_size=kw["batch_size"], lr=kw["lr"], masks_per_image=kw["masks_per_image"],
                       vae_epochs=kw["vae_epochs"], vae_lr=kw["vae_lr"], beta=kw["beta"], folds=kw["folds"],
                       percentile=kw["percentile"], seed=kw["seed"])


def _pairs(values: Sequence[str], what: str) -> list[tuple[str, str]]:
    out = []
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise InputError(f"{what} expects NAME=PATH, got {v!r}")
        out.append((name, path))
    return out


def _check_resumable(bundle: str, task: str) -> None:
    """``--resume`` continues an interrupted run; with none to continue it says so, rather
    than training from scratch while the user believes a run was resumed."""
    from casam_bundle import Bundle, check_task_name

    root = Path(bundle)
    check_task_name(task)
    if not (root / "bundle.json").is_file() or not (Bundle.open(root, verify=False).staging_dir(task) / STATE_FILE).is_file():
        raise InputError(f"--resume: bundle {root} holds no interrupted run of task {task!r}; "
                         "rerun without --resume to train it from the start")


def _add_task(kw: dict[str, Any]) -> None:
    """Train one task and commit it (``add`` and the bare form)."""
    missing = [f"--{n}" for n in ("bundle", "task", "data") if kw[n] is None]
    if missing:
        raise click.UsageError(f"missing {', '.join(missing)} (or give a subcommand: {', '.join(sorted(main.commands))})")
    _report_file(kw["json_summary"], "--json-summary")
    if kw["resume"]:
        _check_resumable(kw["bundle"], kw["task"])
    from trainer.train_task import TaskOptions, train_task

    intensity = intensity_from_options(kw["intensity_mode"], kw["window"], kw["window_preset"])
    options = TaskOptions(resize=kw["resize"], axis=kw["axis"], intensity=intensity, replace=kw["replace"],
                          resume=kw["resume"], wait=kw["wait"], volume=kw["volume"])
    summary = train_task(kw["bundle"], kw["task"], kw["data"], session=_session(kw), config=_config(kw),
                         options=options)
    if summary is not None:  # None: a torchrun rank other than 0, which commits and reports
        _emit_summary(summary, kw["json_summary"], kw["quiet"])


@click.group(name=PROG, cls=CasamGroup, invoke_without_command=True,
             context_settings={"help_option_names": ["-h", "--help"]})
@task_options
@click.pass_context
def main(ctx: click.Context, **kw: Any) -> None:
    """Add one task to a CA-SAM bundle: train its alignment layer and VAE, calibrate its
    threshold, evaluate it on its held-out split, and commit it atomically.

    `casam-train add --bundle B --task T --data D` adds a task; the bare `casam-train
    --bundle B --task T --data D` is the same command. Other subcommands: eval (score a
    bundle), sequence (the continual protocol), synth (write a synthetic dataset),
    pack / unpack (ship one task to another bundle), remove (withdraw a task), keygen (a
    site's signing key).

    Data-parallel: `torchrun --nproc_per_node=N -m trainer` with these options trains the
    task on N processes (DDP; gloo on CPU, nccl on CUDA); rank 0 alone commits.
    """
    if ctx.invoked_subcommand is not None:
        _refuse_data_parallel(ctx.invoked_subcommand)
        return
    _add_task(kw)


def _refuse_data_parallel(subcommand: str) -> None:
    """Only the training of one task is data-parallel; N copies of a subcommand would race."""
    from trainer.distributed import world_size_from_env

    if subcommand not in DATA_PARALLEL and world_size_from_env() > 1:
        raise InputError(f"'{subcommand}' does not run under torchrun; launch it as plain casam-train "
                         f"(torchrun trains one task: give --bundle, --task and --data)")


@main.command("add")
@task_options
def add_command(**kw: Any) -> None:
    """Add one task to the bundle (the bare `casam-train --bundle … --task … --data …` is this
    command): train, calibrate, evaluate on the held-out split, commit atomically."""
    _add_task(kw)


@main.command("eval", cls=GreedyCommand)
@click.option("--bundle", type=click.Path(exists=True, file_okay=False), required=True, help="Bundle folder.")
@click.option("--data", "data", multiple=True,
              help="NAME=PATH of a seen task's dataset (repeatable, or several after one --data). Its recorded test split is used.")
@click.option("--ood", multiple=True,
              help="Folder of unseen images (images/ or flat; pictures, DICOM, NIfTI: a volume counts as its middle "
                   "slice; repeatable), prepared with the bundle's recorded intensity. Reports the rejection rate.")
@click.option("--out", type=click.Path(dir_okay=False), default="eval.json", show_default=True, help="JSON report file.")
@session_options
def eval_command(bundle: str, data: Sequence[str], ood: Sequence[str], out: str, **session: Any) -> None:
    """Per-task IoU/BIoU (one exact box per structure, routed), routing accuracy on the seen
    tasks and the rejection rate (routed to plain SAM) on OOD sets. Prints a table, writes JSON."""
    from casam_core.files import atomic_write_json
    from trainer.sequence import evaluate_bundle

    _report_file(out, "--out")
    report = evaluate_bundle(bundle, _pairs(data, "--data"), list(ood), session=_session(session))
    atomic_write_json(out, report)
    click.echo(report["table"])
    click.echo(f"report written to {out}")


def _methods_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--methods a,b,c``; choices and help come from the method table (trainer.methods)."""
    from trainer.methods import DEFAULT_METHODS, METHODS, methods_help

    return click.option("--methods", default=",".join(DEFAULT_METHODS), show_default=True,
                        metavar="|".join(METHODS) + ",...",
                        help=f"Comma-separated methods to compare on the same tasks, splits, prompts and seeds. "
                             f"{methods_help()}.")(func)


@main.command("sequence", cls=GreedyCommand)
@click.option("--bundle", type=click.Path(file_okay=False), default=None,
              help="CA-SAM bundle folder (created if needed; needed when the methods include casam).")
@click.option("--tasks", "tasks", multiple=True, required=True,
              help="NAME=PATH in training order (several after one --tasks, or repeat the flag).")
@click.option("--ood", "ood", multiple=True,
              help="NAME=PATH of an unseen dataset (images/ + masks/, or volumes + labels/), prepared with the "
                   "bundle's recorded intensity and scored zero-shot after the last stage (repeatable). Reports each "
                   "method's IoU/BIoU, its drop against sam and CA-SAM's rejection rate.")
@_methods_option
@click.option("--out", type=click.Path(file_okay=False), default="sequence_out", show_default=True,
              help="Folder for sequence.json, report.html, <method>_iou_matrix.csv, <method>_biou_matrix.csv "
                   "and the naive baseline's per-stage weights (naive/, never in the bundle).")
@training_options
def sequence_command(bundle: Optional[str], tasks: Sequence[str], ood: Sequence[str], methods: str, out: str, **kw: Any) -> None:
    """The continual protocol: train the tasks in order with every method (CA-SAM tasks already
    in the bundle are kept), score every seen task after each stage, score the --ood sets
    zero-shot at the end, and write IoU/BIoU matrices, Last/Avg/FF and report.html."""
    from trainer.methods import parse_methods
    from trainer.sequence import run_sequence

    _report_file(kw["json_summary"], "--json-summary")
    report = run_sequence(bundle, _pairs(tasks, "--tasks"), out, methods=parse_methods(methods),
                          ood=_pairs(ood, "--ood"), session=_session(kw), config=_config(kw), resize=kw["resize"])
    _emit_summary(report, kw["json_summary"], kw["quiet"])


@main.command("synth")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--style", required=True, help="Synthetic domain: stripes, dots, checker (tasks) or plasma (OOD).")
@click.option("--count", type=int, default=24, show_default=True, help="Number of images.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed; other seeds give disjoint images.")
@click.option("--size", type=int, nargs=2, default=(256, 256), show_default=True, help="Image height and width.")
def synth_command(out: str, style: str, count: int, seed: int, size: tuple[int, int]) -> None:
    """Write a synthetic dataset (OUT/images/*.png + OUT/masks/*.png) of shapes on a textured background."""
    from trainer.synthetic import write_synthetic_task

    root = write_synthetic_task(out, style, count, seed=seed, size=size)
    click.echo(f"wrote {count} {style} images to {root}")


@main.command("pack")
@click.option("--bundle", type=click.Path(exists=True, file_okay=False), required=True, help="Bundle folder holding the task.")
@click.option("--task", required=True, help="Task to pack.")
@click.option("--out", type=click.Path(dir_okay=False), required=True,
              help="Package file to write (e.g. polyp.casam); an existing file is replaced only with --overwrite.")
@click.option("--sign", "sign_key", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Sign the package with this private key (from casam-train keygen).")
@click.option("--redact-split", is_flag=True,
              help="Drop the image stems and the data path from split.json (only counts remain).")
@overwrite_option
def pack_command(bundle: str, task: str, out: str, sign_key: Optional[str], redact_split: bool, overwrite: bool) -> None:
    """Write one task as a single package file: its weights, calibration, split and log, each
    file's sha256, the SAM checkpoint sha256 and preprocessing. It holds no image data."""
    from casam_bundle.package import pack_task

    index = pack_task(bundle, task, out, redact=redact_split, sign_key=sign_key, overwrite=overwrite)
    signed = " (signed)" if sign_key else ""
    click.echo(f"packed task {index['task']['name']!r} into {out}{signed}")


@main.command("unpack")
@click.argument("package", type=click.Path(dir_okay=False))
@click.option("--bundle", type=click.Path(file_okay=False), required=True,
              help="Bundle folder to add the task to (created from the package when absent).")
@click.option("--as", "as_name", default=None, help="Add the task under this name (when its own name is taken).")
@click.option("--trust", type=click.Path(file_okay=False), default=None,
              help="Folder of trusted public keys (*.pub): the package must be signed by one of them.")
@click.option("--require-signatures", is_flag=True,
              help="From now on this bundle refuses every package not signed by a key in --trust.")
@click.option("--check-data", type=click.Path(exists=True, file_okay=False), default=None,
              help="Reference images of the existing tasks, read with the bundle's recorded intensity: warn when "
                   "the new task would take more than --max-takeover of them (SAM runs with the session options).")
@click.option("--max-takeover", type=float, default=None,
              help="Largest share of the --check-data images the new task may take. [default: 0.1]")
@click.option("--strict", is_flag=True, help="Refuse (rather than warn about) a task over --max-takeover.")
@session_options
@wait_option
def unpack_command(package: str, bundle: str, **kw: Any) -> None:
    """Add a task package to a bundle, under the bundle lock, after checking it: archive
    paths, file sha256s, format version, signature, SAM checkpoint and preprocessing, name,
    a finite threshold that its recorded calibration scores reproduce, and loadable weights."""
    from casam_bundle.package import unpack_package
    from trainer.package_check import DEFAULT_MAX_TAKEOVER, package_vet

    report: dict[str, Any] = {}
    if (kw["strict"] or kw["max_takeover"] is not None) and kw["check_data"] is None:
        raise InputError("--strict and --max-takeover need --check-data DIR")
    share = DEFAULT_MAX_TAKEOVER if kw["max_takeover"] is None else kw["max_takeover"]
    vet = package_vet(kw["check_data"], max_share=share, strict=kw["strict"], session=_session(kw), report=report)
    summary = unpack_package(bundle, package, as_name=kw["as_name"], trust=kw["trust"],
                             require_signatures=kw["require_signatures"], vet=vet, wait=kw["wait"])
    signed = f", signed by trusted key {summary['signed_by']}" if summary["signed_by"] else ""
    taken = report.get("takeover")
    checked = f"; takes {taken['taken']}/{taken['images']} reference images" if taken else ""
    click.echo(f"added task {summary['task']!r} to {bundle}{signed}{checked}; tasks: {', '.join(summary['tasks'])}")


@main.command("remove")
@click.option("--bundle", type=click.Path(exists=True, file_okay=False), required=True, help="Bundle folder.")
@click.option("--task", required=True, help="Task to withdraw.")
@click.option("--keep", is_flag=True, help="Move the task's files to removed/ instead of deleting them.")
@wait_option
def remove_command(bundle: str, task: str, keep: bool, wait: float) -> None:
    """Withdraw a task (e.g. when a site revokes consent): it leaves bundle.json, its files are
    deleted (or moved to removed/ with --keep), and bundle.json's history records the name,
    time and files' sha256. The next casam-export drops its graph and rebuilds only the router."""
    from casam_bundle import Bundle, check_task_name

    entry = Bundle.open(bundle, verify=False).remove_task(check_task_name(task), keep=keep, wait=wait)
    where = f"; files kept in {Path(bundle) / entry['kept']}" if entry["kept"] else "; files deleted"
    click.echo(f"removed task {task!r} from {bundle}{where}")


@main.command("keygen")
@click.option("--out", type=click.Path(dir_okay=False), required=True,
              help="Private key file to write; the public key goes to OUT.pub (give that to coordinators).")
@overwrite_option
def keygen_command(out: str, overwrite: bool) -> None:
    """Make a site's Ed25519 key pair for signing task packages (pack --sign)."""
    from casam_bundle.signing import generate_keypair

    private, public, kid = generate_keypair(out, overwrite=overwrite)
    click.echo(f"wrote private key {private} and public key {public} (key id {kid})")


if __name__ == "__main__":
    main(prog_name=PROG)
