"""`eval tofu` for the finetuning baselines on a GPU machine that has neither the base model nor vLLM.

Usage (on the device, repository root):
  UNLEARND_CACHE_DIR=C UNLEARND_TOFU_DIR=D python scripts/eval_tofu_device.py \
      TARGET_DIR RETAIN_DIR RETAIN_RECORDS METHODS SEED_GROUPS OUT NAME [GRID]

SEED_GROUPS is e.g. `0/1,2`: every method with seed 0 first (report NAME), then seeds 1 and 2 (report
NAME-seeds-1-2), so a run cut short by the machine's time limit still holds every method once. GRID (e.g.
`mini`) picks each baseline's learning rate and epochs per fold from that budget grid
(`unlearnd/evaluation/baseline_grid.py`).

TARGET_DIR is the TOFU target model as trained here (its weights carried over); RETAIN_DIR holds the
retain model's info files only, and RETAIN_RECORDS the retain model's evaluation records from the run
on the machine that has it (`unlearnd eval tofu --methods target,retain` at the same commit: same
splits, same metric code): a JSON export, or a committed report's `NAME.items.jsonl.gz` with its
`NAME.json` beside it (e.g. reports/tofu-mini-grid-cpu.items.jsonl.gz). So forget quality compares
against the same retain numbers as every other row. The baselines then run through the usual
cross-fitted `run_tofu_eval` (trained on one fold, measured on the other), with every tensor on the
GPU; the JSON merges with the CPU runs by `unlearnd eval merge`.
"""

import json
import os
import shlex
import subprocess
import sys
import types
from pathlib import Path

import torch

if __name__ == "__main__":
    try:  # the detector index is not used here; the device image has no faiss
        import faiss  # noqa: F401
    except ImportError:
        stub = types.ModuleType("faiss")
        stub.omp_set_num_threads = lambda n: None  # the one call made at import
        sys.modules["faiss"] = stub
    from unlearnd.logs import setup_logging

    setup_logging()
    if torch.cuda.is_available():  # every tensor and every loaded model on the GPU, no code path changed
        from transformers import AutoModelForCausalLM

        torch.set_default_device("cuda")
        _load = AutoModelForCausalLM.from_pretrained
        AutoModelForCausalLM.from_pretrained = lambda *a, **k: _load(*a, **k).to("cuda")
    from unlearnd import provenance
    from unlearnd.data.tofu import TofuData
    from unlearnd.evaluation import report as report_mod
    from unlearnd.evaluation import tofu as ev
    from unlearnd.evaluation.metrics import RunRecords
    from unlearnd.evaluation.model_under_test import HFModelUnderTest
    from unlearnd.train import reference as ref

    target, retain, retain_records = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    methods = sys.argv[4].split(",")
    seed_groups = [[int(s) for s in group.split(",")] for group in sys.argv[5].split("/")]
    out, name = Path(sys.argv[6]), sys.argv[7]
    grid = sys.argv[8] if len(sys.argv) > 8 else None
    from unlearnd.evaluation.baseline_grid import GRIDS

    if grid is not None and grid not in GRIDS:
        raise SystemExit(f"GRID must be one of {sorted(GRIDS)}, not {grid!r}")
    tofu = TofuData(os.environ["UNLEARND_TOFU_DIR"], allow_hub=False)
    p = ref.preset("mini")
    refs = ref.ReferenceModels(
        preset=p, target_dir=str(target), retain_dir=str(retain), data=ref.reference_data(p, tofu)
    )
    ev.ensure_reference_models = lambda *a, **k: refs  # the carried models; no base model on this machine
    if retain_records.name.endswith(".items.jsonl.gz"):  # a committed report's records (its JSON beside it)
        run = ev.run_from_item_records(report_mod.read_records(retain_records), "retain")
        report = retain_records.with_name(retain_records.name.replace(".items.jsonl.gz", ".json"))
        cost = json.loads(report.read_text())["methods"]["retain"]["cost"]
        saved = {"records": run.model_dump(), "eval_wall_seconds": cost.get("eval_wall_seconds")}
    else:
        saved = json.loads(retain_records.read_text())
    splits = ev.eval_splits(refs, tofu, {})
    for split, items in splits.as_dict().items():  # the same items in the same order, or no forget quality
        carried = [it["question"] for it in saved["records"]["splits"].get(split, {}).get("items", [])]
        if carried != [it.question for it in items]:
            raise SystemExit(f"the retain records' {split!r} items are not this evaluation's: re-export them")
    real_reference = ev._evaluate_reference

    def reference(ctx, method, entry, robustness):  # the retain records come from the machine that has it
        if method != "retain":
            return real_reference(ctx, method, entry, robustness)
        entry["kind"] = "reference"
        entry["cost"].update({"eval_wall_seconds": saved["eval_wall_seconds"], "eval_cached": True})
        return RunRecords.model_validate(saved["records"])

    ev._evaluate_reference = reference
    # a GPU takes bigger batches than the CPU defaults (the same numbers up to padding)
    ev._hf_maker = lambda path, n: lambda: HFModelUnderTest.from_dir(path, name=n, batch_size=64, gen_batch_size=64)
    commit = os.environ.get("UNLEARND_SOURCE_COMMIT")
    if commit:  # the tree sent to the device carries no .git: the sender names the clean commit it sent
        provenance.git_commit = lambda repo=None: f"{commit} (named by the sender)"
    stamp = report_mod.run_stamp("python scripts/eval_tofu_device.py " + shlex.join(sys.argv[1:]))
    stamp["dtype"] = "float32 (in-process models, on the GPU)"
    gpu = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False).stdout.strip()
    stamp["machine"] += f"; {gpu or 'no GPU seen'}; torch {torch.__version__}"
    for i, seeds in enumerate(seed_groups):
        cfg = ev.TofuEvalConfig(
            preset="mini",
            forget_split=p.forget_split,
            methods=methods,
            seeds=seeds,
            robustness=False,
            baseline_grid=grid,
        )
        report = name if i == 0 else f"{name}-seeds-{'-'.join(map(str, seeds))}"
        rows = len(ev.expand_seeds(methods, seeds))

        def partial(results, report=report, rows=rows):
            note = f"{report_mod.PARTIAL_NOTE} {len(results['methods'])} of {rows} methods done; cut short."
            report_mod.write_report(results, out, report, stamp, notes=[note])

        results = ev.run_tofu_eval(cfg, reference_preset=p, tofu=tofu, on_method_done=partial)
        report_mod.write_report(results, out, report, stamp)
        print(json.dumps({m: e.get("error") for m, e in results["methods"].items()}), flush=True)
