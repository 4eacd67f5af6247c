"""One typed job config for every entry point (train, tune, submit, eval).

YAML files in ``jobs/`` hold a ``JobConfig``; ``--set a.b=c`` overrides any key; unknown keys are
errors that list the valid ones. Every field carries a one-line comment: the config is the manual.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ran.data import DEFAULT_MAX_PIXELS, check_decode


class ConfigError(ValueError):
    """A job config that cannot be used; the message says what to change."""


# The recipes in jobs/ write this where the user's bucket goes (s3://YOUR-BUCKET/runs). A
# placeholder storage.path falls back to the embedded default (./runs) with a note; any other
# placeholder (data.path) is refused at pre-flight, naming the key (check_placeholders).
PLACEHOLDER = "YOUR-"


class DuplicateKeyError(yaml.YAMLError):
    """A YAML mapping gives one key twice (``key``: dotted path; ``lines``: 1-based, both)."""

    def __init__(self, key: str, lines: tuple[int, int]) -> None:
        super().__init__(f"key {key!r} is given twice, at lines {lines[0]} and {lines[1]}")
        self.key, self.lines = key, lines


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping key given twice (PyYAML keeps the last one
    silently: ``name: a`` then ``name: b`` would train b without a word). Keys merged in with
    ``<<`` may be overridden, as YAML's merge key intends. Every YAML file ran reads goes through
    it (:func:`load_yaml`).
    """

    def construct_document(self, node: yaml.Node) -> Any:
        _refuse_duplicates(node, "", set())
        return super().construct_document(node)


def _refuse_duplicates(node: yaml.Node, path: str, seen: set[int]) -> None:
    """Raise DuplicateKeyError for the first key given twice in any mapping under ``node``."""
    if id(node) in seen:  # an alias to a node already checked
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else id(key_node)
            dotted = f"{path}{key}" if isinstance(key, str) else f"{path}<key>"
            line = key_node.start_mark.line + 1
            if key in first:
                raise DuplicateKeyError(dotted, (first[key], line))
            first[key] = line
            _refuse_duplicates(value_node, dotted + ".", seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicates(item, f"{path[:-1] if path else ''}[{i}].", seen)


def load_yaml(text: str) -> Any:
    """Parse YAML text with :class:`UniqueKeyLoader` (safe tags only, no duplicate keys).

    Raises:
        DuplicateKeyError: a mapping gives one key twice (a ``yaml.YAMLError``).
        yaml.YAMLError: the text is not valid YAML.
    """
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name: str = "attention56"  # a name from `ran models`
    stem: Literal["imagenet", "cifar"] | None = None  # None: from data.recipe
    num_classes: int | None = Field(None, ge=1)  # None: from the data manifest
    depth: int | None = Field(None, ge=1)  # None: the name's depth (attention56 -> 56)
    p: int | None = Field(None, ge=0)  # units before and after each attention module
    t: int | None = Field(None, ge=1)  # trunk units per module
    r: int | None = Field(None, ge=1)  # mask units between poolings
    unit: Literal["bottleneck", "resnext", "inception"] | None = None  # None: the model's own
    # The attention options: None is the model's own (mixed, arl, encoder_decoder); a model
    # without attention modules (resnet152, preact_resnet164) refuses any other value.
    mask_activation: Literal["mixed", "channel", "spatial"] | None = None  # f1 / f2 / f3
    combination: Literal["arl", "nal"] | None = None  # (1 + M) * T or M * T
    mask_structure: Literal["encoder_decoder", "local"] | None = None  # Table 4 ablation
    # Fine-tuning: start from these weights (models:/NAME@ALIAS or /VERSION, an MLflow run id, a
    # checkpoint or state_dict file); a classifier of another num_classes is re-initialised.
    init_from: str | None = None  # None: a fresh initialisation


class DataConfig(_Section):
    path: str = "data/synth"  # directory or s3:// prefix holding manifest.json and the shards
    train_split: str = "train"  # split name used for training
    val_split: str = "val"  # split name used for validation
    recipe: Literal["imagenet", "cifar"] = "cifar"  # augmentation + normalisation recipe
    crop: int | None = Field(None, ge=8)  # train crop; None: 224 (imagenet) or 32 (cifar)
    eval_crop: int | None = Field(None, ge=8)  # eval centre crop; None: the model's (320 for A-92)
    batch_size: int = Field(64, ge=1)  # per worker
    workers: int = Field(2, ge=0)  # DataLoader processes per training worker
    max_bad_fraction: float = Field(0.01, ge=0, le=1)  # fail when more samples than this are bad
    # Images whose header gives more pixels are bad samples, never decoded (also in serving).
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)
    # Who decodes JPEGs: cpu, the loader workers; gpu, the training device (nvJPEG on a GPU, the
    # same pipeline on a CPU; imagenet recipe only); auto, gpu when the workers have GPUs.
    decode: Literal["cpu", "gpu", "auto"] = "cpu"


