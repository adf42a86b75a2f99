"""Typed schemas of every config group and top-level section (Hydra structured configs).

Each YAML option in ``conf/<group>/`` starts from one of these dataclasses (its defaults list
names ``/schema/<group>/<kind>@_here_``), so composing a config already rejects a key the schema
does not have, or a value of the wrong type, with the key's full name. What a type cannot say --
ranges, choices, fields that only make sense together -- is declared next to the field
(:func:`setting`) or in a ``check()`` method, and :func:`lpcvlab.config.load_settings` verifies it
before any MLflow run or compute. Cross-group combinations are checked in
:mod:`lpcvlab.config.checks`.

This module imports nothing heavy: ``python run.py`` reads it before torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import MISSING as _DC_MISSING
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, ClassVar

from omegaconf import MISSING

from lpcvlab.errors import ConfigError

# The stages whose results the stage cache can reuse (``cache.stages``).
CACHE_STAGES = ("export", "quantize", "compile", "profile", "inference")
FRAME_SELECTIONS = ("lpcvc_sample", "dynamic_fps", "uniform_span")
PIL_FILTERS = ("nearest", "bilinear", "bicubic", "lanczos")
# AI Hub refuses datasets over 2 GB.
AIHUB_DATASET_LIMIT_BYTES = 2 * 1024**3
# Deployment precisions of one component: float, float16, int8 weights with int16 or int8
# activations (``precision`` group).
PRECISIONS = ("fp32", "fp16", "w8a16", "w8a8")
QUANTIZED = ("w8a16", "w8a8")  # the precisions that need calibration data
# Fewer samples than this cannot calibrate activation ranges worth measuring.
MIN_CALIBRATION_SAMPLES = 8
# CLIP's text positions, and the MLP activations backbone.activation swaps in.
MAX_CONTEXT_LENGTH = 77
ACTIVATIONS = ("gelu", "gelu_sigmoid", "relu")
# NPU-safe ONNX graph rewrites (``export.rewrites``; :mod:`lpcvlab.deploy.rewrites`). The GELU
# without Erf is ``backbone.activation=gelu_sigmoid`` (in the model), not a rewrite.
REWRITES = ("finite_mask", "matmul_conv1x1", "fold_attention_scale", "drop_transposes")
LINT_MODES = ("error", "warn", "off")  # ``export.lint``


def setting(
    default: Any = _DC_MISSING,
    *,
    factory: Any = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    choices: tuple[Any, ...] | None = None,
    each: bool = False,
) -> Any:
    """A dataclass field with a constraint checked by :func:`validate` (``each``: per list item)."""
    meta = {"ge": ge, "gt": gt, "le": le, "choices": choices, "each": each}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=MISSING if default is _DC_MISSING else default, metadata=meta)


# --------------------------------------------------------------------------- groups

TENSOR_DTYPES = ("float32", "float16", "int32", "int64", "uint8", "int8", "uint16", "int16")


@dataclass
class TensorContract:
    """One tensor as the organisers' harness feeds it to a compiled model or reads it back."""

    name: str = MISSING
    dtype: str = setting(MISSING, choices=TENSOR_DTYPES)
    shape: list[int] | None = setting(None, ge=1, each=True)  # null: the rules fix none
    layout: str | None = None  # how the shape reads: NCHW, NTHWC, tokens


@dataclass
class ComponentContract:
    """What one submitted model takes and gives."""

    input: TensorContract = MISSING
    output: TensorContract = MISSING


@dataclass
class RetrievalContract:
    """``track.contract`` of Track 1: the organisers' 2026 sample uploads ``image``
    (1,3,224,224) float32 in [0, 1] and ``text`` (1,77) int32 token IDs (int64 compiled with
    --truncate_64bit_io), and reads ``output_0`` of each model as float embeddings."""

    quantized_io: bool = False  # integer I/O with a scale / zero point accepted
    image_encoder: ComponentContract = field(
        default_factory=lambda: ComponentContract(
            TensorContract("image", "float32", [1, 3, 224, 224], "NCHW"),
            TensorContract("output_0", "float32"),
        )
    )
    text_encoder: ComponentContract = field(
        default_factory=lambda: ComponentContract(
            TensorContract("text", "int32", [1, 77], "tokens"),
            TensorContract("output_0", "float32"),
        )
    )


