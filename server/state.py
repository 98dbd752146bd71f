"""Checkpoint and resume: the server's state after each finished round, written atomically.

:class:`RunState` is everything a run carries from round to round: the global teacher, student
and query head, the bank (summed :data:`common.records.BANK_STATISTICS`), the FedProto class
prototypes, the current centroids, the best weights so far per model (model selection), the
phase :class:`Progress` and the metrics. :func:`save_run` / :func:`load_run` write and read it
with the ledger's snapshot, the flat config and the discovered sites; :func:`check_compatible`
is the rule for resuming: the same config, up to the keys in :data:`RESUME_IGNORES`.

A run folder holds ``state.safetensors`` (global weights, the bank, centroids: flat
``<block>/<name>`` keys) and ``state.json`` (phase progress, metrics, byte counts, config).
Both are written to a temporary file, fsynced and renamed, tensors first, so a crash leaves
either the previous consistent pair or the new one: a state.json never points at tensors it
does not match (it records the tensor file's digest). Loading verifies that digest and uses
safetensors (no pickle), so a tampered or half-written checkpoint is refused, not executed.

Records that cannot be lost or forged:

* ``state.json`` and the run's ledger carry a keyed digest (HMAC-SHA256, :func:`seal`) with
  the key of :func:`state_key`: ``$FEDPAGKD_STATE_KEY`` where the operator sets one (kept
  away from the run folders, that also stops whoever can write them), else a key file
  created once beside the run folders. An edited progress, AUC or release count is refused.
* The ledger counts its writes (``seq``); the state records the count it was saved with, so
  a ledger replaced by an older copy, or deleted, is refused rather than restarted from.
* :func:`check_run_folder` refuses a folder holding some of a run's files but not its state
  (a deleted ``state.json`` must not start the run over on top of its metrics and ledger).
* :class:`RunLock` holds an ``fcntl`` lock on ``<run>/.lock`` while a run uses the folder:
  a second run with the same ``fed.run_name`` is refused while the first is alive.

An OS error reading or writing the folder (no permission, a full disk) is a :class:`StateError`
naming the folder and the fix (:func:`run_folder_io`); the last saved round stays intact.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
from safetensors.numpy import load_file, save_file

from common.config import RENAMED_KEYS
from common.files import atomic_write, atomic_write_json, json_default

TENSORS, META = "state.safetensors", "state.json"
LOCK = ".lock"
KEY_ENV, KEY_FILE = "FEDPAGKD_STATE_KEY", ".fedpagkd-state-key"
# What a run writes into its folder; any of them without state.json is an incomplete record.
RUN_FILES = (TENSORS, "ledger.json", "metrics.json", "egress.json", "config.json", "student.safetensors")


class StateError(RuntimeError):
    """A checkpoint that cannot be trusted or does not belong to this run."""


@contextlib.contextmanager
def run_folder_io(run_dir: Path) -> Iterator[None]:
    """An OS error while reading or writing ``run_dir`` (no permission, a full disk) as a
    :class:`StateError` naming the folder and the fix (instead of a bare PermissionError)."""
    try:
        yield
    except OSError as err:
        raise StateError(
            f"run folder {run_dir}: {err.strerror or err} ({err.filename or run_dir}). Make {run_dir} and its files "
            f"readable and writable by this user (ls -ld {run_dir}) and free space on its disk (df -h {run_dir}), then "
            "start the same run again: it resumes from its last saved round"
        ) from err


def ensure_run_folder(run_dir: Path) -> None:
    """Create ``run_dir`` (and its parents), or a :class:`StateError` saying why not and the fix."""
    with run_folder_io(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)


State = dict[str, np.ndarray]

# Config keys a resumed run may change: more rounds, another timeout, resend count or run folder, another
# acceptance share. Any other difference refuses the resume.
RESUME_IGNORES = frozenset(
    {
        "fed.teacher_rounds",
        "fed.student_rounds",
        "fed.round_timeout",
        "fed.resend_crashed",
        "fed.site_lost_s",
        "fed.run_dir",
        "fed.run_name",
        "fed.min_site_share",
    }
)


@dataclass
class Progress:
    """Finished rounds per phase."""

    teacher_rounds: int = 0
    refreshes: int = 0
    student_rounds: int = 0


@dataclass
class RunState:
    """What a run carries between rounds (numpy state dicts and the bank's arrays)."""

    teacher: State
    student: State
    head: State
    bank: State  # the summed bank statistics the students are sent
    class_prototypes: State  # FedProto-style baseline: summed class prototypes
    centroids: State = field(default_factory=dict)  # the last refresh's codebooks (empty before one)
    # Model selection: per model ("teacher", "student") the global weights of the round with the
    # best pooled val AUC so far ({block: state}); metrics["selection"] says which round.
    best: dict[str, dict[str, State]] = field(default_factory=dict)
    progress: Progress = field(default_factory=Progress)
    metrics: dict[str, Any] = field(default_factory=dict)

    def blocks(self) -> dict[str, State]:
        """The tensors as ``state.safetensors`` blocks."""
        blocks = {
            "teacher": self.teacher,
            "student": self.student,
            "head": self.head,
            "bank": self.bank,
            "prototypes": self.class_prototypes,
        }
        if self.centroids:
            blocks["centroids"] = self.centroids
        for model, weights in self.best.items():
            blocks.update({f"best-{model}-{block}": state for block, state in weights.items()})
        return blocks

    def restore(self, blocks: Mapping[str, State], meta: Mapping[str, Any]) -> None:
        """Take a saved state's blocks and metadata (what :func:`load_run` returns)."""
        self.teacher, self.student, self.head, self.bank = blocks["teacher"], blocks["student"], blocks["head"], blocks["bank"]
        self.centroids = blocks.get("centroids", {})
        for name, state in blocks.items():
            if name.startswith("best-"):
                _, model, block = name.split("-", 2)
                self.best.setdefault(model, {})[block] = state
        self.class_prototypes = blocks.get("prototypes", self.class_prototypes)
        self.progress = Progress(**meta["progress"])
        self.metrics = meta["metrics"]
        self.metrics.setdefault("selection", {})


def check_compatible(run_dir: Path, mine: Mapping[str, Any], theirs: Mapping[str, Any]) -> None:
    """Refuse to resume ``run_dir`` (saved with flat config ``theirs``) under ``mine`` when they
    differ in any key but :data:`RESUME_IGNORES`."""
    mine = {k: v for k, v in mine.items() if k not in RESUME_IGNORES}
    theirs = {RENAMED_KEYS.get(k, k): v for k, v in theirs.items()}  # a folder saved before a key's rename
    theirs = {k: v for k, v in theirs.items() if k not in RESUME_IGNORES}
    if mine != theirs:
        changed = sorted(k for k in mine if mine[k] != theirs.get(k))
        raise StateError(f"run folder {run_dir} was started with another config (differs in {changed}); use a new fed.run_name")


def save_run(run_dir: Path, run: RunState, extra: Mapping[str, Any]) -> None:
    """Save ``run`` with the rest of its metadata (``extra``: the ledger's snapshot, the flat
    config, the discovered sites)."""
    save_state(run_dir, run.blocks(), {"progress": run.progress.__dict__, "metrics": run.metrics, **extra})


def load_run(run_dir: Path, config: Mapping[str, Any]) -> tuple[dict[str, State], dict[str, Any]] | None:
    """The last saved state of ``run_dir`` as (blocks, metadata), checked against this run's
    flat ``config`` (:func:`check_compatible`); None when the run has not started."""
    loaded = load_state(run_dir)
    if loaded is None:
        return None
    blocks, meta = loaded
    check_compatible(run_dir, config, meta["config"])
    return blocks, meta


def flatten_blocks(blocks: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {f"{block}/{name}": np.ascontiguousarray(a) for block, arrays in blocks.items() for name, a in arrays.items()}


def unflatten_blocks(flat: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    blocks: dict[str, dict[str, np.ndarray]] = {}
    for key, array in flat.items():
        block, name = key.split("/", 1)
        blocks.setdefault(block, {})[name] = array
    return blocks


def state_key(run_dir: Path) -> bytes:
    """The key of the run's keyed digests: ``$FEDPAGKD_STATE_KEY`` when set, else the key
    file beside the run folders (created once, mode 0600)."""
    if os.environ.get(KEY_ENV):
        return os.environ[KEY_ENV].encode()
    path = run_dir.parent / KEY_FILE
    with run_folder_io(run_dir.parent):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32))
        except FileExistsError:
            pass
        key = path.read_text().strip()
    if not key:
        raise StateError(f"{path} (the key of the run folders' digests) is empty; restore it from a backup, or set ${KEY_ENV}")
    return key.encode()


def _canonical(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=json_default).encode()


def seal(obj: Mapping[str, Any], key: bytes) -> dict[str, Any]:
    """``obj`` plus ``hmac``: HMAC-SHA256 of its canonical JSON (sorted keys; JSON types only,
    so it survives a write and a read unchanged)."""
    body = json.loads(_canonical(obj))
    return {**body, "hmac": hmac.new(key, _canonical(body), hashlib.sha256).hexdigest()}


def unseal(obj: Any, key: bytes, path: Path) -> dict[str, Any]:
    """The body of a sealed record, or StateError when its keyed digest does not match."""
    if not isinstance(obj, dict) or not isinstance(obj.get("hmac"), str):
        raise StateError(
            f"{path} carries no keyed digest (written by an older release, or replaced); "
            "it cannot be trusted: start a new run with another fed.run_name"
        )
    body = {k: v for k, v in obj.items() if k != "hmac"}
    expected = hmac.new(key, _canonical(body), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, obj["hmac"]):
        raise StateError(
            f"{path} was edited after the run wrote it (its keyed digest does not match); restore it "
            f"from a backup or start a new run with another fed.run_name (wrong key? ${KEY_ENV} / {KEY_FILE})"
        )
    return body


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StateError(
            f"{path} is not valid JSON ({err}); restore it from a backup or start a new run with another fed.run_name"
        ) from err


def check_run_folder(run_dir: Path) -> None:
    """Refuse a run folder that holds some of a run's files but not its state."""
    if (run_dir / META).exists() or not run_dir.is_dir():
        return
    present = [name for name in RUN_FILES if (run_dir / name).exists()]
    if present:
        raise StateError(
            f"run folder {run_dir} holds {present} but no {META}: its records are incomplete, and starting over would "
            f"overwrite them (metrics, ledger, DP releases). Restore {META} from a backup, or use another fed.run_name"
        )


def save_state(run_dir: Path, blocks: Mapping[str, Mapping[str, np.ndarray]], meta: Mapping[str, Any]) -> None:
    """Write tensors then metadata, each atomically; metadata records the tensors' digest
    and is sealed with the run's key."""
    with run_folder_io(run_dir):
        atomic_write(run_dir / TENSORS, lambda tmp: save_file(flatten_blocks(blocks), tmp))
        data = (run_dir / TENSORS).read_bytes()
        sealed = seal({**meta, "tensors_sha256": hashlib.sha256(data).hexdigest()}, state_key(run_dir))
        atomic_write_json(run_dir / META, sealed)


def load_state(run_dir: Path) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]] | None:
    """The last finished state of a run folder, or None when there is none yet (a folder
    with a run's other files but no state is refused: :func:`check_run_folder`)."""
    with run_folder_io(run_dir):
        return _load_state(run_dir)


