"""Typed experiment configuration: dataclasses, filled from a YAML file plus ``key=value`` overrides.

OmegaConf validates types and rejects unknown keys; we re-raise its errors as :class:`ConfigError` with the
full key and, for unknown keys, the list of valid ones, because a typo in a 3-day run's config should fail in
the first second with a message that says how to fix it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key and the fix."""


@dataclass
class CropConfig:
    """One group of crops (global or local) of the multi-crop recipe, with per-view augmentation probabilities.

    ``blur_p`` and ``solarize_p`` are lists indexed by the view number inside the group (the last value repeats),
    which expresses the asymmetric BYOL/DINO recipe (view 1 always blurred, view 2 sometimes solarized).
    """

    count: int = 2
    size: int = 224
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: list[float] = field(default_factory=lambda: [1.0, 0.1])
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    solarize_p: list[float] = field(default_factory=lambda: [0.0, 0.2])


@dataclass
class AugmentConfig:
    """The multi-crop AugmentSpec as data: any number of global and local crops."""

    global_crops: CropConfig = field(default_factory=CropConfig)
    local_crops: CropConfig = field(
        default_factory=lambda: CropConfig(count=0, size=96, scale=[0.05, 0.4], blur_p=[0.5], solarize_p=[0.0])
    )
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class VideoConfig:
    """Video shards (written by ``ssltrain shards video``): how two views are cut from one clip sample."""

    mode: str = "clips"  # clips: two clips of `frames` frames (video backbone) | frames: two frames (image backbone)
    frames: int = 8  # frames per clip view (mode=clips)
    max_gap_s: float = 1.0  # the two views start at most this many seconds apart (a random gap in [0, max_gap_s])


@dataclass
class StoreConfig:
    """Shards in object storage (s3://, gs://, https://): retries, timeouts, and the local shard cache
    (ssltrain/data/store.py, shard_cache.py). A shard that fails every retry is skipped and counted."""

    retries: int = 5  # failures in a row (no byte gained) before a shard is skipped
    backoff_s: float = 0.5  # the first retry's wait; doubles each retry, times a random factor in [0.5, 1.5)
    timeout_s: float = 60.0  # connecting and each socket read: a stalled store is abandoned after this
    endpoint_url: str = ""  # S3-compatible stores (MinIO, Ceph, R2): their endpoint URL; "" is AWS
    anonymous: bool = False  # public buckets: unsigned requests, no credentials
    cache_dir: str = ""  # local cache of remote shards (training from a store needs one); ranks of a node may share it
    cache_bytes: int = 50 * 1000**3  # the cache's size limit; least recently used shards are evicted
    prefetch: int = 2  # shards downloaded ahead in the background (also the download threads)


@dataclass
class DataConfig:
    train: str = "???"  # shard paths: a directory, a glob, a brace pattern, or several separated by commas
    batch_size: int = 256  # global batch, over all ranks
    workers: int = 2  # DataLoader worker processes per rank
    shuffle: bool = True
    # The sample order (ssltrain/data/order.py): shards laid end to end in an order drawn per epoch, cut into
    # `streams` spans read in order and interleaved, shuffled within windows of `shuffle_window` samples (0: a
    # stream's whole span). Both fixed for the life of a run; a world size dividing `streams` reads each shard on
    # one rank.
    streams: int = 8
    shuffle_window: int = 0
    loader: str = "torch"  # torch: CPU decode + augment in DataLoader workers | dali: DALI (GPU when there is one)
    modality: str = "image"  # image | video (shards of clips from `ssltrain shards video`)
    video: VideoConfig = field(default_factory=VideoConfig)
    record_samples: bool = False  # write the sample keys of every step to RUN/samples/ (audit the data order)
    store: StoreConfig = field(default_factory=StoreConfig)


@dataclass
class ModelConfig:
    backbone: str = "resnet18"  # resnet18 | resnet50 | vit_tiny | vit_small | vit_base
    small_stem: bool = False  # ResNets: 3x3 stride-1 stem and no max-pool, for 32-64 px images
    zero_init_residual: bool = False  # ResNets: zero the last BN of each residual block (large-batch SSL recipes)
    patch_size: int = 16  # ViTs; position embeddings are interpolated for crops of any size
    drop_path: float = 0.0  # ViTs: stochastic depth rate
    registers: int = 0  # ViTs: register tokens (Darcet et al. 2024), as in DINOv2 with registers


