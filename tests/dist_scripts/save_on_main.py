"""``trainer.save_model`` called from the main process only (a common script pattern), with the guards wired.

Usage (from tests/test_distributed.py):
    accelerate launch --multi_gpu --num_processes 2 tests/dist_scripts/save_on_main.py OUT RESULTS

The wired ``save_model`` of IntegrityGuard and HeadGuard must not wait for the other ranks (they are not saving),
or the main process hangs. Each rank writes RESULTS/rank<r>.json: whether it got past the save and the barrier.
"""

from __future__ import annotations

import os
import sys
import traceback

from _common import dump, finish

from conftest import make_args  # noqa: E402
from transformers import Trainer  # noqa: E402

import trainer_guard  # noqa: E402
from trainer_guard.tiny import tiny_dataset, tiny_model  # noqa: E402


def main(out: str, results: str) -> None:
    result: dict = {"error": None, "saved": False, "done": False}
    try:
        head, integrity = trainer_guard.HeadGuard(), trainer_guard.IntegrityGuard()
        t = trainer_guard.guard(Trainer(model=tiny_model("llama-untied"), train_dataset=tiny_dataset(16),
                                        args=make_args(out, max_steps=1, save_strategy="no"),
                                        callbacks=[head, integrity]))
        t.train()
        if t.is_world_process_zero():
            t.save_model(os.path.join(out, "final"))
            result["saved"] = os.path.isfile(os.path.join(out, "final", "trainer_guard_manifest.json"))
            result["head_checked"] = head.checked
        t.accelerator.wait_for_everyone()
        result["done"] = True
    except Exception as e:  # reported to the test, which shows it
        result["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    dump(results, result)
    finish()  # no interpreter teardown (see _common.finish)


if __name__ == "__main__":
    main(*sys.argv[1:3])