@dataclass
class VideoContract:
    """``track.contract`` of Track 2: the organisers' 2026 sample feeds ``video`` channel-last
    (1,T,112,112,3) float32 in [0, 1], T = ``frames``, and reads ``class_probs`` (logits)."""

    quantized_io: bool = False
    frames: int = setting(16, ge=1)
    video_classifier: ComponentContract = field(
        default_factory=lambda: ComponentContract(
            TensorContract("video", "float32", [1, 16, 112, 112, 3], "NTHWC"),
            TensorContract("class_probs", "float32"),
        )
    )

    def check(self, prefix: str) -> None:
        shape = self.video_classifier.input.shape
        if shape is not None and (len(shape) != 5 or shape[1] != self.frames):
            raise ConfigError(
                f"{prefix}.video_classifier.input.shape={shape} does not hold {prefix}.frames="
                f"{self.frames} frames as (1, T, H, W, 3); set the frame count in {prefix}.frames"
            )


@dataclass
class TrackConfig:
    """``track``: which competition track, the metric returned to sweepers, and the submission
    contract (``contract``: what the organisers' harness feeds each model and reads back)."""

    what: ClassVar[str] = "a track"
    name: str = MISSING
    objective: str = MISSING
    # The competition's latency limit (sum of the components' device latencies) that
    # ``lpcvlab submit`` checks; null = unchecked.
    budget_ms: float | None = setting(None, gt=0)

    def metrics(self) -> tuple[str, ...]:
        """Scalar metrics this track reports (what ``objective`` may name)."""
        raise NotImplementedError

    def components(self) -> tuple[str, ...]:
        """The networks this track deploys (what ``precision.per_component`` may name)."""
        raise NotImplementedError

    def contract_of(self, component: str) -> ComponentContract | None:
        """``track.contract.<component>``: what the organisers feed and read (None: no rule)."""
        return getattr(getattr(self, "contract", None), component, None)

    def quantized_io(self) -> bool:
        """Whether the contract accepts integer I/O with a scale and zero point."""
        return bool(getattr(getattr(self, "contract", None), "quantized_io", False))


@dataclass
class RetrievalTrackConfig(TrackConfig):
    what: ClassVar[str] = "track=retrieval"
    name: str = "retrieval"
    objective: str = "recall_at_10"
    recall_ks: list[int] = setting(factory=lambda: [1, 5, 10], ge=1, each=True)
    contract: RetrievalContract = field(default_factory=RetrievalContract)

    def metrics(self) -> tuple[str, ...]:
        ks = sorted({*self.recall_ks, 10})
        return (
            *(f"recall_at_{k}" for k in ks),
            "hit_at_10",
            "best_achievable_recall_at_10",
            "recall_at_10_sample_scripts",
        )

    def components(self) -> tuple[str, ...]:
        return ("image_encoder", "text_encoder")


@dataclass
class VideoTrackConfig(TrackConfig):
    what: ClassVar[str] = "track=video"
    name: str = "video"
    objective: str = "top1"
    # false: the exported model takes (1,3,T,H,W) and hub=aihub compiles it channel-last;
    # true: the exported graph itself takes (1,T,H,W,3).
    channel_last: bool = False
    contract: VideoContract = field(default_factory=VideoContract)

    def metrics(self) -> tuple[str, ...]:
        return ("top1", "top5", "clip_top1", "clip_top5")

    def components(self) -> tuple[str, ...]:
        return ("video_classifier",)


@dataclass
class BackboneConfig:
    what: ClassVar[str] = "a backbone"
    name: str = MISSING
    # A weights tag (an open_clip tag, kinetics400), a checkpoint file path, or null (random).
    pretrained: str | None = None
    # Fetch a tag that is not in the cache (huggingface_hub / torch hub, into their standard
    # caches): true always, false never (as HF_HUB_OFFLINE=1); null = except on demo data, so
    # the demo never downloads.
    download: bool | None = None