@dataclass
class VICRegConfig:
    sim_weight: float = 25.0
    var_weight: float = 25.0
    cov_weight: float = 1.0
    gamma: float = 1.0
    eps: float = 1e-4


@dataclass
class VICRegLogDetConfig:
    """VICReg with the variance/covariance terms replaced by the LogDet entropy 1/2 logdet(I + alpha Cov).

    Per dimension the loss is about ``sim * rho * s^2 - entropy/2 * log(1 + alpha * s^2)`` (s: the dimension's
    std; rho = MSE / s^2, about 2 while the two views' embeddings are still uncorrelated), so it collapses
    (s -> 0) when ``2 * sim * rho > entropy * alpha``, and early in training rho ~ 2. A large alpha puts the term in
    its log regime (a barrier, like VICReg's hinge). The weights searched: docs/results.md.
    """

    sim_weight: float = 25.0
    entropy_weight: float = 25.0
    alpha: float = 64.0


@dataclass
class VICRegPairwiseConfig:
    """VICReg with a Kolchinsky-Tracey pairwise-distance entropy estimate as the anti-collapse term.

    Near collapse the estimate grows like ``entropy / sigma^2 * s^2`` per dimension against ``sim * rho * s^2``
    from the invariance (rho ~ 2 while the views' embeddings are uncorrelated), so it needs
    ``entropy / sigma^2 > 2 * rho * sim``. Once points are a few sigma apart the estimate saturates at log N (no
    gradient, no push towards full rank); a wider kernel saturates later, hence sigma 2 with 800, twice the bound.
    The settings searched: docs/results.md.
    """

    sim_weight: float = 25.0
    entropy_weight: float = 800.0
    sigma: float = 2.0
    distance: str = "kl"  # kl (upper bound) | bhattacharyya (lower bound)


@dataclass
class VCRegConfig:
    """Invariance + the orthonormality penalty ||E[z z^T] - I||_F^2 / D, unbiased from two half-batches."""

    sim_weight: float = 1.0
    ortho_weight: float = 10.0  # near collapse the penalty pulls like -2 * ortho * s^2 against sim * rho * s^2, rho ~ 2


@dataclass
class SimCLRConfig:
    temperature: float = 0.1


@dataclass
class BarlowTwinsConfig:
    lambd: float = 0.0051


@dataclass
class DIETConfig:
    """Datum index as target: a linear N-way classifier over sample ids, sharded over ranks."""

    label_smoothing: float = 0.8


@dataclass
class CISSLConfig:
    """Contrastive with a linear student head and the MLP projector as teacher head."""

    temperature: float = 0.07
    # BatchNorm1d (affine) after both heads, as the released code (issl/losses/contrastive.py) has; false: plain heads.
    head_batchnorm: bool = True


@dataclass
class DISSLConfig:
    """Distillation of an MLP teacher's C-way softmax into a linear student, with marginal-entropy maximisation."""

    classes: int = 16384
    teacher_temperature: float = 0.5
    student_temperature: float = 1.0
    lambd: float = 2.3  # weight of H[M], the entropy of the teacher's marginal over the global batch
    beta: float = 0.8  # weight of the cross-view teacher cross-entropy


@dataclass
class BYOLConfig:
    predictor: list[int] = field(default_factory=lambda: [4096, 256])
    momentum: float = 0.99  # EMA momentum at step 0; cosine schedule to 1.0 at the last step
    # The predictor's learning rate over the common one (paper: 1); higher keeps a lagging predictor from letting the
    # projections collapse in short runs (configs/digits/byol.yaml).
    predictor_lr_scale: float = 1.0


