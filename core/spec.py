"""The typed run spec: one frozen, validated ``PruneSpec`` (with its ``CalibrationSpec`` and
``EvaluationSpec``) describes a prune, evaluation and save completely; ``to_argv`` and
``from_args`` make the command line and the dashboard's jobs share that one definition."""
from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .checks import choice as _choice, fail as _fail, flag as _flag, fraction as _fraction
from .checks import new_folder as _new_folder, path as _path, target_within_bound as _target_within_bound
from .checks import text as _text, whole as _whole
from .choices import ALLOCATION_METHODS, BOS_MODES, DEFAULT_NSAMPLES, DEFAULT_SEED, DEFAULT_SEQLEN, MAPPINGS
from .choices import PRUNE_METHODS, XMIN_METHODS
from .config import DTYPES
from .texts import EMBEDDED
from .zeroshot import check_task_folder, task_folder, task_names

#: Where a run's per-matrix ratios come from: an allocation method or a ratios file.
ALLOCATIONS = (*ALLOCATION_METHODS, "file")
_NM = re.compile(r"(\d+):(\d+)")
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def untunable(spec: "PruneSpec") -> str:
    """Why ``--epsilon auto`` cannot tune this run ("" when it can)."""
    c, e = spec.calibration, spec.evaluation
    if spec.streaming:
        return "tuning needs the model in memory and a streamed run does not hold it"
    if c.dataset == e.dataset and Path(c.dataset).expanduser().is_file():
        return "the calibration file is also the evaluation text, so held-out text would be evaluation text"
    return ""


def _epsilon(spec: "PruneSpec") -> float | str | None:
    """``"auto"`` when asked, and by default for ``alpha`` on the model's own metrics where it
    can tune (``untunable``: otherwise the paper's 0.3, with a warning when the run starts);
    else a fraction."""
    default = spec.epsilon is None and spec.allocation == "alpha" and spec.metrics_file is None and spec.nm is None
    if spec.epsilon == "auto" or (default and not untunable(spec)):
        if spec.allocation != "alpha":
            _fail("epsilon", "auto", "tunes AlphaPruning's epsilon; use it with allocation alpha")
        if untunable(spec):
            _fail("epsilon", "auto", f"{untunable(spec)}; give a number (0.3 is the paper's) or tune a copy "
                  "that fits in memory on other text")
        return "auto"
    return _fraction("epsilon", spec.epsilon, optional=True)


# --- the spec ----------------------------------------------------------------------------

@dataclass(frozen=True)
class CalibrationSpec:
    """Calibration windows: ``nsamples`` windows of ``seqlen`` tokens of ``dataset`` (seeded),
    BOS by ``bos`` (``core.calibration.BOS_MODES``)."""

    dataset: str = EMBEDDED
    nsamples: int = DEFAULT_NSAMPLES
    seqlen: int = DEFAULT_SEQLEN
    seed: int = DEFAULT_SEED
    bos: str = "auto"

    def __post_init__(self) -> None:
        _text("calibration.dataset", self.dataset)
        _whole("calibration.nsamples", self.nsamples, 1)
        _whole("calibration.seqlen", self.seqlen, 2)
        _whole("calibration.seed", self.seed, 0)
        _choice("calibration.bos", self.bos, BOS_MODES)


@dataclass(frozen=True)
class EvaluationSpec:
    """Perplexity of the pruned model (``evaluate``) on the evaluation part of ``dataset``, BOS by
    ``bos`` (``core.calibration.BOS_MODES``); zero-shot accuracy on the ``zeroshot`` tasks (none:
    not measured; ``core.zeroshot``), the first ``zeroshot_limit`` documents of each, tasks also
    read from ``task_dir``, whose Python code runs only with ``trust_task_code``."""

    evaluate: bool = False
    dataset: str = EMBEDDED
    seqlen: int = DEFAULT_SEQLEN
    max_windows: int | None = None
    bos: str = "auto"
    zeroshot: tuple[str, ...] = ()
    zeroshot_limit: int | None = None
    task_dir: Path | None = None
    trust_task_code: bool = False

    def __post_init__(self) -> None:
        _flag("evaluation.evaluate", self.evaluate)
        _text("evaluation.dataset", self.dataset)
        _whole("evaluation.seqlen", self.seqlen, 2)
        _whole("evaluation.max_windows", self.max_windows, 1, optional=True)
        _choice("evaluation.bos", self.bos, BOS_MODES)
        object.__setattr__(self, "zeroshot", task_names(self.zeroshot) if self.zeroshot else ())
        _whole("evaluation.zeroshot_limit", self.zeroshot_limit, 1, optional=True)
        object.__setattr__(self, "task_dir", task_folder(self.task_dir))
        _flag("evaluation.trust_task_code", self.trust_task_code)
        if self.zeroshot and self.task_dir is not None:   # a task folder is data: its code is refused here
            check_task_folder(self.task_dir, trust_task_code=self.trust_task_code)


