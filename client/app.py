"""FedPaGKD ClientApp: one handler per protocol message, each a thin translation layer.

Every handler parses and validates its request with :mod:`common.records`, checks that this
site's modality fits the request (teacher and knowledge: NBI; student: WLI), runs the local
work from :mod:`client.train` / :mod:`client.knowledge`, and answers with a validated payload.
Any failure becomes an ``error`` reply naming the site and the reason, so the server can drop
this site and go on. Between the messages of one bank refresh the site keeps, in its Flower
``context.state`` (never sent), what it extracted at the seeds (its groups and kept tokens) and
the refresh's round, seed and secure-aggregation key.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import time
import zlib
from importlib import metadata
from typing import Callable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from client import policy
from client.baselines import loss_terms, student_modalities
from client.egress import logged, release_key, releases_made
from client.knowledge import SiteKnowledge, extract_site_knowledge, knowledge_seeds, knowledge_sums
from client.site import SiteData, resolve_site
from client.train import Span, balanced_loader, eval_loader, predict, train_student, train_teacher
from client.wire import MESSAGE_TYPE, from_recorddict, load_numpy_state, state_to_numpy, to_recorddict
from common.config import Config, config_from_flat
from common import secagg
from common.losses import KnowledgeBank
from common.metrics import score_histogram
from common.device import pick_device
from common.models import build_query_head, build_student, build_teacher
from common.progress import configure_logging, site_log
from common.records import (
    EVALUATION_FIELDS,
    EVALUATION_SPLITS,
    IMAGE_COUNT,
    PROTOCOL_VERSION,
    Dims,
    Payload,
    PayloadError,
    dims_of,
    empty_statistics,
    make,
    validate,
)

log = logging.getLogger(__name__)
app = ClientApp()

try:
    VERSION = metadata.version("fedpagkd")
except metadata.PackageNotFoundError:  # running from a source tree (the FAB)
    VERSION = "0.1.0"

# Local state kept between the knowledge messages of one bank refresh (never sent): the site's
# extracted groups and tokens (client.knowledge.SiteKnowledge), and the refresh's round, seed
# and secure-aggregation key.
_STATE_EXTRACTED, _STATE_KNOWLEDGE = "knowledge.extracted", "knowledge.config"
# The site's AdamW state between its training rounds (train.keep_optimizer_state; never sent).
_STATE_OPTIMIZER = "optimizer."  # + role (teacher | student)


class RoleError(ValueError):
    """A request for the other modality's role (e.g. teacher training on a WLI site)."""


def site_seed(seed: int, site_name: str) -> int:
    """A per-site seed that is stable across processes (no Python hash randomisation)."""
    return (seed * 1_000_003 + zlib.crc32(site_name.encode())) % 2**31


Handler = Callable[[Payload, SiteData, Config, Dims, Context], Payload]

# Fault-injection drill (deploy/README.md, "Drills"): a slow site, off unless set in the SuperNode's environment.
DRILL_DELAY_ENV = "FEDPAGKD_DRILL_DELAY_S"


def drill_delays(text: str | None = None) -> dict[str, float]:
    """Seconds to wait before handling each request kind, from ``FEDPAGKD_DRILL_DELAY_S``
    (``text`` instead of the environment when given): comma-separated ``kind=seconds``, e.g.
    ``student.train=40,evaluate=5``. Unset or empty: no delay. A malformed value raises a
    ValueError naming the variable and the expected form (the handler turns it into an error
    reply, so the server logs it with the site's name)."""
    text = os.environ.get(DRILL_DELAY_ENV, "") if text is None else text
    delays: dict[str, float] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        kind, sep, value = (s.strip() for s in item.partition("="))
        try:
            seconds = float(value) if sep else math.nan
        except ValueError:
            seconds = math.nan
        if kind not in MESSAGE_TYPE or not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(
                f"{DRILL_DELAY_ENV}={text!r}: {item!r} is not kind=seconds; expected comma-separated kind=seconds with kind one of "
                f"{', '.join(MESSAGE_TYPE)} and seconds >= 0, e.g. {DRILL_DELAY_ENV}='student.train=40'"
            )
        delays[kind] = seconds
    return delays