@dataclass
class ClipBackboneConfig(BackboneConfig):
    """An open_clip model (Track 1)."""

    what: ClassVar[str] = "a CLIP backbone (Track 1)"
    model_name: str = MISSING  # open_clip architecture
    tokenizer: str | None = None  # null = the model's own
    cache_dir: str | None = None  # where cached weights are looked for
    model_cfg: dict[str, Any] | None = None  # a custom architecture (clip_tiny)
    # The MLP activation the weights were trained with: true QuickGELU (OpenAI's weights), false
    # GELU; null = what the tag or the file says (lpcvlab.config.weights). A checkpoint path for
    # an architecture published in both (ViT-B-16, ViT-B-32) that does not say needs it.
    quick_gelu: bool | None = None
    # Levers of the device (lpcvlab.models.clip.adapt_clip): the image side N (the ViT's
    # positional embedding interpolated; exported input (1,3,N,N), images resized to N; null =
    # preprocess.image.size), the text length L (positional embedding and causal mask cut;
    # exported input (1,L); null = 77), and the MLP activation (null = the model's own).
    image_size: int | None = setting(None, ge=1)
    context_length: int | None = setting(None, ge=1)
    activation: str | None = setting(None, choices=ACTIVATIONS)

    def check(self, prefix: str) -> None:
        if self.context_length is not None and self.context_length > MAX_CONTEXT_LENGTH:
            raise ConfigError(
                f"{prefix}.context_length={self.context_length}: CLIP's text encoder has "
                f"{MAX_CONTEXT_LENGTH} positions; use {prefix}.context_length="
                f"{MAX_CONTEXT_LENGTH} or less (or null)"
            )


@dataclass
class VideoBackboneConfig(BackboneConfig):
    """A torchvision video classifier (Track 2); mean/std are baked into the export.

    ``mean``/``std`` null: the weights' own (torchvision's ``weights.transforms()``, or what an
    lpcvlab checkpoint was trained with); set: checked against them when the config is loaded
    (``force_normalization=true`` runs a different one anyway).
    """

    what: ClassVar[str] = "a video backbone (Track 2)"
    arch: str = setting(MISSING, choices=("r2plus1d_18", "r3d_18", "mc3_18"))
    mean: list[float] | None = None
    std: list[float] | None = setting(None, gt=0, each=True)
    force_normalization: bool = False

    def check(self, prefix: str) -> None:
        _check_mean_std(prefix, self.mean, self.std)


@dataclass
class TinyVideoBackboneConfig(VideoBackboneConfig):
    """``video_tiny``: a small 3D CNN with R(2+1)D's layer names, for tests and demos."""

    arch: str = setting("video_tiny", choices=("video_tiny",))
    width: int = setting(16, ge=1)


def _check_mean_std(prefix: str, mean: list[float] | None, std: list[float] | None) -> None:
    if (mean is None) != (std is None):
        raise ConfigError(f"{prefix}.mean and {prefix}.std must be set together (or both null)")
    if mean is not None and (len(mean) != 3 or len(std or ()) != 3):
        raise ConfigError(f"{prefix}.mean and {prefix}.std need 3 values (RGB)")


@dataclass
class ImagePreprocessConfig:
    """Track 1: PIL resize, /255, then mean/std in the graph (or on the host).

    ``normalize``: true (default) applies the weights' own mean/std (``mean``/``std`` null), or
    ``mean``/``std`` as given, which must equal the weights' own unless
    ``force_normalization=true``; false applies none (the organisers' sample exactly).
    """

    size: int = setting(224, ge=1)
    resample: str | None = setting(None, choices=PIL_FILTERS)  # null = PIL's default
    normalize: bool = True
    mean: list[float] | None = None
    std: list[float] | None = setting(None, gt=0, each=True)
    force_normalization: bool = False
    normalize_in_model: bool = True  # false: on the host (not deployable as is; comparisons)

    def check(self, prefix: str) -> None:
        _check_mean_std(prefix, self.mean, self.std)
        if not self.normalize and self.mean is not None:
            raise ConfigError(
                f"{prefix}.normalize=false applies no mean/std, so {prefix}.mean/std cannot be "
                f"set with it; drop one of them"
            )


@dataclass
class VideoPreprocessConfig:
    """Track 2: frame selection and pixels (see :mod:`lpcvlab.data.frames`)."""

    frame_selection: str = setting(MISSING, choices=FRAME_SELECTIONS)
    fps: float = setting(4.0, gt=0)
    num_frames: int = setting(16, ge=1)
    resize: list[int] = setting(factory=lambda: [128, 171], ge=1, each=True)  # [height, width]
    crop: int = setting(112, ge=1)
    clips_per_video: int = setting(1, ge=1)  # clips per video for evaluation

    def check(self, prefix: str) -> None:
        if len(self.resize) != 2:
            raise ConfigError(f"{prefix}.resize={self.resize} must be [height, width]")
        if self.crop > min(self.resize):
            raise ConfigError(
                f"{prefix}.crop={self.crop} is larger than the resized frame {self.resize}"
            )


@dataclass
class PreprocessConfig:
    """``preprocess``: one option for both tracks; each track reads its own section."""

    what: ClassVar[str] = "a preprocessing"
    name: str = MISSING
    image: ImagePreprocessConfig | None = None
    video: VideoPreprocessConfig | None = None


