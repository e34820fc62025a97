"""The methods the continual protocol compares, as one table (CLI choices derive from it).

Every method sees the same task order, splits, prompts, seeds and frozen SAM; the
protocol calls, per stage, ``train`` on the new task and then ``evaluate`` on every set.

- ``casam``: this toolkit, one alignment layer and VAE per task in the bundle, routed.
- ``naive``: the paper's "SAM + AL (naive)", one layer fine-tuned on each task in turn.
- ``sam``: plain frozen SAM, the identity route everywhere; the zero-shot reference.

``sam`` and ``casam`` share one memo per evaluated set: CA-SAM's layer k never changes
once trained and its identity route *is* plain SAM, so an (image, route) pair scored once
is the same number in every later stage and for both methods.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch

from casam_core.files import PathLike
from casam_bundle import Bundle
from models.bundle_models import build_model, load_alignment
from models.casam import CASAM
from models.prompt_decoder import PromptDecoder
from casam_core.errors import InputError
from casam_core.files import read_json
from casam_core.names import IDENTITY
from runtime.preprocess import Preprocessing
from trainer.data import Dataset, Sample
from trainer.evaluate import EvalPass, SetResult, evaluate_set
from trainer.naive import NAIVE_TASK, fine_tune, initial_layer, save_stage, stage_summary
from trainer.session import Session, SessionOptions
from trainer.train_task import TaskOptions, TrainConfig, Trainee, train_task

Memo = dict[tuple[int, int], tuple[float, float]]


@dataclass
class Context:
    """What every method of one protocol run shares."""

    session: Session
    config: TrainConfig
    prep: Preprocessing
    out_dir: Path
    bundle_dir: Optional[Path]
    options: SessionOptions  # as given to the protocol, with the loaded SAM as frozen_sam
    resize: Optional[str]
    memos: dict[str, Memo] = field(default_factory=dict)
    #: The first task, when CA-SAM trained it in this run with this config: naive's stage 1
    #: is the very same training (same seeded init, data, prompts, epochs), so it is reused.
    casam_first_task: Optional[str] = None

    @property
    def quiet(self) -> bool:
        return self.options.quiet

    def memo(self, set_name: str) -> Memo:
        """The (image, route) → (IoU, BIoU) memo of one set, shared by ``sam`` and ``casam``."""
        return self.memos.setdefault(set_name, {})


class MethodRun(abc.ABC):
    """One method through the protocol: ``train`` per stage, then ``evaluate`` per set.

    Abstract so that a method missing ``evaluate`` fails when it is constructed, not at the
    first evaluated set after a whole stage of training. ``train`` keeps its do-nothing
    default: a method that learns nothing (``sam``) is a legitimate method.
    """

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.trained: list[dict[str, Any]] = []
        self.model: CASAM = CASAM(ctx.session.sam.model).to(ctx.session.device)

    def train(self, stage: int, name: str, path: PathLike, dataset: Dataset, train_emb: torch.Tensor) -> None:
        """Learn task ``name`` (stage is 0-based); the default learns nothing."""

    @abc.abstractmethod
    def evaluate(self, set_name: str, samples: Sequence[Sample], embeddings: torch.Tensor, seen: bool) -> SetResult:
        """Score ``samples`` of set ``set_name`` with the model as it is now; ``seen``: a task already trained."""


class SamRun(MethodRun):
    def evaluate(self, set_name: str, samples: Sequence[Sample], embeddings: torch.Tensor, seen: bool) -> SetResult:
        return evaluate_set(self.model, embeddings, samples, self.ctx.prep, set_name,
                            EvalPass(task=IDENTITY, memo=self.ctx.memo(set_name)), self.ctx.quiet)


class CasamRun(MethodRun):
    """Tasks already in the bundle (an interrupted run) are kept, not retrained."""

    def __init__(self, ctx: Context) -> None:
        if ctx.bundle_dir is None:
            raise InputError("method 'casam' needs --bundle (the bundle its tasks are added to)")
        super().__init__(ctx)
        self.names: list[str] = []

    def _in_bundle(self, name: str) -> bool:
        root = self.ctx.bundle_dir
        return (root / "bundle.json").exists() and name in Bundle.open(root, verify=False).task_names

    def train(self, stage: int, name: str, path: PathLike, dataset: Dataset, train_emb: torch.Tensor) -> None:
        ctx = self.ctx
        if not self._in_bundle(name):
            if stage == 0:
                ctx.casam_first_task = name
            self.trained.append(train_task(ctx.bundle_dir, name, path, session=ctx.options, config=ctx.config,
                                           options=TaskOptions(resize=ctx.resize)))
        self.names.append(name)
        bundle = Bundle.open(ctx.bundle_dir)
        self.model = build_model(bundle, ctx.session.sam.model, self.names).to(ctx.session.device)

    def evaluate(self, set_name: str, samples: Sequence[Sample], embeddings: torch.Tensor, seen: bool) -> SetResult:
        return evaluate_set(self.model, embeddings, samples, self.ctx.prep, set_name,
                            EvalPass(expected=set_name if seen else None, memo=self.ctx.memo(set_name)), self.ctx.quiet)


class NaiveRun(MethodRun):
    """One layer, trained on every task in turn; its weights after each stage go under --out."""

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.layer = initial_layer(ctx.config, ctx.session.device)
        self.decoder = PromptDecoder(ctx.session.sam.model).to(ctx.session.device)

    def train(self, stage: int, name: str, path: PathLike, dataset: Dataset, train_emb: torch.Tensor) -> None:
        ctx = self.ctx
        t0 = time.time()
        if stage == 0 and ctx.casam_first_task == name:
            # Bit-identical to training it again: CA-SAM's task-1 layer started from the same
            # seeded init and saw the same batches and prompts (see Context.casam_first_task).
            self.layer.load_state_dict(load_alignment(Bundle.open(ctx.bundle_dir), name).state_dict())
            log = read_json(Bundle.open(ctx.bundle_dir).task_dir(name) / "train_log.json")["epochs"]
        else:
            trainee = Trainee(self.layer, self.decoder, torch.optim.Adam(self.layer.parameters(), lr=ctx.config.lr),
                              ctx.session.device)
            log = fine_tune(trainee, train_emb, dataset.train, ctx.prep, ctx.config, desc=f"naive {name}",
                            quiet=ctx.quiet)
        weights = save_stage(self.layer, ctx.out_dir, stage + 1, name)
        self.trained.append(stage_summary(name, log, weights, time.time() - t0))
        self.model = CASAM(ctx.session.sam.model, [NAIVE_TASK], [self.layer]).to(ctx.session.device).eval()

    def evaluate(self, set_name: str, samples: Sequence[Sample], embeddings: torch.Tensor, seen: bool) -> SetResult:
        return evaluate_set(self.model, embeddings, samples, self.ctx.prep, set_name, EvalPass(task=NAIVE_TASK),
                            self.ctx.quiet)


@dataclass(frozen=True)
class Method:
    name: str
    label: str  # as the paper's tables name it
    summary: str
    trains: bool
    start: Callable[[Context], MethodRun]


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("casam", "CA-SAM", "one alignment layer + VAE per task, routed (this toolkit)", True, CasamRun),
    Method("naive", "SAM + AL (naive)", "one alignment layer fine-tuned on each task in turn, no router", True,
           NaiveRun),
    Method("sam", "SAM", "plain frozen SAM, the identity route everywhere (zero-shot reference)", False, SamRun),
)}
#: The zero-shot reference: drops are measured against this method's numbers.
REFERENCE = "sam"
DEFAULT_METHODS = ("casam", "naive", "sam")


def parse_methods(value: Union[str, Sequence[str]]) -> list[str]:
    """"casam,naive,sam" (or a list) → distinct known method names, in the order given."""
    items = [v.strip() for v in (value.split(",") if isinstance(value, str) else value)]
    items = [v for v in items if v]
    unknown = [v for v in items if v not in METHODS]
    if unknown or not items:
        raise InputError(f"unknown method(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                         f"choose from {', '.join(METHODS)}")
    return list(dict.fromkeys(items))


def methods_help() -> str:
    return "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values())