def handles(
    kind: str, modalities: tuple[str, ...] | Callable[[Config], tuple[str, ...]]
) -> Callable[[Handler], Callable[[Message, Context], Message]]:
    """Wrap a handler: parse + validate the request, resolve the site, check its role (the
    ``modalities`` allowed, or a function of the run config giving them), turn any failure
    into an ``error`` reply that names the site."""

    def decorate(handler: Handler) -> Callable[[Message, Context], Message]:
        def wrapped(message: Message, context: Context) -> Message:
            started = time.perf_counter()
            configure_logging(site_log.name)
            site_name = str(context.node_config.get("site-name", f"partition-{context.node_config.get('partition-id', '?')}"))
            policy.guard_process()  # a deployment ClientApp ends with its SuperNode
            nonce = ""  # the request's, echoed by the reply (an error too) so the server can bind it
            try:
                if delay := drill_delays().get(kind, 0.0):
                    log.warning(
                        "drill (%s): site '%s' waits %.1f s before handling '%s'", DRILL_DELAY_ENV, site_name, delay, kind
                    )
                    time.sleep(delay)
                cfg = policy.site_config(config_from_flat(context.run_config), context.node_config, site_name)
                dims = dims_of(cfg)
                request = from_recorddict(message.content, "server")
                nonce = request.nonce
                validate(request, dims, sender="server")
                if request.kind != kind:
                    raise PayloadError(f"expected a '{kind}' request, got '{request.kind}'")
                site = resolve_site(context.node_config, cfg)
                site_name = site.name
                allowed = modalities(cfg) if callable(modalities) else modalities
                if site.modality not in allowed:
                    raise RoleError(
                        f"site '{site.name}' holds {site.modality.upper()} data but '{kind}' is for "
                        f"{'/'.join(m.upper() for m in allowed)} sites; check its 'modality' in the node config"
                    )
                torch.manual_seed(site_seed(int(request.config.get("seed", 0)), site.name))
                reply = handler(request, site, cfg, dims, context)
                validate(reply, dims, sender=f"site '{site.name}'")
                round_ = request.config.get("round")
                site_log.info(
                    "site '%s': %s%s done in %.1f s%s",
                    site.name,
                    kind,
                    f" (round {round_})" if round_ is not None else "",
                    time.perf_counter() - started,
                    _loss_note(reply),
                )
            except Exception as err:  # noqa: BLE001 - every failure must reach the server as a reply
                log.exception("site '%s' refused '%s'", site_name, kind)
                reason = f"{type(err).__name__}: {err}"  # bounded: the server refuses over-long strings
                reply = Payload("error", config={"site-name": site_name, "reason": reason[:4000]})
            reply = logged(
                reply,
                context.node_config,
                site=site_name,
                run_id=context.run_id,  # the site's own record, before it leaves
                run_name=str(context.run_config.get("fed.run_name", "")),
                request=kind,
            )
            reply.nonce = nonce  # a refusal by logged() too
            return Message(to_recorddict(reply, compute_s=time.perf_counter() - started), reply_to=message)

        # Not functools.wraps: Flower inspects the (message, context) signature of what it registers.
        wrapped.__name__, wrapped.__doc__ = handler.__name__, handler.__doc__
        return wrapped

    return decorate


def _loss_note(reply: Payload) -> str:
    """``, loss 0.1234 over 96 images`` for a training reply (the per-round progress line)."""
    if "loss" not in reply.config or "num-examples" not in reply.config:
        return ""
    return f", loss {reply.config['loss']:.4f} over {reply.config['num-examples']} images"


def _class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)[:num_classes].astype(np.int64)


@app.query("discover")
@handles("discover", ("nbi", "wli"))
def discover(request: Payload, site: SiteData, cfg: Config, dims: Dims, context: Context) -> Payload:
    """Metadata only: modality, class names and counts, software version, the statistics
    releases this site counted for the run and the files it did not read (by reason). The names
    go even when they differ from the run's: the server compares every site's and says what to fix."""
    classes = len(site.class_names)
    run = release_key(str(context.run_config.get("fed.run_name", "")), context.run_id)
    return make(
        "metadata",
        dims,
        arrays={
            "train_class_counts": _class_counts(site.train.labels, classes),
            "val_class_counts": _class_counts(site.val.labels if site.val is not None else [], classes),
            "test_class_counts": _class_counts(site.test.labels, classes),
        },
        config={
            "site-name": site.name,
            "modality": site.modality,
            "version": VERSION,
            "protocol": PROTOCOL_VERSION,
            "class-names": json.dumps(list(site.class_names)),
            "releases": releases_made(context.node_config, run),
            "skipped-files": json.dumps(_skipped_files(site)),
        },
    )


