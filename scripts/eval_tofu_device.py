"""`eval tofu` for weight-changing methods on a GPU machine that has no base model and no vLLM.

Usage: UNLEARND_CACHE_DIR=C UNLEARND_TOFU_DIR=D python scripts/eval_tofu_device.py TARGET_KEY RETAIN_KEY METHODS OUT

The reference models are taken as they are from C/reference/<key> (e.g. copied from the machine that
trained them; the retain model's records may come from C/eval, the shared evaluation cache), every
tensor and model is put on the GPU, and the usual `run_tofu_eval` runs the methods. Its JSON merges
with other runs of the same preset by `unlearnd eval merge`. This is how the baselines of
reports/tofu-mini.md were run (as .dev/run_baselines.py, the same file) on an H100 lent to the session.
"""

import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

if __name__ == "__main__":
    from unlearnd.logs import setup_logging

    setup_logging()
    if torch.cuda.is_available():  # every tensor and every loaded model on the GPU, no code path changed
        from transformers import AutoModelForCausalLM

        torch.set_default_device("cuda")
        _load = AutoModelForCausalLM.from_pretrained
        AutoModelForCausalLM.from_pretrained = lambda *a, **k: _load(*a, **k).to("cuda")
    from unlearnd.evaluation import tofu as ev
    from unlearnd.evaluation.report import run_stamp, write_report
    from unlearnd.tofu import TofuData
    from unlearnd.train import reference as ref

    root = Path(os.environ["UNLEARND_CACHE_DIR"]) / "reference"
    target, retain = Path(sys.argv[1]), Path(sys.argv[2])
    methods = sys.argv[3].split(",")
    out = Path(sys.argv[4])
    tofu = TofuData(os.environ["UNLEARND_TOFU_DIR"], allow_hub=False)
    p = ref.preset("mini")
    refs = ref.ReferenceModels(
        preset=p, target_dir=str(root / target), retain_dir=str(root / retain), data=ref.reference_data(p, tofu)
    )
    ev.ensure_reference_models = lambda *a, **k: refs  # the carried models; no base model on this machine
    cfg = ev.TofuEvalConfig(preset="mini", forget_split=p.forget_split, methods=methods, robustness_items=8)
    t0 = time.perf_counter()
    stamp = run_stamp("python .dev/run_baselines.py " + shlex.join(sys.argv[1:]))
    results = ev.run_tofu_eval(cfg, reference_preset=p, tofu=tofu)
    write_report(
        results,
        out,
        "tofu-mini-baselines",
        stamp,
        notes=[f"device run, {time.perf_counter() - t0:.0f} s wall; torch {torch.__version__}"],
    )
    print(json.dumps({m: e.get("error") for m, e in results["methods"].items()}))