@dataclass
class MoCoV3Config:
    """Symmetric InfoNCE between the predictor's output and a momentum encoder's projection of the other view."""

    temperature: float = 0.2  # official: 0.2 for ViTs, 1.0 for ResNets
    predictor: list[int] = field(default_factory=lambda: [4096, 256])
    momentum: float = 0.99  # at step 0; cosine schedule to 1.0 at the last step
    projector_last_bn: bool = True  # official: BatchNorm (no affine) on the projector's output
    predictor_last_bn: bool = True  # official: true for ViTs, false for ResNets


@dataclass
class DINOConfig:
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    norm_last_layer: bool = True
    use_bn: bool = False  # BatchNorm after the head's hidden layers (the official ResNet-50 recipe; off for ViTs)
    student_temperature: float = 0.1
    teacher_temperature: float = 0.04  # after warm-up
    warmup_teacher_temperature: float = 0.04
    warmup_teacher_temperature_steps: int = 0
    center_momentum: float = 0.9
    momentum: float = 0.996  # EMA momentum at step 0; cosine schedule to 1.0
    freeze_last_layer_steps: int = 0  # the official recipe freezes the last layer for the first epoch


@dataclass
class SwAVConfig:
    prototypes: int = 3000
    temperature: float = 0.1
    epsilon: float = 0.05  # official; small data may need sharper codes (configs/digits/swav.yaml: 0.02)
    sinkhorn_iterations: int = 3
    freeze_prototypes_steps: int = 0  # official: 313 (prototypes get no update at first)
    # Past embeddings per global view scored with the batch in Sinkhorn-Knopp, so small batches still spread over
    # the prototypes (official: 3840 at batch 256, from epoch 15; 0 at batch 4096). 0: no queue.
    queue_size: int = 0
    queue_start_step: int = 0  # steps before the queue starts filling (official: 15 epochs)


@dataclass
class LeJEPAConfig:
    """Prediction of the global views' mean embedding + SIGReg (Epps-Pulley on random 1-D projections); the
    projector is ``method.projector``."""

    lambd: float = 0.05  # the one trade-off: loss = (1 - lambd) * prediction + lambd * sigreg
    num_slices: int = 256  # random directions per step, drawn from (seed, step)
    num_points: int = 17  # trapezoid nodes on [-t_max, t_max] (the paper's Algorithm 1)
    t_max: float = 5.0


@dataclass
class DINOv2Config(DINOConfig):
    """DINOv2 (Oquab et al. 2023; facebookresearch/dinov2 ssl_default_config.yaml): DINO's head, temperatures and EMA
    teacher (the fields above, with DINOv2's defaults) + the iBOT masked-patch loss + KoLeo on the student's CLS."""

    teacher_temperature: float = 0.07  # after a linear warm-up from warmup_teacher_temperature (official 30 epochs)
    momentum: float = 0.992  # cosine to 1
    centering: str = "sinkhorn_knopp"  # sinkhorn_knopp (the paper) | centering (softmax with an EMA centre, as DINO)
    sinkhorn_iterations: int = 3
    dino_loss_weight: float = 1.0
    ibot_loss_weight: float = 1.0
    koleo_loss_weight: float = 0.1
    ibot_separate_head: bool = False  # false: the iBOT loss shares the DINO head (ssl_default_config)
    ibot_out_dim: int = 65536  # the iBOT head's, with ibot_separate_head only
    ibot_hidden_dim: int = 2048
    ibot_bottleneck_dim: int = 256
    mask_sample_probability: float = 0.5  # each (sample, global view) is masked with this probability
    mask_ratio_min_max: list[float] = field(default_factory=lambda: [0.1, 0.5])  # its masked fraction: uniform here
    layerwise_decay: float = 0.9  # backbone lr x decay^(depth + 1 - layer); 1.0 turns it off
    patch_embed_lr_mult: float = 0.2


@dataclass
class MAEConfig:
    """Masked autoencoder (He et al. 2022): the ViT encodes a random (1 - mask_ratio) of the patches, a transformer
    decoder reconstructs the pixels of the masked ones (official decoder: 512 wide, 8 blocks, 16 heads)."""

    mask_ratio: float = 0.75
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True  # targets normalised per patch (the paper's best setting)