def _skipped_files(site: SiteData) -> dict[str, int]:
    """{reason: files} the site's splits did not read (:attr:`common.data.FolderSiteDataset.skipped`;
    none for the built-in data), the site's folder written as ``<data-path>``: its path stays here."""
    counts: dict[str, int] = {}
    for split in (site.train, site.val, site.test):
        root = str(getattr(split, "root", ""))
        for reason, files in getattr(split, "skipped", {}).items():
            key = reason.replace(root, "<data-path>") if root else reason
            counts[key] = counts.get(key, 0) + len(files)
    return counts


def _teacher_and_head(request: Payload, cfg: Config, dims: Dims):
    teacher = build_teacher(cfg.model, dims.C, initial=False)
    head = build_query_head(cfg.model, dims.C)
    load_numpy_state(teacher, request.weights["teacher"], "teacher")
    load_numpy_state(head, request.weights["head"], "head")
    return teacher, head


@app.train("teacher")
@handles("teacher.train", ("nbi",))
def teacher_round(request: Payload, site: SiteData, cfg: Config, dims: Dims, context: Context) -> Payload:
    """Local teacher epochs on NBI (FedAvg'ed by the server); the received (previous round's
    global) teacher is scored first when asked (model selection on the val split)."""
    teacher, head = _teacher_and_head(request, cfg, dims)
    scores, scored = _scores(teacher, site, cfg, dims, request.config["evaluate"])
    seed = site_seed(request.config["seed"], site.name)
    loader = balanced_loader(site.train, cfg.train.batch_size, seed, cfg.data.num_workers)
    result = train_teacher(
        teacher,
        head,
        loader,
        cfg,
        pick_device(cfg.train.device),
        request.config["local-epochs"],
        seed,
        span=_span(request),
        optimizer_state=_kept_optimizer(context, cfg, "teacher"),
    )
    _keep_optimizer(context, cfg, "teacher", result.optimizer_state)
    return make(
        "teacher.update",
        dims,
        arrays=scores,
        # The FedAvg weight is the images the update comes from (what the server can check
        # against this site's declared train count), not the batches drawn from them.
        config={"num-examples": len(site.train), "loss": result.losses.get("total", 0.0), **scored},
        weights={"teacher": state_to_numpy(teacher), "head": state_to_numpy(head)},
    )


def _span(request: Payload) -> Span:
    return Span(request.config["schedule-start"], request.config["schedule-end"])


def _kept_optimizer(context: Context, cfg: Config, role: str) -> dict | None:
    """This site's optimiser state from its previous ``role`` round (train.keep_optimizer_state),
    kept in the Flower context (the node's memory of this run; never sent). None: a fresh AdamW."""
    key = _STATE_OPTIMIZER + role
    if not cfg.train.keep_optimizer_state or key not in context.state.config_records:
        return None
    return torch.load(io.BytesIO(context.state.config_records[key]["state"]), weights_only=True)


def _keep_optimizer(context: Context, cfg: Config, role: str, state: dict | None) -> None:
    if cfg.train.keep_optimizer_state and state is not None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        context.state[_STATE_OPTIMIZER + role] = ConfigRecord({"state": buffer.getvalue()})


def _site_knowledge(site: SiteData, cfg: Config, teacher, head, seed: int):
    loader = eval_loader(site.train, cfg.train.batch_size, cfg.data.num_workers)
    return extract_site_knowledge(teacher, head, loader, cfg, pick_device(cfg.train.device), seed)


@app.query("knowledge_seed")
@handles("knowledge.seed", ("nbi",))
def knowledge_seed(request: Payload, site: SiteData, cfg: Config, dims: Dims, context: Context) -> Payload:
    """Start a bank refresh: extract this site's groups and tokens with the received teacher
    and head, keep them locally for the refresh's Lloyd steps, return k-means seeds."""
    teacher, head = _teacher_and_head(request, cfg, dims)
    seed = site_seed(request.config["seed"], site.name)
    local = {"seed": seed, "round": request.config["round"]}
    public_key = ""
    if cfg.privacy.secure_aggregation:  # an ephemeral key pair for this refresh's masked sums
        keys = secagg.generate_keypair()
        local["secagg-private"], public_key = keys.private, secagg.public_key_hex(keys)
    knowledge = _site_knowledge(site, cfg, teacher, head, seed)
    context.state[_STATE_EXTRACTED] = ArrayRecord(knowledge.to_tensors())
    context.state[_STATE_KNOWLEDGE] = ConfigRecord(local)
    scores, scored = _scores(teacher, site, cfg, dims, request.config["evaluate"])
    return make(
        "knowledge.seeds",
        dims,
        arrays={**knowledge_seeds(knowledge, dims, cfg, seed), **scores},
        config={"groups": len(knowledge.group_labels), "public-key": public_key, **scored},
    )


