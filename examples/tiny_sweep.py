"""The tiny AutoThink run over seeds and thread counts: does the result hold beyond one trajectory?

    python examples/tiny_sweep.py [--seeds 0 1 2] [--threads 1 2] [--parallel 1] [--out runs/sweep] [--quick]

Each (seed, threads) pair is a whole `examples/tiny_r1.py` run, its own SFT base included, in
<out>/seed<S>_t<T> (a finished run is reused; a killed one resumes). A seed changes the SFT
data, initialisation and RL sampling; a thread count changes the order of float sums, so it
is a different trajectory too. `--parallel N` runs N at once (their results do not depend on
it; their wall times do, and two runs of 2 threads each on 2 cores are several times slower
than one after the other). Writes <out>/sweep.md and sweep.json: every run's targets
(`at_core.tiny.targets`) and the mean and range of each row over the runs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from at_core.tiny import targets  # noqa: E402

ROWS = ("base/standard", "base/ellipsis", "stage1", "stage2", "stage3")


def run_one(out: Path, seed: int, threads: int, extra: list[str], quick: bool = False) -> dict:
    run_dir = out / f"seed{seed}_t{threads}"
    results = run_dir / "results.json"
    if not results.exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(ROOT / "examples" / "tiny_r1.py"), "--out", str(run_dir), "--threads", str(threads),
               "--resume", "auto", *(["--quick"] if quick else []), f"seed={seed}", *extra]
        with (run_dir / "run.log").open("w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            raise SystemExit(f"error: the run seed={seed} threads={threads} failed (exit {rc}); see {run_dir}/run.log")
    return {"seed": seed, "threads": threads, **json.loads(results.read_text())}


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def summarize(runs: list[dict]) -> dict:
    """Mean and range over the runs of each row's accuracy, tokens and think rate by tier."""
    out = {}
    for name in ROWS:
        rows = [next(r for r in run["rows"] if r["name"] == name) for run in runs]
        out[name] = {"accuracy": spread([100 * r["accuracy"] for r in rows]),
                     "mean_tokens": spread([r["mean_tokens"] for r in rows]),
                     **{f"think_{t}": spread([r["tiers"][t]["think_rate"] for r in rows])
                        for t in ("easy", "medium", "hard")}}
    return out


def _cell(s: dict, fmt: str) -> str:
    return f"{s['mean']:{fmt}} ({s['min']:{fmt}}-{s['max']:{fmt}})"


def markdown(runs: list[dict], summary: dict) -> str:
    names = [c["name"] for c in runs[0]["targets"]]
    lines = ["| row | accuracy % | tokens | think easy | think medium | think hard |", "|---|---|---|---|---|---|"]
    for name, s in summary.items():
        lines.append(f"| {name} | {_cell(s['accuracy'], '.1f')} | {_cell(s['mean_tokens'], '.1f')} | "
                     + " | ".join(_cell(s[f"think_{t}"], ".2f") for t in ("easy", "medium", "hard")) + " |")
    lines += ["", "Mean (min-max) over the runs.", "",
              "| seed | threads | wall s | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for run in runs:
        cells = [targets.cell(c, "+.2f") for c in run["targets"]]
        lines.append(f"| {run['seed']} | {run['threads']} | {run['wall_seconds']:.0f} | " + " | ".join(cells) + " |")
    rules = [f"- `{c['name']}`: {c['rule']}" for c in runs[0]["targets"]]
    return "\n".join(lines + ["", "Targets (`at_core/tiny/targets.py`):", *rules]) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--parallel", type=int, default=1, help="runs at once")
    ap.add_argument("--out", type=Path, default=Path("runs/sweep"))
    ap.add_argument("--quick", action="store_true", help="quick runs (tests: the pipeline, not the effect)")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides passed to every run")
    args = ap.parse_args(argv)
    pairs = [(s, t) for t in args.threads for s in args.seeds]
    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        runs = list(pool.map(lambda st: run_one(args.out, *st, args.overrides, args.quick), pairs))
    summary = summarize(runs)
    text = markdown(runs, summary)
    (args.out / "sweep.md").write_text(text)
    (args.out / "sweep.json").write_text(json.dumps({"summary": summary, "runs": runs}, indent=1))
    print(text)
    failed = [(r["seed"], r["threads"], c["name"]) for r in runs for c in r["targets"] if c["met"] is False]
    print(f"{len(failed)} target(s) missed" + (f": {failed}" if failed else "") + f"; wrote {args.out}/sweep.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