class OptimConfig(_Section):
    lr: float = Field(0.1, gt=0)  # learning rate at the reference batch size
    reference_batch_size: int = Field(256, ge=1)  # lr scales linearly: lr * global_batch / this
    momentum: float = Field(0.9, ge=0, lt=1)  # SGD momentum
    nesterov: bool = True  # Nesterov momentum (the paper's CIFAR recipe)
    weight_decay: float = Field(1e-4, ge=0)  # L2 penalty
    no_decay_bn_bias: bool = False  # exempt BatchNorm and bias parameters from weight decay
    label_smoothing: float = Field(0.0, ge=0, lt=1)  # cross-entropy label smoothing


class ScheduleConfig(_Section):
    # The paper's schedules are in iterations at optim.reference_batch_size. Milestones are used as
    # fractions of total_steps, so they land at the same point of any run length (train.epochs).
    kind: Literal["step", "cosine", "constant"] = "step"  # lr schedule
    milestones: list[int] = [64_000, 96_000]  # step: lr *= gamma at these iterations
    total_steps: int | None = Field(160_000, ge=1)  # iterations of the whole run (reference batch)
    gamma: float = Field(0.1, gt=0, le=1)  # step: lr factor at each milestone
    warmup_epochs: float = Field(0.0, ge=0)  # linear warmup length (any schedule)
    min_lr: float = Field(0.0, ge=0)  # cosine: final learning rate


class TrainConfig(_Section):
    epochs: int | None = Field(None, ge=1)  # None: schedule.total_steps (rescaled) sets the length
    # autocast dtype; auto: what `ran bench` measured fastest on this device kind (the step table,
    # ran/steptable.py), else bf16 where the hardware computes it natively (a GPU with bf16, a CPU
    # with AMX or AVX512-BF16), else fp32; the run's ran.precision_reason tag says which. fp16 adds
    # a grad scaler (its loss scale is checkpointed).
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool = True  # NHWC memory format (fastest on AMX CPUs and tensor cores)
    # torch.compile mode; off: eager; auto: the mode `ran bench` measured fastest for this model on
    # this device kind, else off. true/false are read as default/off.
    compile: Literal["off", "auto", "default", "reduce-overhead", "max-autotune",
                     "max-autotune-no-cudagraphs"] = "off"
    # capture the whole step (forward, backward, optimizer, BN statistics) as one CUDA graph and
    # replay it: no launch overhead (GPU only; bf16 or fp32; train.grad_accum 1)
    cuda_graph: bool = False
    sync_batchnorm: bool = False  # SyncBatchNorm across workers
    grad_accum: int = Field(1, ge=1)  # micro-batches per optimizer step
    seed: int = 0  # seeds model init, data order and augmentation
    log_every: int = Field(20, ge=1)  # log train loss and lr every N steps
    eval_every: int = Field(1, ge=1)  # validate every N epochs (and always at the end)
    checkpoint_every: int = Field(1, ge=1)  # checkpoint every N epochs (and always at the end)
    checkpoint_every_steps: int | None = Field(None, ge=1)  # and every N optimizer steps; None: off
    # async: workers train on while the previous checkpoint uploads (Ray Train's ASYNC
    # checkpoint_upload_mode, one upload at a time); sync: they wait for each upload.
    checkpoint_upload: Literal["async", "sync"] = "async"
    keep_checkpoints: int = Field(2, ge=1)  # best checkpoints kept besides the latest

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_bool(cls, value: Any) -> Any:
        # Jobs and checkpoints written before the modes existed say true/false.
        if isinstance(value, bool):
            return "default" if value else "off"
        return value


