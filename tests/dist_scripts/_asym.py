"""A scenario runner for rank-asymmetric failures (used by the asym_*.py scripts, tests/test_distributed_asym.py).

Each scenario runs on every rank with a watchdog; its outcome (ok / the exception's class, message and whether it
is a ``TrainerGuardError``) is recorded per rank. Ranks then meet through FILES, not a collective: a rank left
waiting in a collective that another rank never joined is recorded as ``hung`` (with where it waits) and the
launch ends in bounded time instead of hanging CI. Because a hung collective leaves the process group unusable,
the first hung scenario ends the launch: the scenarios after it are absent from the results.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from collections.abc import Callable

import _common
from _common import RANK, WORLD, dump, finish


def _main_stack(limit: int = 8) -> list[str]:
    frame = sys._current_frames().get(threading.main_thread().ident)
    if frame is None:
        return []
    return [f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in traceback.extract_stack(frame)][-limit:]


class Runner:
    def __init__(self, results: str, timeout: float = 90.0):
        self.results, self.timeout = results, timeout
        self.out: dict = {"scenarios": [], "ended_by": None}

    def _end(self, why: str) -> None:
        self.out["ended_by"] = why
        dump(self.results, self.out)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    def run(self, name: str, fn: Callable[[], dict | None]) -> dict:
        n_writes = len(_common.WRITES)
        rec: dict = {"outcome": "ok", "error": None, "message": None, "guard_error": None}
        self.out[name] = rec
        self.out["scenarios"].append(name)

        def fire() -> None:
            rec.update(outcome="hung", stack=_main_stack(), writes=sorted(set(_common.WRITES[n_writes:])))
            self._end(f"{name}: rank {RANK} hung")

        timer = threading.Timer(self.timeout, fire)
        timer.daemon = True
        timer.start()
        t0 = time.time()
        try:
            info = fn() or {}
        except Exception as e:
            from trainer_guard import TrainerGuardError

            info = getattr(e, "_asym_info", {})
            rec.update(outcome="error", error=type(e).__name__, message=str(e),
                       guard_error=isinstance(e, TrainerGuardError), where=traceback.format_exc()[-1500:])
        timer.cancel()
        rec.update(info, seconds=round(time.time() - t0, 1), writes=sorted(set(_common.WRITES[n_writes:])))
        # meet the other ranks through files: a rank still inside a collective never writes its marker
        mark = os.path.join(self.results, f".{name}.done")
        open(f"{mark}.{RANK}", "w").close()
        deadline = time.time() + self.timeout
        while True:
            missing = [r for r in range(WORLD) if not os.path.exists(f"{mark}.{r}")]
            if not missing:
                return rec
            if time.time() > deadline:
                rec["peers_hung"] = missing
                self._end(f"{name}: rank(s) {missing} did not finish")
            time.sleep(0.2)

    def finish(self) -> None:
        self.out["ended_by"] = "all scenarios ran"
        dump(self.results, self.out)
        finish()