def _load_state(run_dir: Path) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]] | None:
    check_run_folder(run_dir)
    meta_path, tensor_path = run_dir / META, run_dir / TENSORS
    if not meta_path.exists():
        return None
    meta = unseal(read_json(meta_path), state_key(run_dir), meta_path)
    if not tensor_path.exists():
        raise StateError(
            f"{tensor_path} is missing although {meta_path} exists; restore it from a backup or use another fed.run_name"
        )
    digest = hashlib.sha256(tensor_path.read_bytes()).hexdigest()
    if digest != meta.get("tensors_sha256"):
        raise StateError(f"{tensor_path} does not match the digest in {meta_path} (tampered or torn write)")
    return unflatten_blocks(load_file(str(tensor_path))), meta


class RunLock:
    """An exclusive ``fcntl`` lock on ``<run_dir>/.lock`` for as long as a run uses the
    folder; released by the kernel when the process dies, so a crash never leaves it stuck."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK
        self.handle = None

    def __enter__(self) -> "RunLock":
        ensure_run_folder(self.path.parent)
        with run_folder_io(self.path.parent):
            handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "?"
            handle.close()
            raise StateError(
                f"run folder {self.path.parent} is in use by another run (pid {owner}); wait for it to end "
                "or use another fed.run_name"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self.handle = handle
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None