@dataclass
class IJEPAConfig:
    """I-JEPA (Assran et al. 2023; facebookresearch/ijepa, configs/in1k_vith14_ep300.yaml): multi-block masks on the
    global crop's patch grid, a ViT predictor, an EMA target encoder (momentum linear to momentum_end)."""

    predictor_depth: int = 12
    predictor_width: int = 384
    predictor_heads: int = 0  # 0: the backbone's head count (official)
    num_targets: int = 4
    target_scale: list[float] = field(default_factory=lambda: [0.15, 0.2])
    target_aspect_ratio: list[float] = field(default_factory=lambda: [0.75, 1.5])
    context_scale: list[float] = field(default_factory=lambda: [0.85, 1.0])
    min_keep: int = 10  # a block keeps more than this many patches
    allow_overlap: bool = False  # true: the context is not cut by the targets
    momentum: float = 0.996  # EMA momentum at step 0; linear to momentum_end at the last step
    momentum_end: float = 1.0
    fixed_pos_embed: bool = True  # the official encoder's frozen 2-D sin-cos positions; false: timm's learned ones


@dataclass
class MethodConfig:
    name: str = "vicreg"  # one of METHOD_NAMES: the fields below that hold a method's own settings
    projector: list[int] = field(default_factory=lambda: [2048, 2048, 2048])  # hidden..., output widths
    vicreg: VICRegConfig = field(default_factory=VICRegConfig)
    vicreg_logdet: VICRegLogDetConfig = field(default_factory=VICRegLogDetConfig)
    vicreg_pairwise: VICRegPairwiseConfig = field(default_factory=VICRegPairwiseConfig)
    vcreg: VCRegConfig = field(default_factory=VCRegConfig)
    simclr: SimCLRConfig = field(default_factory=SimCLRConfig)
    barlow_twins: BarlowTwinsConfig = field(default_factory=BarlowTwinsConfig)
    diet: DIETConfig = field(default_factory=DIETConfig)
    cissl: CISSLConfig = field(default_factory=CISSLConfig)
    dissl: DISSLConfig = field(default_factory=DISSLConfig)
    byol: BYOLConfig = field(default_factory=BYOLConfig)
    mocov3: MoCoV3Config = field(default_factory=MoCoV3Config)
    dino: DINOConfig = field(default_factory=DINOConfig)
    swav: SwAVConfig = field(default_factory=SwAVConfig)
    lejepa: LeJEPAConfig = field(default_factory=LeJEPAConfig)
    mae: MAEConfig = field(default_factory=MAEConfig)
    dinov2: DINOv2Config = field(default_factory=DINOv2Config)
    ijepa: IJEPAConfig = field(default_factory=IJEPAConfig)


# Every method has its own sub-config above, named as the method: the one list of method names (ssltrain.methods
# registers one class under each).
METHOD_NAMES: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(MethodConfig) if dataclasses.is_dataclass(getattr(MethodConfig(), f.name))
)


@dataclass
class LossConfig:
    impl: str = "auto"  # auto (fused Triton kernels on GPU, eager elsewhere) | triton | eager


@dataclass
class OptimConfig:
    name: str = "lars"  # lars | adamw | lamb
    lr: float = 0.2  # base learning rate per 256 samples of global batch
    weight_decay: float = 1e-6
    momentum: float = 0.9  # LARS
    eta: float = 0.001  # LARS trust coefficient
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW, LAMB
    warmup_steps: int = 10
    min_lr_ratio: float = 0.001  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 0.0  # max global grad norm; 0 disables
    accumulate: int = 1  # micro-batches per optimizer step; data.batch_size is the effective batch (lr scales by it)
    # auto: apex's fused kernels (FusedAdam, FusedLAMB) when apex imports and the parameters are on CUDA (not FSDP
    # DTensors), the native ones otherwise (same updates, tested) | apex (an error without it) | native
    impl: str = "auto"