@app.query("knowledge_stats")
@handles("knowledge.stats", ("nbi",))
def knowledge_stats(request: Payload, site: SiteData, cfg: Config, dims: Dims, context: Context) -> Payload:
    """One federated Lloyd step: sums and counts for the server's centroids, over the groups
    and tokens this site extracted at the refresh's seeds (the same groups at every step)."""
    if _STATE_KNOWLEDGE not in context.state.config_records or _STATE_EXTRACTED not in context.state.array_records:
        raise RuntimeError(f"site '{site.name}' has no teacher for this refresh (restarted?); the server must re-seed")
    local = context.state.config_records[_STATE_KNOWLEDGE]
    if local["round"] != request.config["round"]:
        raise RuntimeError(f"site '{site.name}' holds the teacher of refresh {local['round']}, not {request.config['round']}")
    knowledge = SiteKnowledge.from_tensors(context.state.array_records[_STATE_EXTRACTED].to_torch_state_dict())
    sums = knowledge_sums(knowledge, dims, cfg, request.arrays)
    sizes = knowledge.group_sizes
    config = {"groups": len(sizes), "smallest-group": int(sizes.min()) if len(sizes) else 0}
    if not request.config["peers"]:
        return make("knowledge.sums", dims, arrays=sums, config=config)
    return make("knowledge.masked", dims, arrays=_masked(sums, site, request, local), config=config)


def _masked(sums: dict[str, np.ndarray], site: SiteData, request: Payload, local) -> dict[str, np.ndarray]:
    """This site's sums in fixed point plus its pairwise masks with the listed peers."""
    if "secagg-private" not in local:
        raise RuntimeError(
            f"site '{site.name}' was asked for masked sums but made no key this refresh; set privacy.secure_aggregation "
            "the same on server and sites"
        )
    try:
        listed = json.loads(request.config["peers"])
    except json.JSONDecodeError as err:
        raise PayloadError(f"knowledge.stats: 'peers' is not JSON ({err})") from None
    if not isinstance(listed, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in listed.items()):
        raise PayloadError("knowledge.stats: 'peers' must map site names to public-key hex strings")
    private = bytes(local["secagg-private"])
    own = secagg.public_key_hex(secagg.keypair_from_private(private))
    if listed.get(site.name) != own:  # the server must list this site with the key it made
        raise PayloadError(f"knowledge.stats: the peer list does not carry site '{site.name}''s own public key")
    peers = {name: secagg.parse_public_key(key, name) for name, key in listed.items() if name != site.name}
    context = f"{request.config['round']}|{request.config['iteration']}|{request.config['attempt']}"
    used = list(local.get("secagg-used", []))
    if context in used:  # a second roster under one context would let the server cancel the masks
        raise PayloadError(
            f"knowledge.stats: site '{site.name}' already masked a sum for step {context}; a restart needs a new attempt"
        )
    local["secagg-used"] = used + [context]
    masks = secagg.pairwise_masks(site.name, private, peers, context.encode(), {k: v.shape for k, v in sums.items()})
    return secagg.mask(secagg.encode_fixed_point(sums), masks)