@dataclass
class DeviceConfig:
    what: ClassVar[str] = "a device"
    name: str = MISSING
    aihub_name: str | None = None  # the exact name AI Hub knows; null = not on AI Hub


@dataclass
class RuntimeConfig:
    """``runtime``: the AI Hub target runtime and its compile options."""

    what: ClassVar[str] = "a target runtime"
    name: str = MISSING
    target_runtime: str = MISSING
    compile_options: str = ""
    # What this runtime can deploy on AI Hub, and the compile options that select fp16 on it.
    precisions: list[str] = setting(factory=lambda: list(PRECISIONS), choices=PRECISIONS, each=True)
    fp16_options: str = ""

    def check(self, prefix: str) -> None:
        if "fp16" in self.precisions and not self.fp16_options.strip():
            raise ConfigError(
                f"{prefix}.precisions={self.precisions} lists fp16 but {prefix}.fp16_options is "
                "empty: give the compile option that selects fp16, or drop fp16 from the list"
            )


@dataclass
class HubConfig:
    """``hub``: where models are compiled, profiled and run."""

    what: ClassVar[str] = "a hub"
    name: str = MISSING
    # Timed iterations of one profile: the local median's sample size, or AI Hub's
    # --max_profiler_iterations (the official submissions use 100).
    profile_iterations: int = setting(20, ge=1)


@dataclass
class LocalHubConfig(HubConfig):
    what: ClassVar[str] = "hub=local"
    name: str = "local"
    warmup_iterations: int = setting(3, ge=0)
    intra_op_threads: int | None = setting(None, ge=1)  # null = ONNX Runtime's default


@dataclass
class AIHubConfig(HubConfig):
    what: ClassVar[str] = "hub=aihub"
    name: str = "aihub"
    profile_iterations: int = setting(100, ge=1)
    extra_compile_options: str = ""
    extra_profile_options: str = ""
    extra_inference_options: str = ""
    channel_last_inputs: list[str] = field(default_factory=lambda: ["video"])
    reuse: bool = True
    share_with: list[str] = field(default_factory=list)
    poll_interval_s: float = setting(10.0, ge=0)
    # Seconds to wait for AI Hub to answer the first request of a run.
    connect_timeout_s: float = setting(10.0, gt=0)
    chunk_bytes: int = setting(1_296_000_000, gt=0, le=AIHUB_DATASET_LIMIT_BYTES)
    # A quantized (w8a*) or fp16 component's compile adds --quantize_io (AIHM's choice): its
    # compiled I/O is then integer (or float16), which the organisers' float32 data does not
    # fit (track.contract); false (default) keeps float I/O, as the organisers' sample does.
    quantize_io: bool = False
    # QAIRT version of compile (QNN targets), profile and inference jobs (--qairt_version);
    # part of every job's ledger key. null = whatever AI Hub's default is on the day.
    qairt_version: str | None = "2.42"
    # Inference jobs of one component in flight at once; the next chunk goes up as one ends.
    inference_window: int = setting(4, ge=1)
    parity_samples: int = setting(32, ge=0)
    ledger_path: str | None = None  # null = <paths.cache_dir>/aihub_ledger.jsonl


@dataclass
class PrecisionConfig:
    """``precision``: one precision for every component (``fp32``, ``fp16``, ``w8a16``, ``w8a8``).

    ``calibration_samples`` is how many of the track's inputs calibrate the activation ranges of
    a quantized (``w8a*``) component: the training split's when there is one, else evaluation
    inputs at evenly spaced positions (:mod:`lpcvlab.deploy.precision.calibration`).
    """

    what: ClassVar[str] = "precision=fp32, fp16, w8a16 or w8a8"
    name: str = setting(MISSING, choices=PRECISIONS)
    calibration_samples: int = setting(32, ge=1)
    # Selective quantization of the w8a* components (lpcvlab.deploy.precision.selective): op
    # types and node names kept float; a sensitivity sweep (one group quantized at a time); and
    # exclude=auto, which keeps the costliest groups float until the fidelity gate passes.
    exclude_op_types: list[str] = field(default_factory=list)
    exclude_nodes: list[str] = field(default_factory=list)
    sensitivity: bool = False
    exclude: str | None = setting(None, choices=("auto",))

    def of(self, component: str) -> str:
        """The precision ``component`` is deployed in."""
        return self.name

    def check(self, prefix: str) -> None:
        n = self.calibration_samples
        if n < MIN_CALIBRATION_SAMPLES and any(p in QUANTIZED for p in self.used()):
            raise ConfigError(
                f"{prefix}.calibration_samples={n} is too few to calibrate activation ranges; "
                f"use at least {MIN_CALIBRATION_SAMPLES}"
            )
        selective = self.exclude_op_types or self.exclude_nodes or self.sensitivity or self.exclude
        if selective and not any(p in QUANTIZED for p in self.used()):
            raise ConfigError(
                f"{prefix}.exclude_op_types/exclude_nodes/sensitivity/exclude choose what stays "
                f"float in a quantized component, and precision={self.name} quantizes none; use "
                "precision=w8a8 (or w8a16)"
            )

    def used(self) -> set[str]:
        """Every precision some component may get."""
        return {self.name}