class ScalingConfig(_Section):
    # Ray Train workers (one process each): N, or an elastic group [min, max] that starts once min
    # can be placed, grows to max as resources appear and continues with fewer after losing some.
    num_workers: int | list[int] = 2
    # one GPU per worker: true, false, or auto: GPUs when the Ray cluster has any (the local Ray:
    # this machine's), decided when Ray is up; the run's scaling.use_gpu param says which
    use_gpu: bool | Literal["auto"] = False
    cpus_per_worker: float = Field(1.0, gt=0)  # CPUs reserved per worker
    max_failures: int = Field(2, ge=0)  # worker-group restarts before the run fails

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, value: int | list[int]) -> int | list[int]:
        if isinstance(value, int):
            if value < 1:
                raise ValueError("needs at least 1 worker")
        elif len(value) != 2 or not 1 <= value[0] <= value[1]:
            raise ValueError("an elastic group is [min, max] with 1 <= min <= max")
        return value

    @property
    def elastic(self) -> bool:
        """Whether num_workers is a [min, max] range."""
        return isinstance(self.num_workers, list)

    @property
    def min_workers(self) -> int:
        """Workers a run needs to start (num_workers, or min of the range)."""
        return self.num_workers[0] if isinstance(self.num_workers, list) else self.num_workers

    @property
    def max_workers(self) -> int:
        """Workers a run uses at most (num_workers, or max of the range)."""
        return self.num_workers[1] if isinstance(self.num_workers, list) else self.num_workers


class StorageConfig(_Section):
    path: str = "runs"  # Ray Train storage: local directory or s3://bucket/prefix
    name: str | None = None  # run directory name; None: derived from the job name


class TrackingConfig(_Section):
    experiment: str = "ran"  # MLflow experiment
    registered_model: str | None = "ran-model"  # MLflow registered model name; None: don't register
    run_name: str | None = None  # MLflow run name; None: the storage name
    log_model: bool = True  # log the final model to MLflow (and register it when registered_model is set)
    system_metrics_every_s: float = Field(10.0, ge=0)  # MLflow system metrics sampling period per node; 0: off
    # Registration gate (the model is logged either way): a minimum validation top-1, and an alias
    # whose holder the model must beat (strictly higher recorded eval/top1 on the same data).
    register_min_top1: float | None = Field(None, ge=0, le=1)  # None: no minimum
    register_if_beats: str | None = None  # e.g. champion; None: no comparison


class JobConfig(_Section):
    name: str = "job"  # job name: the default run and storage directory name
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "JobConfig":
        t = self.train
        if t.cuda_graph:
            if not self.scaling.use_gpu:
                raise ValueError("train.cuda_graph=true needs scaling.use_gpu=true (it captures GPU "
                                 "work); on a CPU, train.compile=default removes most launch overhead")
            if t.precision == "fp16":
                raise ValueError("train.cuda_graph=true runs bf16 or fp32 steps (fp16's grad scaler "
                                 "checks for infs on the host inside the step); set train.precision=bf16")
            if t.grad_accum != 1:
                raise ValueError("train.cuda_graph=true captures one micro-batch a step; set "
                                 "train.grad_accum=1")
            if t.compile in ("reduce-overhead", "max-autotune"):
                raise ValueError(f"train.compile={t.compile} makes CUDA graphs of its own; with "
                                 "train.cuda_graph=true use train.compile=default, "
                                 "max-autotune-no-cudagraphs or off")
        if self.schedule.kind == "step" and sorted(self.schedule.milestones) != list(
            self.schedule.milestones
        ):
            raise ValueError("schedule.milestones must be increasing")
        if self.train.epochs is None and self.schedule.total_steps is None:
            raise ValueError("set train.epochs or schedule.total_steps: the run needs a length")
        if self.schedule.total_steps and any(m > self.schedule.total_steps for m in self.schedule.milestones):
            raise ValueError("schedule.milestones must not exceed schedule.total_steps")
        check_decode(self.data.decode, self.data.recipe)  # the data path's own rule (a ValueError)
        if self.train.sync_batchnorm and not self.scaling.use_gpu:
            raise ValueError("train.sync_batchnorm needs scaling.use_gpu=true (PyTorch's "
                             "SyncBatchNorm is GPU-only)")
        return self

    def with_gpu(self, has_gpus: bool) -> "JobConfig":
        """``scaling.use_gpu: auto`` decided: true when the cluster has GPUs (``has_gpus``);
        true and false stay as they are.

        Raises:
            ConfigError: auto became false under an option that needs GPUs (train.cuda_graph,
                train.sync_batchnorm).
        """
        if self.scaling.use_gpu != "auto":
            return self
        return self.with_values({"scaling.use_gpu": has_gpus})

    def with_values(self, changes: dict[str, Any]) -> "JobConfig":
        """A copy with dotted keys set (``{"data.path": "/abs"}``), through the one setter
        :func:`apply_overrides` uses for ``--set`` and Tune spaces; the result is validated whole,
        so a change that breaks a cross-field rule is refused too.

        Raises:
            ConfigError: an unknown key or an invalid value (one line naming the key).
        """
        raw = apply_overrides(self.model_dump(), changes)
        return parse_config(raw, f"(with {', '.join(changes)})", frozenset(changes), label="value")

    def resolve(self, *, data_path: str, num_classes: int, storage_path: str) -> "JobConfig":
        """The config a run uses: absolute data and storage paths, ``model.num_classes`` from the
        data (pre-flight reads them; workers, checkpoints and logged models get this config).

        Raises:
            ConfigError: ``model.num_classes`` was set and differs from the data's.
        """
        if self.model.num_classes not in (None, num_classes):
            raise ConfigError(f"model.num_classes={self.model.num_classes} but {data_path} has "
                              f"{num_classes} classes; leave model.num_classes unset to take it "
                              "from the manifest")
        return self.with_values({"data.path": data_path, "model.num_classes": num_classes,
                                 "storage.path": storage_path})

    @property
    def run_name(self) -> str:
        return self.storage.name or self.name

    def resolved_stem(self) -> str:
        return self.model.stem or self.data.recipe

    def placeholders(self) -> list[str]:
        """Dotted keys whose value is a recipe's placeholder (contains :data:`PLACEHOLDER`, as in
        ``s3://YOUR-BUCKET/runs``): values the user is meant to replace."""
        return [k for k, v in self.flat().items() if isinstance(v, str) and PLACEHOLDER in v]

    def flat(self) -> dict[str, Any]:
        """Dotted key -> value, the form MLflow params and Tune spaces use."""
        return flatten(self.model_dump())

    def applicable(self) -> dict[str, Any]:
        """:meth:`flat` without the options this run does not use (a training run's MLflow params):
        ``schedule.milestones`` and ``gamma`` unless the schedule is ``step``, ``schedule.min_lr``
        unless it is ``cosine``, and ``schedule.total_steps`` when ``train.epochs`` sets the length
        and no step milestones are placed by it."""
        sched = self.schedule
        unused = set()
        if sched.kind != "step":
            unused |= {"schedule.milestones", "schedule.gamma"}
        if sched.kind != "cosine":
            unused.add("schedule.min_lr")
        if self.train.epochs is not None and sched.kind != "step":
            unused.add("schedule.total_steps")
        return {k: v for k, v in self.flat().items() if k not in unused}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(), sort_keys=False)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def valid_keys() -> list[str]:
    """Every dotted key a job (or a --set, or a Tune space) may set."""
    return sorted(JobConfig().flat())