@app.train("student")
@handles("student.train", student_modalities)
def student_round(request: Payload, site: SiteData, cfg: Config, dims: Dims, context: Context) -> Payload:
    """Local student epochs with CE + GKD-Pro + GKD-Den against the NBI bank, plus the loss terms
    of the baseline plug-ins the config turns on (:mod:`client.baselines`)."""
    student = build_student(cfg.model, dims.C, initial=False)
    head = build_query_head(cfg.model, dims.C)
    load_numpy_state(student, request.weights["student"], "student")
    load_numpy_state(head, request.weights["head"], "head")
    bank = None
    if request.config["use-bank"]:
        if IMAGE_COUNT not in request.arrays:  # the schema lets a student request go without the bank
            raise PayloadError(
                "student.train: use-bank is set but the request carries no bank: run one release at coordinator and sites"
            )
        bank = KnowledgeBank.from_statistics(request.arrays)
    terms = loss_terms(cfg, request.arrays)
    # The received student is the previous round's global model: score it before training.
    scores, scored = _scores(student, site, cfg, dims, request.config["evaluate"])
    seed = site_seed(request.config["seed"], site.name)
    loader = balanced_loader(site.train, cfg.train.batch_size, seed, cfg.data.num_workers, cfg.train.sampler == "balanced")
    device = pick_device(cfg.train.device)
    result = train_student(
        student,
        head,
        loader,
        lambda: bank.to(device) if bank is not None else None,
        cfg,
        device,
        request.config["local-epochs"],
        seed,
        group_losses=request.config["group-losses"],
        terms=terms,
        span=_span(request),
        optimizer_state=_kept_optimizer(context, cfg, "student"),
    )
    _keep_optimizer(context, cfg, "student", result.optimizer_state)
    losses = result.losses
    carried = {}  # what the baselines' terms send back (common.records: only what the method uses)
    for term in terms:
        carried.update(term.reply_arrays())
    return make(
        "student.update",
        dims,
        arrays={**scores, **carried},
        config={
            **scored,
            "num-examples": len(site.train),  # the images the update comes from (see teacher_round)
            "loss": losses.get("total", 0.0),
            "ce": losses.get("ce", 0.0),
            "den": losses.get("den", 0.0),
            "pro": losses.get("group_ce", 0.0) + losses.get("contrastive", 0.0),
        },
        weights={"student": state_to_numpy(student), "head": state_to_numpy(head)},
    )


@app.evaluate("score")
@handles("evaluate", ("nbi", "wli"))
def evaluate(request: Payload, site: SiteData, cfg: Config, dims: Dims, context: Context) -> Payload:
    """Score histograms + confusion matrix of the held-out split (no per-image scores leave)."""
    model = request.config["model"]
    expected = {"student": "wli", "teacher": "nbi"}.get(model)
    if expected is None:
        raise PayloadError(f"evaluate: model '{model}' is not 'student' or 'teacher'")
    if site.modality != expected:
        raise RoleError(
            f"site '{site.name}' holds {site.modality.upper()} data; the {model} is evaluated on {expected.upper()} sites"
        )
    split = request.config["split"]
    if split not in EVALUATION_SPLITS:
        raise PayloadError(f"evaluate: split '{split}' is not one of {list(EVALUATION_SPLITS)}")
    net = (build_student if model == "student" else build_teacher)(cfg.model, dims.C, initial=False)
    load_numpy_state(net, request.weights["net"], "net")
    scores, scored = _scores(net, site, cfg, dims, split)
    return make("evaluation", dims, arrays=scores, config={"num-examples": scored["eval-examples"], "loss": scored["eval-loss"]})


def _scores(net, site: SiteData, cfg: Config, dims: Dims, split: str) -> tuple[dict[str, np.ndarray], dict[str, int | float]]:
    """Score histograms (C x B) and confusion (C x C) of ``net`` on ``split`` ('val' or 'test'),
    with the ``eval-examples`` / ``eval-loss`` config; all zero when ``split`` is '' (no
    evaluation asked) or the site has no such split (it then scores nothing, and says so)."""
    if not split:
        return empty_statistics(EVALUATION_FIELDS, dims), {"eval-examples": 0, "eval-loss": 0.0}
    if split == "val" and site.val is None:
        log.warning("site '%s' has no val split: it takes no part in model selection", site.name)
        return empty_statistics(EVALUATION_FIELDS, dims), {"eval-examples": 0, "eval-loss": 0.0}
    loader = eval_loader(site.split(split), cfg.train.batch_size, cfg.data.num_workers)
    probs, labels, loss = predict(net, loader, pick_device(cfg.train.device), cfg.train.amp)
    hist = score_histogram(probs, labels, num_bins=dims.B)
    arrays = {"score_positives": hist.positives, "score_negatives": hist.negatives, "confusion": hist.confusion}
    return arrays, {"eval-examples": int(len(labels)), "eval-loss": float(loss) if np.isfinite(loss) else 0.0}
