"""The configuration's sections: every key, its type, its default (and why), and its upper bound.

:class:`common.config.Config` holds one of each section; validation, the flat dotted keys of
Flower's run config and Hydra's tree are in :mod:`common.config`, named configurations in
:mod:`common.presets`. A field with a fixed set of choices is typed ``Literal[...]``: that type
is the one list of its choices (validation reads it: :func:`common.config.choices`).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal


# The choices of each enumerated field, listed once (validation reads them: common.config.choices).
Grouping = Literal["random", "adaptive"]
Schedule = Literal["cosine", "constant"]
Augment = Literal["dihedral", "rotate"]
Sampler = Literal["balanced", "shuffle"]
StudentInit = Literal["scratch", "teacher"]
StudentSites = Literal["wli", "all"]
Aggregation = Literal["mean", "median", "trimmed_mean"]
AGGREGATIONS: tuple[str, ...] = typing.get_args(Aggregation)  # the robust aggregation rules (server/aggregation.py)


@dataclass
class DataConfig:
    # Follows from class_names when that is set (its length); otherwise the count of the
    # synthetic default names (common.data.default_class_names) or of the sites' discovered ones.
    num_classes: int = 3
    # Comma-separated class names in label order, e.g. "hyperplastic,adenoma". Empty: the sites
    # discover them (ImageFolder: the sorted class folders of train/; a manifest: its sorted
    # labels) and the server checks at discovery that every site found the same ones.
    class_names: str = ""
    image_size: int = 64
    # Built-in synthetic federation (used when ``root`` is empty).
    nbi_sites: int = 2
    wli_sites: int = 2
    train_per_site: int = 96
    # Synthetic val and test images are free. A small val split was noisier than the differences
    # model selection chose between (docs/results.md, (b')); 250 per site is the study's split
    # (benchmarks/study.py STUDY_SPLITS), and 1,000 test images per site give the printed pooled WLI
    # AUC a standard error of ~0.007: the default run is then seed 0 of the study's default arm.
    val_per_site: int = 250
    test_per_site: int = 1000
    # Site sizes: each site's train size is train_per_site * a Pareto(size_tail) factor (0 = all equal).
    size_tail: float = 0.0
    # Non-IID class balance: per-site class weights ~ Dirichlet(class_alpha); 0 = balanced.
    class_alpha: float = 0.0
    # Largest per-site rendering shift (colour cast, brightness, blur), drawn uniformly per site.
    render_shift: float = 0.0
    # NBI sites' train size as a multiple of train_per_site (the NBI:WLI data ratio; 1 = equal).
    nbi_train_scale: float = 1.0
    # Real data: a folder holding one sub-folder per site and a sites.toml declaring each site's modality.
    root: str = ""
    num_workers: int = 0


@dataclass
class ModelConfig:
    # Any timm model name. pagkd_cnn_s (common/backbones.py, registered in timm) is the CPU
    # default: 8 x 8 tokens at 64 px and it trains in minutes; preset=paper uses resnet50.
    teacher: str = "pagkd_cnn_s"
    student: str = "pagkd_cnn_s"
    embed_dim: int = 128  # D: token and prototype width
    num_queries: int = 12  # M: lesion-aware queries
    num_heads: int = 8
    output_stride: int = 32  # 16 or 8 dilate the last stage: more tokens per image (timm backbones that support it)
    # Start from timm's pretrained weights (ImageNet for resnet50): timm's local cache, or the
    # Hugging Face hub where the machine is online. Only the coordinator (server) and the
    # centralised reference load them: sites receive the initial weights from the server.
    pretrained: bool = False
    # Local .safetensors or torch state-dict files (e.g. from `fedpagkd fetch-weights` on a
    # connected machine); when set they replace model.pretrained for that network, offline.
    teacher_weights: str = ""
    student_weights: str = ""


@dataclass
class PaGKDConfig:
    # Off in the default run: the group terms add nothing measurable to the WLI student on the
    # embedded default (docs/results.md, the powered study); experiment=pagkd turns both on.
    use_pro: bool = False  # GKD-Pro: group classification + query-matched contrastive
    use_den: bool = False  # GKD-Den: relation-masked cross attention to NBI tokens/codebook
    den_weight: float = 1.0
    pro_weight: float = 0.1  # on (L_con + L_groupCE); the paper's 0.001 is preset=paper (200 epochs)
    temperature: float = 0.1
    fg_threshold: float = 0.6  # normalised activation above: foreground token
    bg_threshold: float = 0.3  # below: background token; in between: uncertain
    warmup_epochs: int = 0  # GKD-Den and GKD-Pro start after this many epochs (CE only before)
    grouping: Grouping = "random"
    group_size: int = 8  # K: images per group
    min_group_size: int = 4  # K_min: smaller groups are never summarised or used
    subtypes: int = 1  # prototype sets kept per class in the bank (adaptive grouping: > 1)
    codebook_size: int = 8  # foreground and background centroids per class
    kmeans_iters: int = 2  # federated Lloyd iterations per bank refresh


@dataclass
class TrainConfig:
    lr: float = 3e-3  # peak learning rate of AdamW (common/optim.py)
    weight_decay: float = 5e-4  # AdamW's decoupled weight decay
    # cosine: warm-up over warmup_fraction of the run, then cosine decay (one-cycle's shape), one
    # curve over all federated rounds | constant: the paper's fixed rate.
    schedule: Schedule = "cosine"
    warmup_fraction: float = 0.2
    batch_size: int = 24
    epochs: int = 40  # centralised epochs
    teacher_epochs: int = 40  # centralised teacher epochs
    local_epochs: int = 4  # federated: local epochs per round (x rounds = the centralised epochs)
    # federated: a site keeps its AdamW moments from one round to its next (Flower context state,
    # never sent) instead of starting each round with a fresh optimiser. Chosen on val for the
    # default run (benchmarks/tune.py) and the best measured setting of FedAvg WLI-only
    # (docs/results.md: the tuning table and (b')).
    keep_optimizer_state: bool = True
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # mixed precision where CUDA is used
    augment: Augment = "dihedral"  # dihedral (exact 90-degree turns + flips) | rotate (any angle, bilinear)
    rotation_deg: float = 180.0  # augment=rotate only (common.data.BatchAugment)
    flips: bool = True
    # Brightness / contrast / saturation jitter, off by default: faint WLI evidence can be no more
    # than a few percent of contrast or a tint, and a +-10 % jitter erased it on another image
    # family (issue 21: the student stayed at chance where 0 learned; docs/families.md).
    color_jitter: float = 0.0
    channels_last: bool = True  # on CUDA
    # The WLI student's training batches: balanced (~batch_size / C images of each class, the
    # paper's class groups; GKD-Pro needs them) | shuffle (the site's own class balance, each
    # image once per epoch; CE-only runs). The teacher's batches are always balanced.
    sampler: Sampler = "balanced"


# A SuperNode sends a heartbeat every ~0.8 x 30 s (Flower's HEARTBEAT_DEFAULT_INTERVAL, jittered by
# +-10 %): a shorter fed.site_lost_s would drop live sites between two heartbeats.
MIN_SITE_LOST_S = 30.0


@dataclass
class FederationConfig:
    teacher_rounds: int = 10
    student_rounds: int = 10
    bank_refresh_every: int = 0  # T: refresh the NBI bank every T student rounds (0 = never)
    min_nbi_sites: int = 1
    min_wli_sites: int = 1
    fraction_train: float = 1.0  # fraction of a modality's sites sampled per round
    round_timeout: float = 600.0  # seconds to wait for replies
    # Times a request is sent again to a site whose ClientApp stopped responding (Flower's
    # CLIENT_APP_CRASHED: its process died or missed its heartbeats), each with a fresh
    # round_timeout; 0 = drop that site at once. Any other error is final.
    resend_crashed: int = 1
    # Seconds without a heartbeat from a site's SuperNode (one every ~24 s) after which the server
    # stops waiting for its reply: the site is dropped from that exchange (server/liveness.py).
    # Flower itself reports such a node unavailable after 60 s; a restarted SuperNode is noticed
    # at once, whatever this value, and asked again (fed.resend_crashed).
    site_lost_s: float = 60.0
    num_bins: int = 200  # score-histogram bins for federated evaluation
    max_norm_ratio: float = 100.0  # a reply's update norm above this x the median is dropped
    # scratch | teacher: start the WLI student from the federated NBI teacher (same backbone;
    # the server holds both, so nothing more leaves a site). Teacher rounds then run even
    # without distillation: that is the sequential NBI -> WLI transfer baseline.
    # The default run starts from the teacher: it is the measured way NBI sites reach the WLI
    # student (docs/results.md).
    student_init: StudentInit = "teacher"
    # Which sites train the student: wli (FedPaGKD, FedAvg WLI-only) | all (the naive
    # cross-modal baseline: one model FedAvg'ed over WLI and NBI sites, CE only; evaluated on WLI).
    student_sites: StudentSites = "wli"
    # FedProto-style baseline: weight of the MSE pulling each WLI image's mean embedded token to
    # the global class prototype (summed class means of the WLI sites' embeddings); 0 = off.
    # (Not pagkd.pro_weight, GKD-Pro's weight. Was fed.proto_weight, still accepted: RENAMED_KEYS.)
    fedproto_weight: float = 0.0
    # Robust aggregation of weights and knowledge statistics (server/aggregation.py):
    # mean (FedAvg / exact sums) | median | trimmed_mean (coordinate-wise, unweighted).
    aggregation: Aggregation = "mean"
    trim_fraction: float = 0.2  # trimmed_mean: share of sites dropped at each end, per coordinate
    # Clip each site's update (weights: from the global model; statistics: from the median of the
    # sites' means) to clip_ratio x the median update norm; 0 = off.
    clip_ratio: float = 0.0
    run_dir: str = "runs"  # where run folders are written (relative to the app directory)
    run_name: str = ""  # empty: a timestamp; one folder name inside run_dir (no '/', no '..')
    # A run that lost a discovered site (dropped in any phase) is reported "degraded"; it is
    # accepted (launcher exit 0) only while the share of sites never dropped is >= this.
    min_site_share: float = 1.0
    # The largest share of a weighted aggregate (FedAvg weights, the bank's statistics) one site
    # may hold, whatever size it declares (nothing can check one), or 1/sites when that is
    # larger; 1 = off. At 0.5 no site outweighs all the others together, and sites of similar
    # size (each under half) aggregate exactly as without a cap.
    max_site_share: float = 0.5


@dataclass
class PrivacyConfig:
    """Differential privacy and secure aggregation of the NBI knowledge statistics.

    DP unit: one group (>= K_min images; an image is in one group), add-or-remove-one-group
    neighbours. Each group's contribution to the float sums is clipped to L2 <= ``clip`` and
    every release gets Gaussian noise (std noise_multiplier x clip on sums, noise_multiplier x
    the count sensitivity on counts) at the site; the server accounts (epsilon, delta) with
    Flower's RDP accountant. Teacher weights and evaluation histograms are not covered.
    """

    noise_multiplier: float = 0.0  # sigma; 0 = no DP noise
    clip: float = 10.0  # C: L2 bound of one group's contribution to the float sums
    delta: float = 1e-5  # the delta epsilon is reported at
    # Pairwise-mask secure aggregation (common/secagg.py) of the bank sums: the server sees only
    # the sum over NBI sites. Needs >= 2 NBI sites and fed.aggregation = mean, fed.clip_ratio = 0.
    secure_aggregation: bool = False


# Upper bounds: {key: (limit, why)}. Generous for real use, far below what would exhaust a
# machine (a histogram of 1e9 bins, a codebook of 1e7 centroids, 1e6 Lloyd steps).
LIMITS: dict[str, tuple[float, str]] = {
    "data.num_classes": (1000, "classes"),
    "data.image_size": (4096, "pixels per side"),
    "data.nbi_sites": (10_000, "sites"),
    "data.wli_sites": (10_000, "sites"),
    "data.train_per_site": (10_000_000, "images"),
    "data.val_per_site": (10_000_000, "images"),
    "data.test_per_site": (10_000_000, "images"),
    "data.size_tail": (100, "Pareto shape"),
    "data.class_alpha": (1e6, "Dirichlet concentration"),
    "data.num_workers": (64, "loader processes"),
    "model.embed_dim": (8192, "channels"),
    "model.num_queries": (1024, "queries"),
    "model.num_heads": (256, "heads"),
    "pagkd.den_weight": (1e6, "loss weight"),
    "pagkd.pro_weight": (1e6, "loss weight"),
    "pagkd.temperature": (1e6, "softmax temperature"),
    "pagkd.warmup_epochs": (100_000, "epochs"),
    "pagkd.group_size": (100_000, "images per group"),
    "pagkd.min_group_size": (100_000, "images per group"),
    "pagkd.subtypes": (256, "prototype sets per class"),
    "pagkd.codebook_size": (4096, "centroids per class and label"),
    "pagkd.kmeans_iters": (100, "federated Lloyd steps per refresh, each a round trip"),
    "train.lr": (10, "learning rate"),
    "train.weight_decay": (10, "weight decay"),
    "train.batch_size": (65_536, "images per batch"),
    "train.epochs": (100_000, "epochs"),
    "train.teacher_epochs": (100_000, "epochs"),
    "train.local_epochs": (10_000, "epochs per round"),
    "train.seed": (2**31 - 1, "a 31-bit seed, what every generator of a run takes"),
    "fed.teacher_rounds": (100_000, "rounds"),
    "fed.student_rounds": (100_000, "rounds"),
    "fed.bank_refresh_every": (100_000, "rounds"),
    "fed.min_nbi_sites": (10_000, "sites"),
    "fed.min_wli_sites": (10_000, "sites"),
    "fed.round_timeout": (7 * 86_400, "seconds: one week"),
    "fed.resend_crashed": (100, "resends"),
    "fed.site_lost_s": (7 * 86_400, "seconds: one week"),
    "fed.num_bins": (100_000, "histogram bins"),
    "fed.max_norm_ratio": (1e12, "multiple of the median norm"),
    "fed.fedproto_weight": (1e6, "loss weight"),
    "fed.clip_ratio": (1e12, "multiple of the median norm"),
    "privacy.noise_multiplier": (1e6, "sigma"),
    "privacy.clip": (1e12, "L2 bound"),
}
