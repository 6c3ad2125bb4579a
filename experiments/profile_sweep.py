"""Many profile-search runs side by side (each one ``experiments/profile_search.py`` process), then,
optionally, a second wave that combines the changes that beat the baseline.

    python -m experiments.profile_sweep plan.json --parallel 6 --out results/sweep -- --steps 1600 --final-knn --device cuda

``plan.json``: ``[{"name": "G", "overrides": {}}, {"name": "crop06", "overrides": {...}}, ...]``;
the first entry is the baseline; ``"combine": false`` keeps an entry out of the second wave
(e.g. a longer run that only tells whether more steps would help). Arguments after ``--`` go to every profile_search run. Written:
``<out>/<name>.log`` per run and ``<out>/sweep.json`` / ``sweep.md`` (sorted by test kNN, or by the
last online kNN without ``--final-knn``). Runs still going at ``--deadline-s`` are stopped and
reported with their last online kNN.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

from dinoflow.config import deep_merge


def score(result: dict) -> float:
    if "test_knn" in result:
        return result["test_knn"]["cls_top1_k20"]
    return result["online_knn"][-1][1] if result.get("online_knn") else float("nan")


def parse_log(name: str, log: Path) -> dict:
    """The RESULT line, or (stopped, crashed) what the online-kNN lines say so far."""
    online = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
        parts = line.split()
        if len(parts) >= 6 and parts[1] == "step" and parts[4] == "knn":
            online.append([int(parts[2]), float(parts[5])])
    return {"name": name, "online_knn": online, "unfinished": True}


def run_wave(plan: list[dict], args: argparse.Namespace, extra: list[str], deadline: float) -> list[dict]:
    out = Path(args.out)
    queue, running, results = list(plan), [], []
    while queue or running:
        while queue and len(running) < args.parallel and time.time() < deadline:
            entry = queue.pop(0)
            log = out / f"{entry['name']}.log"
            cmd = [sys.executable, "-m", "experiments.profile_search", entry["name"],
                   json.dumps(entry["overrides"]), *extra]
            proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
            running.append((entry, proc, log))
            print(f"[{time.strftime('%H:%M:%S')}] start {entry['name']}", flush=True)
        if not running and time.time() >= deadline:
            break
        time.sleep(2)
        for item in list(running):
            entry, proc, log = item
            if proc.poll() is None and time.time() >= deadline:
                proc.kill()
                proc.wait()
            if proc.poll() is not None:
                running.remove(item)
                result = parse_log(entry["name"], log)
                result.setdefault("overrides", entry["overrides"])
                result["combine"] = entry.get("combine", True)
                results.append(result)
                print(f"[{time.strftime('%H:%M:%S')}] done {entry['name']}: {score(result):.4f} "
                      f"(rc {proc.returncode}) {json.dumps(result.get('test_knn', {}))}", flush=True)
    for entry in queue:
        results.append({"name": entry["name"], "overrides": entry["overrides"], "online_knn": [],
                        "unfinished": True, "not_started": True})
    return results


def combinations(results: list[dict], baseline: str, top: int, margin: float) -> list[dict]:
    """The changes that beat the baseline by ``margin``: all of the best ``top`` together, and each pair."""
    base = next((r for r in results if r["name"] == baseline and not r.get("unfinished")), None)
    if base is None:
        return []
    better = sorted((r for r in results if not r.get("unfinished") and r["name"] != baseline
                     and r.get("combine", True) and score(r) > score(base) + margin),
                    key=score, reverse=True)[:top]
    plan = []
    groups = ([better] if len(better) > 2 else []) + [list(p) for p in itertools.combinations(better, 2)]
    for group in groups:
        overrides: dict = {}
        for r in group:
            overrides = deep_merge(overrides, copy.deepcopy(r["overrides"]))
        plan.append({"name": "+".join(r["name"] for r in group), "overrides": overrides})
    return plan


def write_table(results: list[dict], out: Path, header: str) -> None:
    rows = sorted(results, key=lambda r: -score(r) if score(r) == score(r) else 1.0)
    lines = [header, "", "| run | test kNN k20 (CLS) | k10 | k100 | CLS+patch mean k20 | online kNN (last) | img/s | train s | overrides |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r.get("test_knn", {})
        last = r["online_knn"][-1] if r.get("online_knn") else ["-", "-"]
        flag = " (stopped)" if r.get("unfinished") else ""
        lines.append(f"| {r['name']}{flag} | {t.get('cls_top1_k20', '-')} | {t.get('cls_top1_k10', '-')} | "
                     f"{t.get('cls_top1_k100', '-')} | {t.get('cls_patchmean_top1_k20', '-')} | "
                     f"{last[1]} @ {last[0]} | {r.get('images_per_s', '-')} | {r.get('train_s', '-')} | "
                     f"`{json.dumps(r.get('overrides', {}))}` |")
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    (out / "sweep.json").write_text(json.dumps(results, indent=1))


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("plan", help="JSON list of {name, overrides}; the first is the baseline")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/sweep")
    parser.add_argument("--deadline-s", type=float, default=3600, help="stop everything after this long")
    parser.add_argument("--combine-top", type=int, default=0, help="second wave: combine the best N changes")
    parser.add_argument("--margin", type=float, default=0.003, help="what counts as beating the baseline")
    args = parser.parse_args(argv)
    plan = json.loads(Path(args.plan).read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    deadline = start + args.deadline_s
    header = f"Sweep {time.strftime('%Y-%m-%d %H:%M')}, {args.parallel} runs at a time, run arguments: `{' '.join(extra)}`"
    results = run_wave(plan, args, extra, deadline)
    write_table(results, out, header)
    if args.combine_top:
        second = combinations(results, plan[0]["name"], args.combine_top, args.margin)
        print(f"second wave: {[p['name'] for p in second]}", flush=True)
        results += run_wave(second, args, extra, deadline)
        write_table(results, out, header)
    print((out / "sweep.md").read_text(), flush=True)
    print(f"sweep took {time.time() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