@dataclass(frozen=True)
class PruneSpec:
    """Everything that defines one prune run. ``allocation`` is ``file`` exactly when
    ``ratios_file`` is given; ``epsilon`` ``"auto"`` (the default of ``alpha`` with the model's
    own metrics) is tuned when the run starts (``core.fasttune.auto_epsilon``), ``None`` with a
    metrics file (a published profile) is the paper's 0.3; ``r_max`` ``None`` is the default bound;
    with ``nm`` (``"2:4"``) the ratios are not used. Paths are stored absolute. ``devices``
    (two or more) places the run's blocks across these devices of the machine for pruning and
    perplexity (``core.pruning.placement``); ``device`` is then the first of them (the stages that
    run on one device: analysis, OWL scores). One device in ``devices`` is ``device``."""

    model: str = "demo"
    method: str = "wanda"
    allocation: str = "uniform"
    sparsity: float = 0.5
    epsilon: float | str | None = None
    metric: str = "alpha"
    xmin: str = "peak"
    mapping: str = "block"
    r_max: float | None = None
    dense_kinds: tuple[str, ...] = ()
    reverse: bool = False
    ratios_file: Path | None = None
    metrics_file: Path | None = None
    nm: str | None = None
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    device: str = "auto"
    dtype: str = "float32"
    save: Path | None = None
    trust_remote_code: bool = False
    analyze_output: bool = False        # analyse the pruned model (disk cache; recorded in the run's params)
    streaming: bool = False             # models larger than memory: block by block from the shards
    devices: tuple[str, ...] = ()       # the blocks placed across these devices (two or more)

    def __post_init__(self) -> None:
        put = object.__setattr__   # frozen: normalised values are set once, here
        put(self, "model", str(self.model) if isinstance(self.model, os.PathLike) else self.model)
        _text("model", self.model)
        _choice("method", self.method, PRUNE_METHODS)
        _choice("allocation", self.allocation, ALLOCATIONS)
        put(self, "sparsity", _fraction("sparsity", self.sparsity))
        _text("metric", self.metric)
        _choice("xmin", self.xmin, XMIN_METHODS)
        _choice("mapping", self.mapping, MAPPINGS)
        put(self, "r_max", _fraction("r_max", self.r_max, low_open=True, optional=True))
        if self.allocation in ALLOCATION_METHODS and self.nm is None:    # every allocation method caps at r_max
            _target_within_bound(self.sparsity, None, self.r_max)
        kinds = self.dense_kinds.split(",") if isinstance(self.dense_kinds, str) else self.dense_kinds
        put(self, "dense_kinds", tuple(k.strip() for k in kinds if str(k).strip()))
        _flag("reverse", self.reverse)
        put(self, "ratios_file", _path("ratios_file", self.ratios_file, must_exist=True))
        if (self.allocation == "file") != (self.ratios_file is not None):
            _fail("allocation", self.allocation, "a ratios file and allocation 'file' go together; give both "
                  "or neither (--ratios FILE alone is enough)")
        put(self, "metrics_file", _path("metrics_file", self.metrics_file, must_exist=True))
        if self.nm is not None:
            match = _NM.fullmatch(str(self.nm))
            if not match or not 1 <= int(match[1]) < int(match[2]):
                _fail("nm", self.nm, "write N:M with 1 <= N < M, e.g. 2:4 or 4:8")
            if self.ratios_file is not None:
                _fail("nm", self.nm, "N:M sparsity does not use a ratios file; drop one of them")
            if self.dense_kinds:   # the N:M pattern is applied to every matrix: k and v would be pruned anyway
                _fail("nm", self.nm, f"N:M sparsity prunes every matrix in its pattern, so dense kinds "
                      f"({','.join(self.dense_kinds)}) cannot be kept dense; drop the dense kinds or N:M")
        if not isinstance(self.calibration, CalibrationSpec):
            _fail("calibration", self.calibration, "give a CalibrationSpec")
        if not isinstance(self.evaluation, EvaluationSpec):
            _fail("evaluation", self.evaluation, "give an EvaluationSpec")
        if not isinstance(self.device, str) or not _DEVICE.fullmatch(self.device.strip().lower()):
            _fail("device", self.device, "use auto, cpu, cuda, cuda:N or mps")
        self._place_devices()
        _choice("dtype", self.dtype, DTYPES)
        put(self, "save", None if self.save is None else _new_folder("save", self.save))
        _flag("trust_remote_code", self.trust_remote_code)
        _flag("analyze_output", self.analyze_output)
        _flag("streaming", self.streaming)
        put(self, "epsilon", _epsilon(self))     # after the texts and streaming it depends on
        if self.streaming and self.evaluation.zeroshot:
            # the zero-shot harness scores each document with the whole model's forward: not block by block
            _fail("streaming", self.streaming, "--zeroshot needs the whole model in memory (the harness runs "
                  "the full forward per document); run `spectrascope zeroshot` on the --save folder afterwards")

    def _place_devices(self) -> None:
        """``devices`` as names (text: ``core.devices.parse_devices``, a device named twice refused;
        a sequence: each item parsed); one device becomes ``device``, several set ``device`` to the first."""
        given = self.devices
        if not given:
            object.__setattr__(self, "devices", ())
            return
        from .devices import parse_devices     # torch only when devices are given

        if isinstance(given, str):
            names = parse_devices(given)
        elif isinstance(given, (list, tuple)):
            names = [d for item in given for d in parse_devices(str(item))]
        else:
            _fail("devices", given, "give device names, e.g. cuda:0,cuda:1")
        if self.device.strip().lower() not in ("auto", names[0]):
            _fail("devices", ",".join(names), f"--device {self.device} and --devices both given; give one of them")
        object.__setattr__(self, "device", names[0])
        object.__setattr__(self, "devices", tuple(names) if len(names) > 1 else ())
        if self.devices and self.evaluation.zeroshot:
            _fail("devices", ",".join(names), "--zeroshot runs the whole model on one device; drop --devices "
                  "(or run `spectrascope zeroshot` on the --save folder with --device)")

    def check_reachable(self, matrices: object) -> None:
        """Refuse at once an allocation this model cannot have: ``sparsity`` out of reach when
        ``dense_kinds`` stay at 0 and no ratio passes ``r_max`` (``core.allocation.check_reachable``).
        ``matrices``: the model's (``LoadedModel.matrices``) or a table with name, block, kind, params."""
        if self.nm is not None or self.allocation not in ALLOCATION_METHODS:
            return
        from .allocation import check_reachable, matrix_table

        table = matrices if hasattr(matrices, "columns") else matrix_table(matrices)
        check_reachable(table, sparsity=self.sparsity, dense_kinds=self.dense_kinds, r_max=self.r_max)

    @property
    def recorded_device(self) -> str:
        """The run's device as recorded: ``cuda:0`` or the placement's list ``cuda:0,cuda:1``."""
        return ",".join(self.devices) if self.devices else self.device

    @property
    def needs_calibration(self) -> bool:
        """Wanda and SparseGPT need calibration windows, and so do OWL's outlier scores."""
        return self.method != "magnitude" or (self.allocation == "owl" and self.nm is None)

    @property
    def recorded_allocation(self) -> str:
        return "n:m" if self.nm else self.allocation

    def to_argv(self) -> list[str]:
        """The ``spectrascope`` arguments (from ``prune`` on) that describe this spec."""
        c, e = self.calibration, self.evaluation
        argv = ["prune", "--model", self.model, "--method", self.method]
        argv += ["--ratios", str(self.ratios_file)] if self.ratios_file else ["--allocation", self.allocation]
        argv += ["--sparsity", repr(self.sparsity), "--metric", self.metric, "--mapping", self.mapping]
        argv += ["--epsilon", str(self.epsilon) if self.epsilon == "auto" else repr(self.epsilon)] \
            if self.epsilon is not None else []
        argv += ["--xmin", self.xmin] if self.xmin != "peak" else []
        argv += ["--r-max", repr(self.r_max)] if self.r_max is not None else []
        argv += ["--dense-kinds", ",".join(self.dense_kinds)] if self.dense_kinds else []
        argv += ["--reverse"] if self.reverse else []
        argv += ["--metrics", str(self.metrics_file)] if self.metrics_file else []
        argv += ["--nm", self.nm] if self.nm else []
        argv += ["--calib", c.dataset, "--nsamples", str(c.nsamples), "--seqlen", str(c.seqlen), "--seed", str(c.seed)]
        argv += ["--bos", c.bos]
        if e.evaluate:     # the evaluation's options are refused without --eval (they would do nothing)
            argv += ["--eval", "--dataset", e.dataset, "--eval-seqlen", str(e.seqlen)]
            argv += ["--max-windows", str(e.max_windows)] if e.max_windows is not None else []
            argv += ["--eval-bos", e.bos] if e.bos != c.bos else []
        argv += ["--zeroshot", ",".join(e.zeroshot)] if e.zeroshot else []
        argv += ["--zeroshot-limit", str(e.zeroshot_limit)] if e.zeroshot_limit is not None else []
        argv += ["--task-dir", str(e.task_dir)] if e.task_dir else []
        argv += ["--trust-task-code"] if e.trust_task_code else []
        argv += ["--device", self.device, "--dtype", self.dtype]
        argv += ["--devices", ",".join(self.devices)] if self.devices else []
        argv += ["--save", str(self.save)] if self.save else []
        argv += ["--trust-remote-code"] if self.trust_remote_code else []
        argv += ["--analyze-output"] if self.analyze_output else []
        argv += ["--streaming"] if self.streaming else []
        return argv

    def run_spec(self, kind: str = "prune") -> list[str]:
        """What defines this spec's numbers as a ``kind`` run (``prune`` or ``eval``): its
        arguments without where it runs (``--device``, ``--devices``) or where it is saved; the
        registry keeps it, so a sweep run again reuses an identical finished run (``--resume``)."""
        argv, out, skip = self.to_argv(), [], {"--device", "--devices", "--save"}
        if kind == "eval":
            e = self.evaluation
            argv = ["eval", "--model", self.model, "--dtype", self.dtype, "--dataset", e.dataset, "--eval-seqlen",
                    str(e.seqlen), "--max-windows", str(e.max_windows), "--eval-bos", e.bos]
        i = 0
        while i < len(argv):
            if argv[i] in skip:
                i += 2
                continue
            out.append(argv[i])
            i += 1
        return out

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides: object) -> "PruneSpec":
        """The spec of parsed ``spectrascope`` arguments (``prune``'s, or the subset another
        command has: missing options take the defaults); ``overrides`` replace fields."""
        def get(name: str, default: object) -> object:
            value = getattr(args, name, None)
            return default if value is None else value

        seqlen, bos = get("seqlen", DEFAULT_SEQLEN), get("bos", "auto")
        ratios = get("ratios", None)
        fields = dict(
            model=get("model", cls.model), method=get("method", cls.method),
            allocation=get("allocation", "file" if ratios else cls.allocation), sparsity=get("sparsity", cls.sparsity),
            epsilon=get("epsilon", None), metric=get("metric", cls.metric), xmin=get("xmin", cls.xmin),
            mapping=get("mapping", cls.mapping),
            r_max=get("r_max", None), dense_kinds=get("dense_kinds", ()), reverse=get("reverse", False),
            ratios_file=ratios, metrics_file=get("metrics", None), nm=get("nm", None),
            calibration=CalibrationSpec(get("calib", EMBEDDED), get("nsamples", DEFAULT_NSAMPLES), seqlen,
                                        get("seed", DEFAULT_SEED), bos),
            evaluation=EvaluationSpec(get("eval", False), get("dataset", EMBEDDED), get("eval_seqlen", seqlen),
                                      get("max_windows", None), get("eval_bos", bos), zeroshot=get("zeroshot", ()),
                                      zeroshot_limit=get("zeroshot_limit", None), task_dir=get("task_dir", None),
                                      trust_task_code=get("trust_task_code", False)),
            device=get("device", cls.device), dtype=get("dtype", cls.dtype), save=get("save", None),
            trust_remote_code=get("trust_remote_code", False), analyze_output=get("analyze_output", False),
            streaming=get("streaming", False), devices=get("placement_devices", ()))
        return cls(**{**fields, **overrides})
