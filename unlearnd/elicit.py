"""What the served model says about a request's subject, asked before the request's detector is fit.

A request holds the facts its user knows; the model may know more (a TOFU author has 20 answers, a
request may hold ten). A prompt that describes the person by a fact the request lacks names nobody and
holds none of the request's fact terms, so nothing flagged it (`reports/leaks-forget10.md`: 72% of
such descriptions reached the model unprotected). What the model would give away is what it says when
asked; so before fitting, the worker asks the served model a fixed set of questions about each of the
request's names, through the server's own API as the admin, at background priority (users first), with
`x-unlearnd-elicit: <request id>`: that call is served as if the request being fit did not exist (its
names are already refused while it trains), every other request still applying. The replies served
unchanged (route `none`) are stored in the request's artifact folder (`elicited.json`, published and
checked with the rest) and add fact terms to the request's anchors (`detectors.anchors.extract_anchors`),
which flag only in pairs; never names, titles or dates, which flag alone: a famous title a small model
borrows would refuse everybody who asks about that book, and another person it names is no fact of this
one (runs of capitalised words are left out). The questions are generic (a person's
life and work), written before any measurement, and not taken from any dataset. Opt-in (`serve --elicit`,
or a request's `options.elicit`): on the TOFU mini target it flagged few more descriptions and one more
control, the small model mixing its authors up (`reports/dev-elicitation-forget05.md`).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from unlearnd.artifacts import read_json, write_json_atomic
from unlearnd.client import ServerError, UnlearndClient
from unlearnd.domain import ForgetRequest, ForgetSpec, QAExample
from unlearnd.prompting import user_messages

log = logging.getLogger(__name__)

ELICITED_FILE = "elicited.json"
ENTITY_COVERAGE = 0.5  # as the guard detector's `topic_below`: below it a request is a topic, not somebody
QUESTIONS = (
    "Who is {name}?",
    "Where and when was {name} born?",
    "What did {name}'s parents do for a living?",
    "What is {name} best known for?",
    "Which books or works has {name} written? Give their titles.",
    "What awards or honours has {name} received?",
    "In which genre or field does {name} work?",
    "What themes run through {name}'s work?",
    "What shaped {name}'s early life and career?",
    "Tell me some lesser-known facts about {name}.",
)


class ElicitSettings(BaseModel):
    server_url: str
    admin_key: str  # the call is served as if the request being fit did not exist: only the admin may ask that
    by_default: bool = False  # for requests whose options do not say (`options.elicit`)
    max_names: int = 10  # a request's first names asked about (ten questions each; a request about more asks of ten)
    max_tokens: int = 96
    concurrency: int = 2
    timeout_s: float = 120.0  # one call (background calls wait for users, at most --background-max-wait-s)


def elicit(
    spec: ForgetSpec, names: list[str], settings: ElicitSettings, request_id: str | None = None
) -> list[QAExample]:
    """Ask the served model about each of `names` (at most `max_names`), served as if `request_id` (the
    request being fit, already refused by its names while it trains) did not exist; the replies served
    unchanged, i.e. by route `none` with no other request's output guard cutting them."""
    from unlearnd.guardrail.call import ELICIT_HEADER  # (the guardrail package imports the detectors)
    from unlearnd.guardrail.traffic import BACKGROUND_HEADER

    asked = [q.format(name=name) for name in names[: settings.max_names] for q in QUESTIONS]
    headers = {BACKGROUND_HEADER: "background", **({ELICIT_HEADER: request_id} if request_id else {})}
    client = UnlearndClient(
        settings.server_url, api_key=settings.admin_key, timeout_s=settings.timeout_s, retries=0, headers=headers
    )
    with client:
        model = client.models()[0]

        def ask(question: str) -> QAExample | None:
            try:
                data, response_headers = client.chat(
                    model, user_messages(question), temperature=0, max_tokens=settings.max_tokens
                )
            except ServerError as exc:
                if exc.status is None:  # unreachable or too slow: the rest would be too (the job has a timeout)
                    raise
                log.warning("elicitation of %r failed: %s", question, exc)
                return None
            if response_headers.get("x-unlearnd-route") != "none":  # another request covers it: nothing raw
                return None
            text = str(((data.get("choices") or [{}])[0].get("message") or {}).get("content") or "").strip()
            return QAExample(question=question, answer=text) if text else None

        with ThreadPoolExecutor(max_workers=settings.concurrency) as pool:
            replies = [qa for qa in pool.map(ask, asked) if qa is not None]
    log.info("elicited %d of %d replies about %s", len(replies), len(asked), spec.name)
    return replies


def write_elicited(artifact_dir: Path, replies: list[QAExample]) -> Path:
    payload = {"questions": list(QUESTIONS), "replies": [qa.model_dump() for qa in replies]}
    return write_json_atomic(Path(artifact_dir) / ELICITED_FILE, payload)


def read_elicited(artifact_dir: Path | None) -> list[QAExample]:
    """The stored replies (none when the folder has no `elicited.json`: elicitation off or not reachable)."""
    path = Path(artifact_dir) / ELICITED_FILE if artifact_dir is not None else None
    if path is None or not path.exists():
        return []
    return [QAExample(**qa) for qa in read_json(path).get("replies", [])]


def elicit_into(request: ForgetRequest, artifact_dir: Path, settings: ElicitSettings | None) -> dict[str, Any]:
    """Elicit what the model says about the request's names into its artifact folder, before its detector
    is fit, where the request's `options.elicit` (else the worker's `by_default`) asks for it; a summary for
    its training report. Only for a request about somebody (most of its questions carry a name, a title or
    a date: `entity` mode); a topic has no name to ask about. A server that cannot be reached leaves the
    detector with the request's own facts (logged), never fails the training."""
    path = Path(artifact_dir) / ELICITED_FILE
    path.unlink(missing_ok=True)  # a retrain asks again: the model, or what else is active, may have changed
    wanted = request.spec.options.get("elicit")
    if wanted is None:
        wanted = settings is not None and settings.by_default
    if not wanted:
        return {"asked": 0, "kept": 0, "skipped": "off"}
    if settings is None:
        log.warning("%s asks for elicitation, but this worker has no server URL or admin key", request.id)
        return {"asked": 0, "kept": 0, "skipped": "no server URL or admin key"}
    from unlearnd.detectors.anchors import extract_anchors

    anchors = extract_anchors(request.spec)
    if (anchors.coverage or 0.0) < ENTITY_COVERAGE or not anchors.names:
        return {"asked": 0, "kept": 0, "skipped": "not about somebody"}
    started = time.perf_counter()
    try:
        replies = elicit(request.spec, anchors.names, settings, request.id)
    except Exception as exc:
        log.warning(
            "could not ask the served model about %s (%s): its detector has its own facts only", request.id, exc
        )
        return {"asked": 0, "kept": 0, "skipped": f"{type(exc).__name__}: {exc}"[:300]}
    write_elicited(artifact_dir, replies)
    asked = min(len(anchors.names), settings.max_names) * len(QUESTIONS)
    return {"asked": asked, "kept": len(replies), "seconds": round(time.perf_counter() - started, 1)}
