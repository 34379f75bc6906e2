"""The training worker: a separate process that turns `pending` forget requests into artifacts.

Serving never blocks on training. The server supervises one worker process and restarts it if it
dies; a request the dead worker was training goes back to `pending` (up to MAX_ATTEMPTS) so
nothing a user registered is lost. A job that raises marks only its own request `failed`.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

from unlearnd.config import DEFAULT_DETECTOR, DEFAULT_MODEL, local_url
from unlearnd.domain import LOAD_FAILED, ForgetRequest, Status
from unlearnd.elicit import ElicitSettings, elicit_into
from unlearnd.evidence import EVIDENCE_ENV, EvidenceRunner, EvidenceSettings
from unlearnd.logs import setup_logging
from unlearnd.methods import METHODS
from unlearnd.registry import Registry

log = logging.getLogger(__name__)


def job_timeout_s(request: ForgetRequest) -> float:
    """The request's own `timeout_s` option, else its method's (the method table says)."""
    entry = METHODS.get(request.method.value)
    return float(request.spec.options.get("timeout_s") or (entry.timeout_s if entry else 600.0))


def watch_job(registry: Registry, request: ForgetRequest, artifact_dir: Path, stop: threading.Event) -> None:
    """Heartbeats; and the job's two ways out while it runs: purged (nothing may stay on disk) or
    over its time (the worker exits, the supervisor starts another, the request is retried)."""
    timeout_s = job_timeout_s(request)
    deadline = time.monotonic() + timeout_s
    while not stop.wait(BEAT_S):
        try:
            record = registry.get(request.id)
        except KeyError:  # purged
            record = None
        except Exception:  # a busy database: try again at the next beat, never stop beating
            log.warning("heartbeat of %s failed", request.id, exc_info=True)
            continue
        if stop.is_set():
            return  # the job ended meanwhile (its own status change is no reason to stop anything)
        if record is None:
            log.warning("%s was purged while training: job cancelled, its files deleted", request.id)
            registry.remove_artifacts(request.id)  # the store's copy too
            _exit(JOB_CANCELLED_EXIT)
            return
        if record.status == Status.inactive:
            log.warning("%s was deactivated while training: job cancelled", request.id)
            _exit(JOB_CANCELLED_EXIT)
            return
        if time.monotonic() > deadline:
            log.error("%s ran past its %.0f s timeout: stopping the worker", request.id, timeout_s)
            _exit(JOB_TIMEOUT_EXIT)
            return
        try:
            registry.heartbeat(request.id)
        except Exception:
            log.warning("heartbeat of %s failed", request.id, exc_info=True)


def record_failure(registry: Registry, request: ForgetRequest, artifact_dir: Path, exc: Exception) -> None:
    """A failed job marks only its own request: failed, or still degraded (refused) when it was a re-training."""
    log.error("training %s failed: %s", request.id, traceback.format_exc())
    error = f"{type(exc).__name__}: {exc}"
    if not registry.exists(request.id):  # purged while it trained (the removal may be what broke it)
        registry.remove_artifacts(request.id)  # the store's copy too
    elif (request.error or "").startswith(LOAD_FAILED):  # a degraded request's re-training: stays refused
        failed = f"{request.error}; re-training failed: {error}"
        registry.set_status(request.id, Status.degraded, failed, expect=Status.training, actor="worker")
    else:
        registry.set_status(request.id, Status.failed, error, expect=Status.training, actor="worker")


def run_job(
    registry: Registry,
    request: ForgetRequest,
    detector_name: str,
    model: str,
    serve_dtype: str = "auto",
    elicitation: ElicitSettings | None = None,
) -> None:
    """Ask the served model about the request's names (with `elicitation`), fit the request's detector,
    then its method's artifact (the method table names the job)."""
    from unlearnd.detectors import get_detector
    from unlearnd.train.job import JobContext

    artifact_dir = registry.artifact_dir(request.id)
    stop = threading.Event()
    threading.Thread(target=watch_job, args=(registry, request, artifact_dir, stop), daemon=True).start()
    started, cpu_started = time.perf_counter(), time.process_time()
    try:
        entry = METHODS.get(request.method.value)
        if entry is None:
            raise NotImplementedError(f"no method {request.method.value!r} in this installation")
        report = {"elicited": elicit_into(request, artifact_dir, elicitation)}
        report["detector"] = get_detector(detector_name).fit(request, artifact_dir)
        job = entry.job_function()
        report["method"] = job(request, artifact_dir, JobContext(registry, model, serve_dtype)) if job else {}
        report["wall_seconds"] = time.perf_counter() - started
        report["cpu_seconds"] = time.process_time() - cpu_started
        registry.save_json(request.id, "training.json", report)
        digest = registry.publish_artifacts(request.id)  # what every replica checks before it loads the folder
        ready = registry.set_status(
            request.id, Status.ready, expect=Status.training, artifact_digest=digest, actor="worker"
        )
        if ready:
            log.info("forget request %s ready (%.1fs)", request.id, report["wall_seconds"])
            registry.prune_artifacts(request.id, digest)
        elif not registry.exists(request.id):  # purged while it trained: leave nothing behind
            registry.remove_artifacts(request.id)  # the store's copy too
    except Exception as exc:
        record_failure(registry, request, artifact_dir, exc)
        return
    finally:
        stop.set()
    if ready:
        queue_evidence(registry, request.id)