@dataclass
class TrainConfig:
    """How fast the step runs (ssltrain/engine/parallelize.py): the same math through other kernels, so rounding may
    differ."""

    compile: bool = False  # torch.compile each backbone (each FSDP unit under dist.strategy=fsdp)
    compile_mode: str = "default"  # default | reduce-overhead (CUDA graphs) | max-autotune
    # null: ResNets on CUDA only (on CPU it changes the rounding against the offline probes, which extract
    # contiguous there) | true | false
    channels_last: bool | None = None
    # step: the non-finite check reads the device every step (any optimizer) | deferred: the skip is decided on the
    # device (fused AdamW, LARS, LAMB and the EMA teachers take the flag) and read at log steps: no per-step host sync
    finite_check: str = "step"


@dataclass
class CheckpointConfig:
    every: int = 500  # steps between checkpoints (one is always written at the end)
    keep: int = 3  # most recent complete checkpoints kept
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this (0: none)
    async_save: bool = False  # write in a background thread while training continues (commit follows at the next save)
    resume: bool = True  # continue from the latest complete checkpoint in the run directory
    # when the latest checkpoint fails its checksums or cannot be loaded, resume from the newest earlier one that
    # can (it is moved aside to step-<N>.corrupt); off: that is an error, and the run does not start
    fallback: bool = False


@dataclass
class DistConfig:
    """Data parallelism; the process group comes from torchrun's or Slurm's environment variables."""

    strategy: str = "ddp"  # ddp | fsdp (FSDP2 fully_shard per residual stage / transformer block)
    sync_bn: bool = False  # DDP: SyncBatchNorm over the global batch (CUDA only)
    # native: torch's SyncBatchNorm (a port of apex's Welford kernels) | apex: apex.parallel.SyncBatchNorm (an error
    # without apex; bench/syncbn.py compares the two)
    sync_bn_impl: str = "native"
    fsdp_bf16_params: bool = True  # FSDP: all-gather parameters in bf16 (not for models with BatchNorm)
    timeout_s: float = 600.0  # a collective waiting longer (a dead rank) fails with an error instead of hanging


@dataclass
class FaultConfig:
    nonfinite_patience: int = 5  # after this many non-finite steps in a row, reload the last checkpoint


@dataclass
class EvalConfig:
    train: str = ""  # labeled shards for the probe's training set (kNN memory bank)
    val: str = ""  # labeled held-out shards the probes are scored on
    batch_size: int = 256
    knn_k: int = 20
    knn_temperature: float = 0.07
    linear_epochs: int = 100
    linear_lr: float = 0.1
    linear_weight_decay: float = 1e-4
    # Online figures, computed during training (not the offline probes of `ssltrain eval`):
    online_linear: bool = False  # a linear probe on detached backbone features of the training batches (needs .cls)
    online_linear_classes: int = 0  # 0: read from the training labels (the resolved count is saved with the run)
    online_linear_lr: float = 0.0  # 0: 0.1 with LARS (as momentum SGD), 1e-3 with AdamW; same warm-up and cosine
    # kNN (knn_k, knn_temperature) on frozen backbone features every N optimizer steps and at the last one, bank from
    # eval.train, queries from eval.val (both labeled); logged as online_knn_top1/top5. 0: off.
    online_knn_every: int = 0
    online_knn_samples: list[int] = field(default_factory=lambda: [2000, 1000])  # [train, val] evenly spaced caps
    # Collapse warnings (training log and report) when the monitors fall under these: their one home
    collapse_rankme: float = 10.0  # RankMe, capped at half of min(N, D) of the batch the monitor saw
    collapse_std: float = 0.1  # normalised embedding std (1 healthy, 0 collapsed)


@dataclass
class LogConfig:
    """Where training records go besides metrics.jsonl (always written). ``log_every`` stays at the top level."""

    tensorboard: bool = True  # <run>/tb
    wandb: bool = False  # mirror every record to Weights & Biases from rank 0 (pip install wandb; WANDB_MODE=offline)
    wandb_project: str = "ssltrain"


@dataclass
class Config:
    name: str = "run"
    out_dir: str = "runs"
    seed: int = 0
    steps: int = 1000  # optimizer steps of the whole schedule (resumed runs continue to it)
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    log_every: int = 10
    progress: bool = True
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


