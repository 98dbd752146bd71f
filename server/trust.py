"""What the server checks of a reply beyond its schema: nothing a site claims is trusted
beyond what it declared at discovery and can be checked.

:func:`common.records.validate` already refuses a malformed or non-finite reply. These
screens refuse a well-formed one whose numbers contradict the site's own discovery metadata:

* a training reply's ``num-examples`` (its FedAvg weight) must be in 1..the training images
  it declared: a claimed 1e12 would make the global model that site's upload, a negative
  count could cancel another site's weight, 0 would hide a site that did send weights;
* an evaluation's histograms must count exactly the images of the split the request asked
  for (:func:`evaluated_split`): every image once per class in the score histograms
  (positive for its own class, negative for the others) and once in the confusion matrix,
  with the row sums equal to the declared class counts; scaled or invented histograms move
  the pooled AUC;
* a reply that evaluates when it was not asked to carries nothing (all zero).

A failed screen raises :class:`TrustError`; the workflow drops that site's reply with the
reason, as it does a malformed one. Replies are bound to their request by message id and by
the request's nonce in :class:`server.channel.Channel` (a reply to another round's or another
run's request is dropped). Declared sizes themselves cannot be checked: whatever a site declares,
its share of any weighted aggregate is capped (``fed.max_site_share``,
:func:`server.aggregation.capped_shares`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from common.records import Payload

# The reply config key holding the images a reply's evaluation scored, by reply kind.
EVALUATED_EXAMPLES = {
    "evaluation": "num-examples",
    "student.update": "eval-examples",
    "knowledge.seeds": "eval-examples",
    "teacher.update": "eval-examples",
}
# Replies whose ``num-examples`` weighs their weights in FedAvg.
TRAINING_REPLIES = ("teacher.update", "student.update")


class TrustError(ValueError):
    """A well-formed reply whose numbers contradict what its site declared at discovery."""


def evaluated_split(request: Payload) -> str | None:
    """The split a request asks a site to score, or None when it asks for no evaluation.

    An ``evaluate`` request names its split; a training or seed request names the split of the
    evaluation folded into its reply in ``evaluate`` ('' for none)."""
    if request.kind == "evaluate":
        return str(request.config["split"])
    return str(request.config.get("evaluate") or "") or None


def screen_examples(reply: Payload, declared_train: int, site: str) -> None:
    """``num-examples`` of a training reply must be in 1..``declared_train``."""
    claimed = reply.config["num-examples"]
    if not 0 < claimed <= declared_train:
        raise TrustError(
            f"site '{site}' claims num-examples = {claimed} but declared {declared_train} training image(s) at discovery; "
            f"a training reply's count must be in 1..{declared_train} (the images its update comes from)"
        )


def screen_evaluation(reply: Payload, split: str | None, declared: Sequence[int], site: str) -> None:
    """The evaluation a reply carries must count exactly the ``declared`` [C] class counts of
    the requested ``split`` (nothing at all when ``split`` is None)."""
    key = EVALUATED_EXAMPLES[reply.kind]
    positives, negatives, confusion = (reply.arrays[k] for k in ("score_positives", "score_negatives", "confusion"))
    claimed = reply.config[key]
    if split is None:
        if claimed != 0 or positives.any() or negatives.any() or confusion.any():
            raise TrustError(f"site '{site}' sent an evaluation ({key} = {claimed}) that was not asked for")
        return
    counts = np.asarray(declared, dtype=np.int64)  # [C]
    total = int(counts.sum())
    problems = []
    if claimed != total:
        problems.append(f"{key} = {claimed}")
    if not np.array_equal(confusion.sum(axis=1), counts):
        problems.append(f"confusion rows sum to {confusion.sum(axis=1).tolist()}")
    if not np.array_equal(positives.sum(axis=1), counts):
        problems.append(f"positive histograms count {positives.sum(axis=1).tolist()}")
    if not np.array_equal(negatives.sum(axis=1), total - counts):
        problems.append(f"negative histograms count {negatives.sum(axis=1).tolist()}")
    if problems:
        raise TrustError(
            f"site '{site}' evaluated the '{split}' split with {', '.join(problems)}, but declared {counts.tolist()} "
            f"'{split}' image(s) per class ({total} in all) at discovery; each image is counted once"
        )


def screen_reply(request: Payload, reply: Payload, declared: dict[str, Sequence[int]], site: str) -> None:
    """Every screen that applies to ``reply`` (answering ``request``); ``declared`` maps a
    split name to the [C] class counts the site declared for it at discovery."""
    if reply.kind in TRAINING_REPLIES:
        screen_examples(reply, int(sum(declared["train"])), site)
    if reply.kind in EVALUATED_EXAMPLES:
        split = evaluated_split(request)
        if split is not None and split not in declared:
            raise TrustError(
                f"site '{site}' declared no '{split}' split at discovery, so its '{split}' evaluation cannot be checked"
            )
        screen_evaluation(reply, split, declared.get(split, ()), site)