@dataclass
class ComponentPrecisions:
    """``precision.per_component``: a precision per network (null = ``precision.default``)."""

    what: ClassVar[str] = "precision.per_component (the components of both tracks)"
    image_encoder: str | None = setting(None, choices=PRECISIONS)
    text_encoder: str | None = setting(None, choices=PRECISIONS)
    video_classifier: str | None = setting(None, choices=PRECISIONS)


@dataclass
class MixedPrecisionConfig(PrecisionConfig):
    """``precision=mixed``: ``per_component.<component>``, the rest at ``default``."""

    what: ClassVar[str] = "precision=mixed"
    name: str = setting("mixed", choices=("mixed",))
    default: str = setting("fp32", choices=PRECISIONS)
    per_component: ComponentPrecisions = field(default_factory=ComponentPrecisions)

    def of(self, component: str) -> str:
        return getattr(self.per_component, component, None) or self.default

    def named(self) -> dict[str, str]:
        """The components given a precision of their own."""
        return {
            f.name: getattr(self.per_component, f.name)
            for f in fields(self.per_component)
            if getattr(self.per_component, f.name) is not None
        }

    def used(self) -> set[str]:
        return {self.default, *self.named().values()}


@dataclass
class DataConfig:
    what: ClassVar[str] = "a dataset"
    name: str = MISSING
    root: str | None = None


@dataclass
class RetrievalDemoConfig:
    num_images: int = setting(40, ge=1)
    # Images of the generated training split (root/train/), made only when the run trains.
    num_train_images: int = setting(400, ge=1)
    seed: int = setting(0, ge=0)  # the generated data's own seed, apart from the run's ``seed``


TRAIN_FORMATS = ("official", "coco")  # data.train.format


@dataclass
class RetrievalTrainSplitConfig:
    """``data.train``: Track 1's training split, read only when the run trains.

    ``format=official``: ``root/<images_dir>/`` + ``img_list`` + ``txt_list`` (every caption of
    an image's text IDs is one of its captions). ``format=coco``: a COCO-captions JSON
    (``annotations``, relative to ``root``: ``images`` with ``id`` and ``file_name``,
    ``annotations`` with ``image_id`` and ``caption``; COCO and Flickr30k ship it) and the images
    under ``root/<images_dir>/``.
    """

    format: str = setting("official", choices=TRAIN_FORMATS)
    root: str | None = None  # null: no training split
    images_dir: str = "images"
    img_list: str = "img_list.csv"  # format=official
    txt_list: str = "txt_list.csv"  # format=official
    annotations: str = "captions.json"  # format=coco


@dataclass
class RetrievalDataConfig(DataConfig):
    """Track 1 data in the organisers' layout (images + img_list.csv + txt_list.csv)."""

    what: ClassVar[str] = "a Track 1 dataset"
    images_dir: str = "images"
    img_list: str = "img_list.csv"
    txt_list: str = "txt_list.csv"
    demo: RetrievalDemoConfig | None = None  # set: generate this demo dataset under root
    train: RetrievalTrainSplitConfig = field(default_factory=RetrievalTrainSplitConfig)


@dataclass
class VideoDemoConfig:
    videos_per_class_train: int = setting(12, ge=1)
    videos_per_class_val: int = setting(4, ge=1)
    seed: int = setting(0, ge=0)  # the generated videos' own seed, apart from the run's ``seed``


@dataclass
class VideoDataConfig(DataConfig):
    """Track 2 data: root/{train,val}/<class>/<video>.mp4."""

    what: ClassVar[str] = "a Track 2 dataset"
    class_map: str | None = None  # null = the official 92-class map shipped with lpcvlab
    train_split: str = "train"
    val_split: str = "val"
    workers: int = setting(2, ge=0)  # decoding processes (0 = in this process)
    demo: VideoDemoConfig | None = None