def queue_evidence(registry: Registry, request_id: str) -> None:
    """Queue the request's evidence (probed once a server serves it); a failure here is no training failure."""
    try:
        registry.request_evidence(request_id, actor="worker")
    except KeyError:  # purged meanwhile
        pass
    except Exception:
        log.warning(
            "evidence of %s could not be queued (run it with `unlearnd requests evidence --rerun`)",
            request_id,
            exc_info=True,
        )


def run_worker(
    data_dir: Path,
    detector_name: str,
    model: str,
    poll_s: float = 0.5,
    once: bool = False,
    serve_dtype: str = "auto",
    registry_url: str | None = None,
    artifacts: str | None = None,
    evidence: EvidenceSettings | None = None,
    elicitation: ElicitSettings | None = None,
) -> None:
    """Train pending requests one at a time; with `evidence` (the server to probe), a thread beside it runs
    the evidence batteries of requests that became active."""
    registry = Registry(data_dir, registry_url, artifacts)
    lock = acquire_worker_lock(data_dir)  # one trainer per data dir: a second one waits here
    if evidence is not None and not once:
        EvidenceRunner(Registry(data_dir, registry_url, artifacts), evidence).start()
    # Alone on its registry, anything still `training` belonged to a dead worker; on a shared one, only a
    # job whose worker stopped beating is (checked again every so often: other workers die too).
    stale_s = STALE_S if registry.shared else 0.0
    checked = 0.0
    while True:
        if time.monotonic() - checked > STALE_S / 2:
            for request_id in registry.recover_stale(stale_after_s=stale_s):
                log.warning("recovered %s from a dead worker", request_id)
            checked, stale_s = time.monotonic(), STALE_S
        request = registry.claim_next()
        if request is None:
            if once:
                return
            time.sleep(poll_s)
            continue
        log.info("training %s (%s, method %s)", request.id, request.name, request.method.value)
        run_job(registry, request, detector_name, model, serve_dtype, elicitation)
    del lock


BEAT_S = 5.0
STALE_S = 60.0  # a training job whose heartbeat is this old has lost its worker
JOB_TIMEOUT_EXIT = 4
JOB_CANCELLED_EXIT = 5
WORKER_LOCK = "worker.lock"


_WORKER_PROCESS = False  # True in `python -m unlearnd.jobs.worker`: only there may a job end the process


def _exit(code: int) -> None:
    """End the worker process now (a job thread cannot be stopped any other way); in-process callers
    (tests, `unlearnd train --request`) are only told."""
    if not _WORKER_PROCESS:
        log.error("job stopped (exit %d) - not ending this process: it is not a worker process", code)
        return
    logging.shutdown()
    os._exit(code)


def acquire_worker_lock(data_dir: Path, wait: bool = True):
    """An exclusive lock on `<data dir>/worker.lock`, held while the returned file stays open: two
    workers on one registry (a restarted server's and a dead one's orphan) would train the same
    request and overwrite each other's artifacts. None when `wait` is false and the lock is taken."""
    import fcntl

    Path(data_dir).mkdir(parents=True, exist_ok=True)
    handle = open(Path(data_dir) / WORKER_LOCK, "a+")  # held for the worker's life
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _die_with_parent() -> None:
    """Linux: the worker gets SIGTERM when the server that started it dies, even by SIGKILL."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def worker_env(settings) -> dict[str, str]:
    """The server's worker's environment: secrets there, not in argv (a registry URL may hold a password);
    the server's own URL for the evidence probes and the elicitation (each switched by its setting)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if settings.registry:
        env["UNLEARND_REGISTRY"] = settings.registry
    if settings.artifacts:
        env["UNLEARND_ARTIFACTS"] = str(settings.artifacts)
    env["UNLEARND_SERVER_URL"] = local_url(settings.host, settings.port)
    env["UNLEARND_EVIDENCE"] = "1" if settings.evidence else "0"
    env["UNLEARND_ELICIT"] = "1" if settings.elicit else "0"
    if settings.api_key:
        env["UNLEARND_API_KEY"] = settings.api_key
    if settings.admin_key:  # elicitation asks as the admin (else the worker reads the data dir's key file)
        env["UNLEARND_ADMIN_KEY"] = settings.admin_key
    return env