# Backbones that take clips [B, 3, T, H, W] (data.video.mode=clips); models/backbones.py builds them.
VIDEO_BACKBONES: tuple[str, ...] = ("r3d_18",)

_CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "precision": ("auto", "bf16", "fp32"),
    "model.backbone": ("resnet18", "resnet50", "vit_tiny", "vit_small", "vit_base", "r3d_18"),
    "method.name": METHOD_NAMES,
    "method.vicreg_pairwise.distance": ("kl", "bhattacharyya"),
    "loss.impl": ("auto", "triton", "eager"),
    "optim.name": ("lars", "adamw", "lamb"),
    "optim.impl": ("auto", "apex", "native"),
    "train.compile_mode": ("default", "reduce-overhead", "max-autotune"),
    "train.finite_check": ("step", "deferred"),
    "dist.strategy": ("ddp", "fsdp"),
    "dist.sync_bn_impl": ("native", "apex"),
    "data.loader": ("torch", "dali"),
    "data.modality": ("image", "video"),
    "data.video.mode": ("clips", "frames"),
}


def _valid_keys(node: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []


def _node_at(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in [p for p in dotted.split(".") if p]:
        node = getattr(node, part, None)
    return node


def _explain(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    if isinstance(err, ConfigKeyError):
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        valid = _valid_keys(_node_at(Config(), parent))
        where = f"under '{parent}'" if parent else "at the top level"
        return ConfigError(f"{source}: unknown config key '{key}'. Valid keys {where}: {', '.join(valid)}")
    msg = str(err).splitlines()[0]
    return ConfigError(f"{source}: bad value for '{key}': {msg}")


def check_video_config(cfg: Config) -> None:
    """Clips go to a video backbone, frames to an image backbone: say so before the first batch, not in it."""
    video, backbone = cfg.data.video, cfg.model.backbone
    if video.mode == "clips" and backbone not in VIDEO_BACKBONES:
        raise ConfigError(
            f"data.video.mode=clips gives [B,3,T,H,W] clips, which {backbone} cannot take; use "
            f"model.backbone={VIDEO_BACKBONES[0]} or data.video.mode=frames"
        )
    if video.mode == "frames" and backbone in VIDEO_BACKBONES:
        raise ConfigError(
            f"data.video.mode=frames gives [B,3,H,W] frames, which {backbone} cannot take; use "
            "data.video.mode=clips or an image backbone (resnet18, vit_small, ...)"
        )
    if video.frames < 1 or video.max_gap_s < 0:
        raise ConfigError(
            f"data.video.frames must be >= 1 and data.video.max_gap_s >= 0, got {video.frames} and {video.max_gap_s}"
        )


# Image backbones by family (models/backbones.py builds them): the options each family takes.
_RESNETS = ("resnet18", "resnet50")
_VITS = ("vit_tiny", "vit_small", "vit_base")


def check_backbone_config(cfg: Config, source: str = "config") -> None:
    """Options the chosen backbone cannot take, and crops a ViT cannot cut into patches: said at load time (and in
    the login shell by ``launch``), not when the model is built on the compute node."""
    m, backbone = cfg.model, cfg.model.backbone
    if backbone in VIDEO_BACKBONES and cfg.data.modality != "video":
        raise ConfigError(
            f"{source}: model.backbone={backbone} takes video clips; set data.modality=video (shards from "
            "`ssltrain shards video`) or choose an image backbone (resnet18, vit_small, ...)"
        )
    if backbone not in _VITS:
        if m.drop_path:
            raise ConfigError(f"{source}: model.drop_path applies to ViTs only, not to {backbone}; set it to 0")
        if m.small_stem and backbone in VIDEO_BACKBONES:
            raise ConfigError(f"{source}: model.small_stem applies to image ResNets only, not to {backbone}")
        return
    for flag in ("small_stem", "zero_init_residual"):
        if getattr(m, flag):
            raise ConfigError(f"{source}: model.{flag} applies to ResNets only, not to {backbone}; set it to false")
    if not 0.0 <= m.drop_path < 1.0:
        raise ConfigError(f"{source}: model.drop_path must be in [0, 1), got {m.drop_path}")
    if m.patch_size < 1:
        raise ConfigError(f"{source}: model.patch_size must be >= 1, got {m.patch_size}")
    for group in ("global_crops", "local_crops"):
        crop: CropConfig = getattr(cfg.augment, group)
        if (crop.count > 0 or group == "global_crops") and crop.size % m.patch_size:
            raise ConfigError(
                f"{source}: augment.{group}.size {crop.size} is not a multiple of model.patch_size {m.patch_size}: "
                f"{backbone} cuts crops into patches; choose a crop size divisible by {m.patch_size}"
            )


def check_world_size(cfg: Config, world_size: int) -> None:
    """Each of ``world_size`` ranks takes an equal share of every micro-batch: say so before any rank starts."""
    accumulate = cfg.optim.accumulate
    micro_batch = cfg.data.batch_size // accumulate
    if micro_batch % world_size:
        step = accumulate * world_size
        near = sorted({max(step, cfg.data.batch_size // step * step), -(-cfg.data.batch_size // step) * step})
        raise ConfigError(
            f"data.batch_size {cfg.data.batch_size} / optim.accumulate {accumulate} = {micro_batch} samples per "
            f"micro-batch is not divisible by the {world_size} ranks; set data.batch_size to a multiple of {step} "
            f"(e.g. {' or '.join(str(n) for n in near)})"
        )


def config_warnings(cfg: Config) -> list[str]:
    """Settings that run but are probably not meant: said at start, as warnings (a short smoke run of a long
    recipe is legitimate)."""
    out = []
    if cfg.optim.warmup_steps > cfg.steps:
        out.append(
            f"optim.warmup_steps {cfg.optim.warmup_steps} is longer than steps {cfg.steps}: the learning rate never "
            f"reaches optim.lr {cfg.optim.lr:g} and never decays; lower optim.warmup_steps"
        )
    return out


# What makes a run's model the one its checkpoints hold: resuming with another value trains another model.
MODEL_KEYS = ("method.name", "model.backbone", "model.patch_size", "model.small_stem", "method.projector")


def check_same_model(old: Config, new: Config) -> str | None:
    """None when ``new`` continues the model of ``old`` (a checkpoint's config); else what differs and how to start
    anew, to follow "run directory 'X' " in an error."""
    changed = [
        f"{k} {_node_at(old, k)!r} -> {_node_at(new, k)!r}" for k in MODEL_KEYS if _node_at(old, k) != _node_at(new, k)
    ]
    if not changed:
        return None
    return (
        f"holds checkpoints of another model ({', '.join(changed)}); start a new run under another name "
        "(name=NEW) or out_dir"
    )


def _check(cfg: Config, source: str) -> None:
    if cfg.data.modality == "video":
        check_video_config(cfg)
    check_backbone_config(cfg, source)
    for key, allowed in _CHOICES.items():
        value = _node_at(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{source}: '{key}' is {value!r}; choose one of {', '.join(allowed)}")
    positive = [
        "steps",
        "data.batch_size",
        "data.streams",
        "checkpoint.every",
        "checkpoint.keep",
        "augment.global_crops.count",
        "optim.accumulate",
        "faults.nonfinite_patience",
        "method.byol.predictor_lr_scale",
    ]
    for key in positive:
        if _node_at(cfg, key) <= 0:
            raise ConfigError(f"{source}: '{key}' must be positive, got {_node_at(cfg, key)}")
    for key in ("method.swav.queue_size", "method.swav.queue_start_step"):
        if _node_at(cfg, key) < 0:
            raise ConfigError(f"{source}: '{key}' must be >= 0 (queue_size 0: no queue), got {_node_at(cfg, key)}")
    if cfg.data.shuffle_window < 0:
        raise ConfigError(
            f"{source}: 'data.shuffle_window' must be >= 0 (0: each stream's whole span), got {cfg.data.shuffle_window}"
        )
    if cfg.eval.online_knn_every < 0:
        raise ConfigError(f"{source}: 'eval.online_knn_every' must be >= 0 (0: off), got {cfg.eval.online_knn_every}")
    caps = cfg.eval.online_knn_samples
    if len(caps) != 2 or min(caps) < 1:
        raise ConfigError(f"{source}: 'eval.online_knn_samples' must be [train, val] sample caps >= 1, got {caps}")
    if cfg.checkpoint.fallback and not cfg.checkpoint.resume:
        raise ConfigError(
            f"{source}: checkpoint.fallback=true chooses the checkpoint to resume from, and "
            "checkpoint.resume=false starts afresh; drop one of them"
        )
    if cfg.data.batch_size % cfg.optim.accumulate:
        raise ConfigError(
            f"{source}: data.batch_size {cfg.data.batch_size} is not divisible by optim.accumulate "
            f"{cfg.optim.accumulate}"
        )
    for group in ("global_crops", "local_crops"):
        crop: CropConfig = getattr(cfg.augment, group)
        for name in ("scale", "ratio", "blur_sigma"):
            pair = getattr(crop, name)
            if len(pair) != 2 or not 0 < pair[0] <= pair[1]:
                raise ConfigError(
                    f"{source}: 'augment.{group}.{name}' must be [low, high] with 0 < low <= high, got {pair}"
                )
        for name in ("blur_p", "solarize_p"):
            if not getattr(crop, name):
                raise ConfigError(f"{source}: 'augment.{group}.{name}' needs at least one probability")


def _read_yaml(path: Path) -> Any:
    """The file's YAML, or a ConfigError naming the file, the line and the fix (never a parser's traceback)."""
    if path.is_dir():
        raise ConfigError(f"config file '{path}' is a directory; give a YAML file, e.g. configs/demo.yaml")
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        start, context = getattr(err, "context_mark", None), getattr(err, "context", None)
        if start is not None and context:  # where the unclosed thing began, e.g. "while scanning a quoted scalar"
            problem += f" ({context} at line {start.line + 1})"
        raise ConfigError(
            f"config file '{path}' is not valid YAML{where}: {problem}; fix the file (indentation, a missing ':' "
            "or an unclosed quote or bracket)"
        ) from None
    except OSError as err:
        raise ConfigError(f"config file '{path}' cannot be read ({err.strerror}); check its permissions") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file '{path}' holds a {type(loaded).__name__}, not a mapping of keys to values")
    return loaded


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build a :class:`Config` from defaults, an optional YAML file, then ``key=value`` overrides (dotlist)."""
    schema: DictConfig = OmegaConf.structured(Config)
    source = str(path) if path else "defaults"
    try:
        merged: Any = schema  # OmegaConf.merge is typed to return any container
        if path is not None:
            merged = OmegaConf.merge(merged, _read_yaml(Path(path)))
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"override {bad[0]!r} is not key=value (e.g. optim.lr=0.1)")
            source = f"{source} + overrides"
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(overrides))
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            hint = ""
            if "data.train" in missing:
                hint = " (a shard directory or pattern; make some with `ssltrain shards`)"
            raise ConfigError(f"{source}: '{missing[0]}' is required{hint}")
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except (ConfigKeyError, ValidationError) as err:
        raise _explain(err, source) from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{source}: {str(err).splitlines()[0]}") from None
    _check(cfg, source)
    return cfg


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict[str, Any]:
    """The resolved config as nested plain dicts (for experiment trackers)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]


def from_yaml_text(text: str, source: str = "checkpoint") -> Config:
    """Rebuild a Config from the resolved YAML stored in a run directory or checkpoint."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(text))
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise _explain(err, source) from None


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if not dataclasses.is_dataclass(node):
        return {prefix: node}
    out: dict[str, Any] = {}
    for f in dataclasses.fields(node):
        out.update(_flatten(getattr(node, f.name), f"{prefix}{f.name}" if not prefix else f"{prefix}.{f.name}"))
    return out


def config_diff(old: Config, new: Config) -> list[str]:
    """Dotted keys whose values differ, as ``key: old -> new`` (for the warning when a run resumes changed)."""
    a, b = _flatten(old), _flatten(new)
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in a if a[k] != b[k]]