@dataclass
class TrainConfig:
    what: ClassVar[str] = "a training setting"
    name: str = MISSING


@dataclass
class NoTrainConfig(TrainConfig):
    what: ClassVar[str] = "train=none"
    name: str = "none"


AVERAGING = ("none", "last", "best")  # train.average: which checkpoints are averaged


@dataclass
class DistillConfig:
    """``train.distill``: a teacher the student also learns from (null teacher: no distillation).

    ``teacher`` is a backbone option of the same track (``conf/backbone/<name>.yaml``, e.g.
    ``clip_vit_b16`` or ``r2plus1d_18``) or the path of a checkpoint lpcvlab's training wrote
    (``.ckpt``: it records the backbone it was trained with). ``teacher_pretrained`` replaces the
    option's own weights (an open_clip tag, ``kinetics400`` or a file). The teacher's outputs are
    computed once and cached on disk, keyed by its weights and the data; the loss becomes
    ``task + weight * temperature**2 * KL(teacher || student)`` at that temperature.
    """

    teacher: str | None = None
    teacher_pretrained: str | None = None
    weight: float = setting(1.0, ge=0)
    temperature: float = setting(2.0, gt=0)


@dataclass
class FinetuneConfig(TrainConfig):
    """Lightning fine-tuning: what every track shares. Trainer, optimizer, scheduler and
    checkpoint are ``_target_`` configs; each track adds its own section (a subclass, filled
    from ``conf/train_track/finetune-<track>.yaml``).

    ``lr`` is the base learning rate (the optimizer config reads it, so ``train.lr=`` sweeps
    it). ``wise_alpha`` interpolates the weights as WiSE-FT does: the share of the fine-tuned
    weights, 0 = the starting weights exactly, 1 = the fine-tuned ones. ``average`` averages
    the ``average_k`` last or best checkpoints before that (``none``: the best checkpoint).
    """

    what: ClassVar[str] = "train=finetune"
    name: str = "finetune"
    lr: float = setting(1.0e-3, gt=0)
    batch_size: int = setting(8, ge=1)
    num_workers: int = setting(0, ge=0)
    resume_from: str | None = None
    trainer: dict[str, Any] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] | None = None
    checkpoint: dict[str, Any] = field(default_factory=dict)
    distill: DistillConfig = field(default_factory=DistillConfig)
    wise_alpha: float = setting(1.0, ge=0, le=1)
    average: str = setting("none", choices=AVERAGING)
    average_k: int = setting(2, ge=1)

    def check(self, prefix: str) -> None:
        for key in ("trainer", "optimizer", "checkpoint"):
            if "_target_" not in getattr(self, key):
                raise ConfigError(f"{prefix}.{key} needs a _target_ (see conf/train/finetune.yaml)")


@dataclass
class AugmentConfig:
    flip: bool = False
    translate: int = setting(8, ge=0)


CLIP_SAMPLING = ("random", "first")  # train.clip_sampling (Track 2)


@dataclass
class VideoFinetuneConfig(FinetuneConfig):
    """Track 2's section: the freezing policy, which clips training sees, augmentation.

    ``clip_sampling=random`` is torchvision's video recipe: per video per epoch, a random window
    of ``preprocess.video.num_frames`` frames among the windows ``clip_step`` frames apart in the
    resampled video, and a random ``crop`` square of the resized frames (decoded once into a
    uint8 frame cache); ``clips_per_video`` such clips per video per epoch. ``first``: the
    official clip (first window, centre crop) every epoch. ``channels_last``: 3D activations in
    ``channels_last_3d`` (null: on with a GPU, where tensor cores want it).
    """

    what: ClassVar[str] = "train=finetune with track=video"
    trainable: list[str] = field(default_factory=lambda: ["layer4", "fc"])
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # "first" when a config has no such key (one logged before it existed: reproduce); the
    # option's YAML (conf/train_track/finetune-video.yaml) chooses random
    clip_sampling: str = setting("first", choices=CLIP_SAMPLING)
    clips_per_video: int = setting(1, ge=1)
    clip_step: int = setting(1, ge=1)
    channels_last: bool | None = None

    def check(self, prefix: str) -> None:
        super().check(prefix)
        if self.clip_sampling == "first" and self.clips_per_video > 1:
            raise ConfigError(
                f"{prefix}.clips_per_video={self.clips_per_video} with {prefix}.clip_sampling="
                "first would repeat the same clip; use clip_sampling=random or clips_per_video=1"
            )