def check_keys(keys: list[str], where: str = "", known: list[str] | None = None) -> None:
    """Refuse a dotted key that is not one of ``known`` (default: :func:`valid_keys`).

    Raises:
        ConfigError: ``WHERE: unknown config key 'K'; valid keys: ...`` (the key's section's).
    """
    known = valid_keys() if known is None else known
    for key in keys:
        if key not in known:
            raise ConfigError(f"{where}: " * bool(where) + _unknown_key_message(key, known))


def set_dotted(tree: dict[str, Any], dotted: str, value: Any, known: list[str] | None = None,
               where: str = "") -> dict[str, Any]:
    """Set ``a.b.c`` in a raw config tree (nested dicts), the one dotted-key setter of ran: ``--set``,
    a Tune space's ``set:`` and searched values, ``search.*`` settings and
    :meth:`JobConfig.with_values` all go through it. ``known``: the keys that may be set
    (default: :func:`valid_keys`); returns ``tree``.

    Raises:
        ConfigError: an unknown key, or a key below a value that is not a section.
    """
    check_keys([dotted], where, known)
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: " * bool(where) + f"{dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value
    return tree


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["a.b=value", ...]`` (``--set``) -> ``{"a.b": value}``, values read as plain YAML.

    Raises:
        ConfigError: an item without ``=``, or a value that is not plain YAML.
    """
    pairs: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. optim.lr=0.05")
        key, text = item.split("=", 1)
        pairs[key.strip()] = _override_value(item, text)
    return pairs


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any] | list[str]) -> dict[str, Any]:
    """Apply ``{"a.b": value}`` or ``["a.b=value", ...]`` (values parsed as YAML) to a raw tree
    with :func:`set_dotted`; returns ``raw``.

    Raises:
        ConfigError: an unknown key or a malformed ``--set`` item.
    """
    if isinstance(overrides, list):
        overrides = parse_set(overrides)
    keys = valid_keys()
    for key, value in overrides.items():
        set_dotted(raw, key, value, keys)
    return raw


def _override_value(item: str, text: str) -> Any:
    """The value of ``--set KEY=TEXT``: ``TEXT`` read as plain YAML (safe_load: no tags).

    Raises:
        ConfigError: one line when ``TEXT`` is not plain YAML, such as a tag (``!!python/object``,
            ``!foo``) or an unclosed bracket.
    """
    if not text:
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"--set {item!r}: not a plain YAML value ({problem}); give a number, a "
                          "word, true/false or a list like [a, b], quoted if it has special "
                          "characters (YAML tags such as !!python/object are never read)") from None


def _unknown_key_message(key: str, known: list[str] | None = None) -> str:
    known = valid_keys() if known is None else sorted(known)
    section = key.split(".")[0]
    keys = [k for k in known if k.startswith(section + ".")]
    if not keys and section == "search":
        return f"unknown config key {key!r}: search.* keys size a search, given to `ran tune`"
    return f"unknown config key {key!r}; valid keys: {', '.join(keys or known)}"


def _format_validation_error(err: ValidationError, source: str,
                             overridden: frozenset[str] = frozenset(), label: str = "--set") -> str:
    """One line for every problem: those of keys given with ``--set`` (``overridden``) under
    ``invalid --set`` (``label``: how they were given), the rest under ``invalid job config
    SOURCE``."""
    from_file, from_set = [], []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            line = _unknown_key_message(loc)
        else:
            where = f"{loc}: " if loc else ""
            line = f"{where}{e['msg']} (got {e.get('input')!r})"
        given = any(loc == key or loc.startswith(key + ".") for key in overridden)
        (from_set if given else from_file).append(line)
    parts = [f"invalid {label} {'; '.join(from_set)}"] if from_set else []
    if from_file:
        parts.append(f"invalid job config {source}: " + "; ".join(from_file))
    return "; ".join(parts)


def parse_config(raw: dict[str, Any], source: str = "<dict>",
                 overridden: frozenset[str] = frozenset(), label: str = "--set") -> JobConfig:
    """Validate a raw config tree from ``source`` (named in errors); ``overridden``: the dotted
    keys the user gave with ``--set``, whose errors are named as theirs.

    Raises:
        ConfigError: one line naming each invalid value and where it came from.
    """
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source, overridden, label)) from None


def fill_placeholders(cfg: JobConfig) -> tuple[JobConfig, list[str]]:
    """``cfg`` with a placeholder ``storage.path`` replaced by the embedded default (``runs``),
    and a one-line note for each replacement."""
    if "storage.path" not in cfg.placeholders():
        return cfg, []
    default = StorageConfig.model_fields["path"].default
    note = (f"note: storage.path {cfg.storage.path} is the recipe's placeholder; runs go to "
            f"./{default} (the embedded default): set storage.path to keep them elsewhere")
    return cfg.with_values({"storage.path": default}), [note]


def check_placeholders(cfg: JobConfig) -> None:
    """Refuse a placeholder that has no default (``data.path: s3://YOUR-BUCKET/shards/...``).

    Raises:
        ConfigError: one line naming the key and how to set it.
    """
    for key in cfg.placeholders():
        value = cfg.flat()[key]
        hint = (" (shards written by `ran data build` or `ran data synth`)"
                if key == "data.path" else "")
        raise ConfigError(f"{key} {value} is the recipe's placeholder: give yours with --set "
                          f"{key}=...{hint}")


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | list[str] | None = None
) -> JobConfig:
    """Load a job YAML (or the embedded defaults when ``path`` is None) and apply overrides; a
    placeholder ``storage.path`` becomes the embedded default, with a note on stderr
    (:func:`fill_placeholders`).

    Raises:
        ConfigError: an unreadable file, invalid YAML, a key given twice (named with both line
            numbers), an unknown key or an invalid value (one line each).
    """
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ConfigError(f"cannot read job config {path}: {err.strerror}") from None
        try:
            raw = load_yaml(text) or {}
        except DuplicateKeyError as err:
            raise ConfigError(f"job config {path}: {err}; keep one") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"job config {path} is not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"job config {path} must be a mapping of sections, got {type(raw).__name__}")
        raw.setdefault("name", Path(path).stem)
    overrides = parse_set(overrides) if isinstance(overrides, list) else (overrides or {})
    raw = apply_overrides(raw, overrides)
    cfg, notes = fill_placeholders(parse_config(raw, source, frozenset(overrides)))
    for note in notes:
        print(note, file=sys.stderr)
    return cfg
