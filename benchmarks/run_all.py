"""``make bench``: the step, evaluation, distillation and loader benchmarks in one process,
written to benchmarks/results/latest.json and a markdown table in benchmarks/results/latest.md.

    python -m benchmarks.run_all                  # 2 then 1 torch threads, 3 repetitions
    python -m benchmarks.run_all --repeats 5 --threads 2 --profiles cpu

Everything runs in one process on one machine state: dinoflow and lightly steps alternate, a
fixed matmul block alternates with them (the rate the utilisation is measured against), and
medians are reported. Wall-clock numbers on a shared machine are stretched by other processes'
load; the CPU-time columns (this process's user + system seconds) are not. With 2 threads on a
loaded 2-core machine, an OpenMP region waits whenever one of its threads loses its core, which
stretches both clocks; the 1-thread pass is the steadier measurement there.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

from benchmarks import bench_distill, bench_eval, bench_loader, bench_step
from benchmarks.common import ROOT, interleaved_times, machine_info, median

RESULTS = ROOT / "benchmarks" / "results"


def markdown(result: dict, command: str) -> str:
    """The results table of one run (benchmarks/results/latest.md)."""
    m = result["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cpu_count']} cores, load average {m['load_average_1m']:.1f} "
        f"at start; torch {m['torch']}, timm {m['timm']}, lightly {m['lightly']}, "
        f"Python {m['python']}. Run {result['date']} with `{command}`.",
        f"CPU flags: {', '.join(m.get('cpu_flags', [])) or 'none found'} (torch kernels: "
        f"{m.get('cpu_capability')}); bf16 matrix units: {'yes' if m.get('bf16_units') else 'no'}.",
        *[f"Precision of {p['profile']}: **{p['precision']}** ({p['precision_reason']}); matmul peaks "
          f"measured here: fp32 {p['matmul_gflops_fp32_best']:.0f} GFLOP/s, bf16 "
          f"{p['matmul_gflops_bf16_best']:.0f} GFLOP/s; MFU is against the {p['precision']} peak."
          for name, p in result["profiles"].items() if name.endswith(f"@{result['threads'][0]}t")],
        "",
        "| profile | threads | model | dinoflow img/s | lightly img/s | ratio (wall) | ratio (CPU time) "
        "| GFLOP/step | MFU (wall) | MFU (CPU time) | MFU vs best matmul | matmul GFLOP/s "
        "| peak RSS dinoflow / lightly MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in result["profiles"].values():
        c, d, lt = p["config"], p["dinoflow"], p.get("lightly")
        model = (f"ViT d{c['embed_dim']} x{c['depth']} p{c['patch_size']}, crops "
                 f"2x{c['global_size']} + {c['n_local']}x{c['local_size']}, batch {c['batch_size']}, "
                 f"K {c['n_prototypes']}")
        lines.append(
            f"| {p['profile']} | {p['threads']} | {model} | {d['images_per_s']:.2f} | "
            f"{lt['images_per_s'] if lt else float('nan'):.2f} | "
            f"{p.get('step_ratio_vs_lightly', float('nan')):.2f}x | "
            f"{p.get('step_ratio_vs_lightly_cpu_time', float('nan')):.2f}x | "
            f"{d['gflop_per_step']:.0f} | {p['mfu']:.0%} | {p['mfu_cpu_time']:.0%} | "
            f"{p['mfu_vs_best_matmul']:.0%} | {p['matmul_gflops']:.0f} (best {p['matmul_gflops_best']:.0f}) | "
            f"{d['peak_rss_extra_mb']:.0f} / {lt['peak_rss_extra_mb'] if lt else float('nan'):.0f} |")
    ddp = result.get("ddp")
    if ddp:
        lines += ["", f"As conf/base runs it ({ddp['config']}): dinoflow {ddp['images_per_s']:.2f} img/s "
                  f"against lightly's step in one process with {ddp['lightly_threads']} threads "
                  f"{ddp['lightly_images_per_s']:.2f} img/s (measured before and after): "
                  f"**{ddp['step_ratio_vs_lightly']:.2f}x**, {ddp['step_ratio_vs_dinoflow_one_process']:.2f}x "
                  f"dinoflow's own one-process step; MFU {ddp['mfu']:.0%} of the {ddp['lightly_threads']}-thread "
                  "matmul rate."]
    lines.append("")
    for name, p in result["profiles"].items():
        dl = p["data_loader"]
        if not name.endswith("@1t"):
            continue
        lines.append(f"Data loading ({p['profile']}, one worker): augmentation + masking collate {dl['images_per_cpu_s']:.0f} "
                     f"images per CPU second ({dl['cpu_s_per_batch']:.2f} CPU s per batch) against "
                     f"a 1-thread step of {p['dinoflow']['step_cpu_s_median']:.2f} CPU s "
                     f"({p['config']['batch_size']} images).")
    f, k = result["eval"]["features"], result["eval"]["knn"]
    lines += ["",
              f"Evaluation ({result['eval']['threads']} threads): feature extraction {f['images_per_s']:.0f} images/s in "
              f"{f['precision']} ({f['speedup_vs_fp32']:.2f}x fp32's {f['fp32_images_per_s']:.0f}; {f['images']} images "
              f"at {f['image_size']} px, peak +{f['peak_rss_extra_mb']:.0f} MB); kNN "
              f"{k['queries']:,} x {k['bank']:,} (dim {k['dim']}, k = 10/20/100/200) in "
              f"{k['wall_s']:.1f} s ({k['queries_per_s']:.0f} queries/s, peak +{k['peak_rss_extra_mb']:.0f} MB).",
              ""]
    if result.get("distillation"):
        lines += [bench_distill.markdown(result["distillation"]), ""]
    if result.get("loader"):
        lines += [bench_loader.markdown(result["loader"]), ""]
    return "\n".join(lines)


def bench_as_run(cpu: dict, repeats: int, threads: int) -> dict | None:
    """The step as conf/base runs it (launcher torchrun: DDP processes), against the lightly step
    in one process with ``threads`` threads, measured before (the cpu profile) and right after."""
    import subprocess
    import tempfile

    import yaml

    params = yaml.safe_load((ROOT / "conf/base/parameters_pretrain.yml").read_text())["pretrain"]
    launcher, train = params.get("launcher", {}), params["train"]
    if launcher.get("type") != "torchrun":
        return None
    nproc = int(launcher.get("nproc_per_node", 1))
    print(f"step benchmark: cpu as conf/base runs it ({nproc} DDP processes)", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ddp.json"
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc_per_node={nproc}", "-m", "benchmarks.bench_ddp",
                        "--out", str(out), "--repeats", str(max(5, repeats))],
                       check=True, cwd=ROOT)
        ddp = json.loads(out.read_text())
    cfg, channels = bench_step.profile_config("cpu")
    lightly = bench_step.LightlyStep(cfg, channels)
    batches = bench_step.make_batches(cfg, channels, n=4)
    times = interleaved_times({"lightly": lambda i: lightly(batches[i % 4], i)}, repeats=repeats, warmup=1)
    lightly_s = [cpu["lightly"]["step_s_median"], median(times["lightly"]["wall"])]
    flop = cpu["dinoflow"]["gflop_per_step"] * 1e9
    ddp.update({
        "config": f"{nproc} processes x {ddp['threads_per_process']} thread(s), batch "
                  f"{ddp['batch_per_process']} each (conf/base: launcher torchrun, train.threads "
                  f"{train.get('threads')})",
        "lightly_threads": threads, "lightly_step_s_before_after": lightly_s,
        "lightly_images_per_s": cfg.train.batch_size / (sum(lightly_s) / 2),
        "step_ratio_vs_lightly": (sum(lightly_s) / 2) / ddp["step_s_median"],
        "step_ratio_vs_dinoflow_one_process": cpu["dinoflow"]["step_s_median"] / ddp["step_s_median"],
        # the same FLOPs as the one-process step, over the matmul rate of all the threads
        "mfu": flop / ddp["step_s_median"] / (cpu["matmul_gflops"] * 1e9),
    })  # fmt: skip
    return ddp


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profiles", nargs="+", default=["cpu", "photos", "vit_s14"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--images", type=int, default=4096, help="images for feature extraction")
    args = ap.parse_args(argv)
    result: dict = {"date": datetime.now(UTC).isoformat(timespec="seconds"),
                    "machine": machine_info(args.threads[0]), "threads": args.threads,
                    "profiles": {}}
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name in args.profiles:
            print(f"step benchmark: {name}, {threads} threads", file=sys.stderr, flush=True)
            result["profiles"][f"{name}@{threads}t"] = bench_step.bench_profile(
                name, args.repeats, threads)
    torch.set_num_threads(args.threads[0])
    cpu = result["profiles"].get(f"cpu@{args.threads[0]}t")
    if cpu is not None and "lightly" in cpu:
        result["ddp"] = bench_as_run(cpu, args.repeats, args.threads[0])
    print("evaluation benchmark", file=sys.stderr, flush=True)
    result["eval"] = {"threads": args.threads[0], "features": bench_eval.bench_features(args.images),
                      "knn": bench_eval.bench_knn()}
    print("distillation benchmark (student and teacher inference)", file=sys.stderr, flush=True)
    result["distillation"] = bench_distill.bench(args.threads[0])
    print("loader benchmark (real photos, the image cache)", file=sys.stderr, flush=True)
    result["loader"] = bench_loader.bench(args.threads[0])
    # the headline numbers at the top level: the CPU profile's (first thread count unsuffixed)
    for threads in args.threads:
        cpu = result["profiles"].get(f"cpu@{threads}t")
        if cpu is None:
            continue
        suffix = "" if threads == args.threads[0] else f"_{threads}_thread"
        for key in ("step_ratio_vs_lightly", "step_ratio_vs_lightly_cpu_time", "mfu",
                    "mfu_cpu_time", "mfu_vs_best_matmul", "precision", "precision_reason"):
            result[key + suffix] = cpu.get(key)
    if result.get("ddp"):
        # the headline: the step as conf/base runs it (DDP processes); the one-process numbers
        # (same process and threads as lightly's step) stay beside it
        for key in ("step_ratio_vs_lightly", "mfu"):
            result[key + "_one_process"] = result[key]
            result[key] = result["ddp"][key]
    RESULTS.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.run_all " + " ".join(argv if argv is not None else sys.argv[1:])
    (RESULTS / "latest.json").write_text(json.dumps(result, indent=1))
    (RESULTS / "latest.md").write_text(markdown(result, command.strip()))
    print((RESULTS / "latest.md").read_text())
    return result


if __name__ == "__main__":
    main()