UNFREEZE = ("all", "projection", "last_blocks")  # train.unfreeze (Track 1)


@dataclass
class HardNegativesConfig:
    """``train.hard_negatives``: captions with one word swapped for another of its group (left
    for right, a colour for another colour, ...), added as extra negatives of every image."""

    enabled: bool = False
    word_groups: list[list[str]] = field(default_factory=list)
    # words: the swapped captions above; mined: before each epoch, the per_image captions of
    # other images the current model finds most similar to each image
    kind: str = setting("words", choices=("words", "mined"))
    per_image: int = setting(3, ge=1)

    def check(self, prefix: str) -> None:
        if self.enabled and self.kind == "words" and not any(len(g) >= 2 for g in self.word_groups):
            raise ConfigError(
                f"{prefix}.enabled=true needs {prefix}.word_groups with at least one group of "
                "two or more words (e.g. [[left, right]])"
            )


@dataclass
class RetrievalFinetuneConfig(FinetuneConfig):
    """Track 1's section: contrastive fine-tuning of both towers.

    ``unfreeze``: ``all`` trains everything; ``projection`` only the two projections and the
    logit scale; ``last_blocks`` the last ``unfreeze_blocks`` blocks of each tower and what
    follows them (final norm, projection), plus the logit scale. ``lr_text`` is the text tower's
    learning rate (null: ``train.lr``, the image tower's and the logit scale's).
    """

    what: ClassVar[str] = "train=finetune with track=retrieval"
    unfreeze: str = setting("all", choices=UNFREEZE)
    unfreeze_blocks: int = setting(2, ge=1)
    lr_text: float | None = setting(None, gt=0)
    hard_negatives: HardNegativesConfig = field(default_factory=HardNegativesConfig)


@dataclass
class TrackingConfig:
    what: ClassVar[str] = "an MLflow store"
    uri: str = MISSING
    artifact_root: str | None = None  # for new experiments on a local store
    experiment: str = MISSING
    run_name: str | None = None  # null = <backbone>/<preprocess>/<device>/<hub>
    log_onnx: bool = False
    # MLflow-native records (lpcvlab.tracking.recorder): each export as an MLflow model (ONNX
    # flavour), system metrics (null = on when training), and the registry's name for submission
    # candidates (null = lpcvc-track1 / lpcvc-track2, by track).
    log_models: bool = True
    system_metrics: bool | None = None
    system_metrics_interval_s: float = setting(10.0, gt=0)
    registry_name: str | None = None


@dataclass
class PathsConfig:
    cache_dir: str = MISSING


# --------------------------------------------------------------------------- top level


@dataclass
class ExportConfig:
    opset: int = setting(18, ge=14, le=23)
    parity_threshold: float = setting(0.999, ge=-1.0)  # above 1: the export always fails
    parity_samples: int = setting(8, ge=1)
    # NPU-safe graph rewrites applied to the exported graph, in this order.
    rewrites: list[str] = setting(factory=list, choices=REWRITES, each=True)
    # The device-hazard check of every graph before any hub stage (lpcvlab.deploy.hazards):
    # error stops the run, warn prints and logs, off skips; null = error on hub=aihub, warn
    # on hub=local.
    lint: str | None = setting(None, choices=LINT_MODES)

    def check(self, prefix: str) -> None:
        if len(set(self.rewrites)) != len(self.rewrites):
            raise ConfigError(f"{prefix}.rewrites={self.rewrites} names a rewrite twice")


@dataclass
class CacheConfig:
    enabled: bool = True
    dir: str = MISSING
    stages: list[str] = setting(factory=lambda: list(CACHE_STAGES), choices=CACHE_STAGES, each=True)


@dataclass
class BudgetConfig:
    latency_ms: float | None = setting(None, gt=0)
    penalty: float = setting(1.0, ge=0)


@dataclass
class FidelityConfig:
    """The fidelity gate of non-fp32 components against the fp32 export (null: not gated)."""

    cosine_min: float | None = setting(0.95, ge=-1.0, le=1.0)  # per component, every sample
    metric_drop_max: float | None = setting(0.02, ge=0)  # track.objective, fp32 minus this run
    penalty: float = setting(1.0, ge=0)
    # distinct outputs / distinct inputs per component: below it the outputs collapsed (ties)
    distinct_min: float | None = setting(0.9, ge=0, le=1)