class WorkerSupervisor:
    """Keeps one worker process alive next to the server."""

    def __init__(self, settings) -> None:
        self.settings = settings
        self._proc: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._supervise, daemon=True, name="worker-supervisor")

    def _spawn(self) -> subprocess.Popen:
        cmd = [
            sys.executable,
            "-m",
            "unlearnd.jobs.worker",
            "--data-dir",
            str(self.settings.data_dir),
            "--detector",
            self.settings.detector,
            "--model",
            self.settings.model,
            "--dtype",
            self.settings.dtype,
        ]
        cmd += ["--parent-pid", str(os.getpid())]
        return subprocess.Popen(cmd, env=worker_env(self.settings))

    def start(self) -> None:
        self._proc = self._spawn()
        self._thread.start()

    def _supervise(self) -> None:
        while not self._stop.wait(1.0):
            if self._proc is not None and self._proc.poll() is not None:
                log.warning("training worker exited with %s; restarting", self._proc.returncode)
                self._proc = self._spawn()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def stop(self) -> None:
        self._stop.set()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="unlearnd training worker")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--detector", default=DEFAULT_DETECTOR)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="auto", help="the serving engine's dtype (ECO tunes in it)")
    parser.add_argument("--once", action="store_true", help="exit when no request is pending")
    parser.add_argument(
        "--registry", default=os.environ.get("UNLEARND_REGISTRY"), help="registry database URL (env UNLEARND_REGISTRY)"
    )
    parser.add_argument(
        "--artifacts", default=os.environ.get("UNLEARND_ARTIFACTS"), help="shared artifacts folder or store URL"
    )
    parser.add_argument(
        "--server-url",
        default=os.environ.get("UNLEARND_SERVER_URL"),
        help="the unlearnd server (or replicas' load balancer) the evidence probes go to; none: no evidence",
    )
    parser.add_argument("--parent-pid", type=int, default=None, help="the server: the worker ends with it")
    args = parser.parse_args(argv)
    if args.parent_pid is not None:
        _die_with_parent()
        if os.getppid() != args.parent_pid:  # the server died before the signal was armed
            return
    global _WORKER_PROCESS
    _WORKER_PROCESS = True
    setup_logging("info", process="worker")
    run_worker(
        args.data_dir,
        args.detector,
        args.model,
        once=args.once,
        serve_dtype=args.dtype,
        registry_url=args.registry,
        artifacts=args.artifacts,
        evidence=evidence_settings(args.server_url),
        elicitation=elicit_settings(args.server_url, args.data_dir),
    )


def evidence_settings(server_url: str | None) -> EvidenceSettings | None:
    """The evidence runner's settings (None without a server): the user API key from `UNLEARND_API_KEY`;
    `UNLEARND_EVIDENCE_PER_FORM` (probes per form), `UNLEARND_EVIDENCE_CONCURRENCY` (probes in flight at once)
    and `UNLEARND_EVIDENCE_REST` (rest after a probe, as a multiple of its time: 0 finishes sooner and costs
    the users served meanwhile more)."""
    if not server_url or os.environ.get("UNLEARND_EVIDENCE") == "0":
        log.warning("no --server-url or UNLEARND_EVIDENCE=0: evidence batteries are not run by this worker")
        return None
    given = {field: os.environ[var] for field, var in EVIDENCE_ENV.items() if os.environ.get(var)}
    return EvidenceSettings(server_url=server_url, api_key=os.environ.get("UNLEARND_API_KEY"), **given)


def elicit_settings(server_url: str | None, data_dir: Path | None = None) -> ElicitSettings | None:
    """Where the worker asks the served model about a request's names, as the admin (`UNLEARND_ADMIN_KEY`,
    else the data dir's key file); for every request with `UNLEARND_ELICIT=1`, else only for those whose
    options ask. None without a server or a key: detectors are then fit on the requests' own facts alone."""
    from unlearnd.server.auth import read_admin_key

    admin_key = os.environ.get("UNLEARND_ADMIN_KEY") or (read_admin_key(data_dir) if data_dir else None)
    if not server_url or not admin_key:
        log.info("no --server-url or admin key: detectors are fit without asking the model")
        return None
    return ElicitSettings(
        server_url=server_url, admin_key=admin_key, by_default=os.environ.get("UNLEARND_ELICIT") == "1"
    )


if __name__ == "__main__":
    main()