@dataclass
class SweepConfig:
    """``sweep``: what a multirun does when it ends (:mod:`lpcvlab.tracking.sweep`)."""

    register_best: bool = False  # register the best child's models (``lpcvlab register``)
    # When the multirun exits 1 (after its parent is summarised): any job failed, all did, never.
    fail_on: str = setting("any", choices=("any", "all", "never"))


@dataclass
class SubmissionConfig:
    """``submission``: what ``lpcvlab submit`` does (:mod:`lpcvlab.tracking.submit`)."""

    # Whom the compile jobs are shared with: the organisers' evaluation account by default.
    share_with: list[str] = field(default_factory=lambda: ["lowpowervision@gmail.com"])


@dataclass
class RunConfig:
    """The whole composed config of one run (``conf/config.yaml``)."""

    what: ClassVar[str] = "the top-level config (conf/config.yaml)"

    track: TrackConfig = MISSING
    backbone: BackboneConfig = MISSING
    preprocess: PreprocessConfig = MISSING
    device: DeviceConfig = MISSING
    runtime: RuntimeConfig = MISSING
    hub: HubConfig = MISSING
    data: DataConfig = MISSING
    train: TrainConfig = MISSING
    tracking: TrackingConfig = MISSING
    paths: PathsConfig = MISSING
    # fp32 when a config has no precision (one logged before the group existed: reproduce)
    precision: PrecisionConfig = field(default_factory=lambda: PrecisionConfig(name="fp32"))
    seed: int = setting(0, ge=0)
    export: ExportConfig = field(default_factory=ExportConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    submission: SubmissionConfig = field(default_factory=SubmissionConfig)


# (group, name) -> schema; each YAML option's defaults list names one of these.
SCHEMAS: dict[tuple[str, str], type] = {
    ("track", "retrieval"): RetrievalTrackConfig,
    ("track", "video"): VideoTrackConfig,
    ("backbone", "clip"): ClipBackboneConfig,
    ("backbone", "video"): VideoBackboneConfig,
    ("backbone", "video_tiny"): TinyVideoBackboneConfig,
    ("preprocess", "preprocess"): PreprocessConfig,
    ("device", "device"): DeviceConfig,
    ("runtime", "runtime"): RuntimeConfig,
    ("hub", "local"): LocalHubConfig,
    ("hub", "aihub"): AIHubConfig,
    ("data", "retrieval"): RetrievalDataConfig,
    ("data", "video"): VideoDataConfig,
    ("train", "none"): NoTrainConfig,
    ("train", "finetune"): FinetuneConfig,
    ("train", "finetune_video"): VideoFinetuneConfig,
    ("train", "finetune_retrieval"): RetrievalFinetuneConfig,
    ("tracking", "mlflow"): TrackingConfig,
    ("paths", "paths"): PathsConfig,
    ("precision", "uniform"): PrecisionConfig,
    ("precision", "mixed"): MixedPrecisionConfig,
}


# --------------------------------------------------------------------------- validation


def _violations(value: Any, meta: dict[str, Any]) -> str | None:
    if meta.get("choices") is not None and value not in meta["choices"]:
        return f"must be one of {', '.join(map(str, meta['choices']))}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if meta.get("ge") is not None and value < meta["ge"]:
        return f"must be >= {meta['ge']:g}"
    if meta.get("gt") is not None and not value > meta["gt"]:
        return f"must be > {meta['gt']:g}"
    if meta.get("le") is not None and value > meta["le"]:
        return f"must be <= {meta['le']:g}"
    return None


def walk(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, dataclass instance) for ``obj`` and every dataclass nested in it."""
    if not is_dataclass(obj):
        return
    yield prefix, obj
    for f in fields(obj):
        yield from walk(getattr(obj, f.name), f"{prefix}.{f.name}" if prefix else f.name)


def validate(settings: Any) -> None:
    """Check every declared constraint and ``check()`` method; the first failure is a
    ConfigError naming the full key, its value and what it must be."""
    for prefix, obj in walk(settings):
        for f in fields(obj):
            value = getattr(obj, f.name)
            if value is None or not f.metadata:
                continue
            items = value if f.metadata.get("each") and isinstance(value, list) else [value]
            for item in items:
                problem = _violations(item, dict(f.metadata))
                if problem:
                    key = f"{prefix}.{f.name}" if prefix else f.name
                    raise ConfigError(f"{key}={value!r} {problem}")
        check = getattr(obj, "check", None)
        if callable(check):
            check(prefix)
