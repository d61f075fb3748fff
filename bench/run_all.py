"""`make bench`: runs every benchmark row in its own subprocess and writes BENCHMARKS.md.

    python bench/run_all.py [--quick] [--accuracy_minutes 10] [--accuracy_result FILE] [--skip accuracy,...]

Rows: augmentation (batched vs per-image), training throughput (full step with the input pipeline, compute
only, supervised Keras step, PyTorch step, FLOP/s vs matmul peak) for three model/size/batch settings,
scaling with batch and with replicas, NT-Xent time vs batch, accuracy at a wall-clock budget. Each row prints
its command in BENCHMARKS.md; the hand-written `bench/vs_official_recorded.md` (bench/vs_official.py's runs),
`bench/distill_recorded.md` and `bench/optimisations.md` (the before/after log) are appended as is.
`--quick` shrinks widths and steps to check the machinery in a few minutes (numbers not for publication).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

DATA = os.path.join(common.REPO_DIR, "..", "shared", "data", "cifar10_dev.npz")
ROW_NAMES = ("augment", "throughput", "scaling", "loss", "accuracy")


_CACHE: Dict[str, Any] = {"dir": None, "reuse": False}


def run_cached(script: str, args: List[str], timeout: float = 3600.0) -> Optional[Dict[str, Any]]:
    """Runs a row (or, with --reuse, loads its saved result); results are saved as JSON in --results_dir."""
    key = (script + "_" + "_".join(a.lstrip("-") for a in args)).replace("/", "_").replace(",", "-")[:200]
    path = os.path.join(_CACHE["dir"], key + ".json")
    if _CACHE["reuse"] and os.path.exists(path):
        with open(path) as f:
            print(f"reusing {path}")
            return json.load(f)
    result = common.run_row(script, args, timeout=timeout)
    if result is not None:
        with open(path, "w") as f:
            json.dump(result, f)
    return result


def fmt(x: Optional[float], digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b in (None, 0) else a / b


class Report:
    def __init__(self) -> None:
        self.lines: List[str] = []

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def command(self, script: str, args: List[str]) -> None:
        self.add(f"`python bench/{script} {' '.join(args)}`", "")


def throughput_section(report: Report, quick: bool, with_torch: bool) -> List[Dict[str, Any]]:
    settings = [
        ("ResNet-18, CIFAR stem, 32 px", ["--depth", "18", "--image_size", "32", "--batch", "256", "--steps", "1"]),
        ("ResNet-50, 64 px", ["--depth", "50", "--image_size", "64", "--batch", "64", "--steps", "3"]),
        ("ResNet-50, 224 px", ["--depth", "50", "--image_size", "224", "--batch", "32", "--steps", "1"]),
    ]
    report.add("## Training throughput", "",
               "Source images/s through one pretraining step (two views, forward, backward, LARS, online linear "
               "head), in the trainer's own multi-step loop. **full**: with the real input pipeline "
               "(in-memory uint8 sources: random 32x32 for 32 px, JPEG-decoded 256x320 above; Inception crop, "
               "bicubic resize, flip, colour jitter, grayscale, blur). **compute**: the same step on a pre-made "
               "batch. **supervised**: a plain supervised Keras step (same ResNet + dense, softmax CE, SGD "
               "momentum) on the same batch of single views; a SimCLR step does two views, so the ideal time "
               "ratio is 2.0. **PyTorch**: the same SimCLR step written in PyTorch (bench/torch_simclr.py; "
               "channels-last, OMP_WAIT_POLICY=PASSIVE) on the same pre-made batch. All four alternate in "
               "rounds inside one process (median of rounds), so other load hits them alike. FLOP/s: forward "
               "FLOPs counted by TF's profiler x 3 (forward + backward) x 2 views, at the compute-only rate; "
               "peak = best float32 2048x2048 matmul rate in TF in the same process. Peak RSS is the "
               "whole row process (TF and, when present, torch).", "")
    results = []
    for title, args in settings:
        args = list(args) + ["--rounds", "2", "--flops"]
        if quick:
            args = [a for a in args] + ["--width", "0.25"]
            args[args.index("--batch") + 1] = str(min(64, int(args[args.index("--batch") + 1])))
        if with_torch:
            args.append("--torch")
        result = run_cached("throughput.py", args)
        results.append((title, args, result))
    report.add("Wall-clock rates (images/s) and, in brackets, the same ratios per process CPU-second, which other "
               "processes' load on this shared machine does not distort (a wall ratio compares rounds that may "
               "have had different shares of the 2 cores).", "",
               "| model | batch | full img/s | compute img/s | input overhead | supervised img/s | "
               "SimCLR / supervised step time (ideal 2.0) | PyTorch img/s | ours / PyTorch | achieved GFLOP/s "
               "(compute) | TF matmul GFLOP/s | peak RSS MiB |",
               "|---|---|---|---|---|---|---|---|---|---|---|---|")
    for title, args, r in results:
        if r is None:
            report.add(f"| {title} | failed | | | | | | | | | | |")
            continue
        ips, cps = r["images_per_s"], r["images_per_cpu_s"]

        def both(num: str, den: str, invert: bool = False, pct: bool = False) -> str:
            a, b = (ratio(ips.get(den), ips.get(num)), ratio(cps.get(den), cps.get(num))) if invert else (
                ratio(ips.get(num), ips.get(den)), ratio(cps.get(num), cps.get(den)))
            if a is None:
                return "–"
            if pct:
                return f"{100 * (a - 1):+.0f}% ({100 * (b - 1):+.0f}%)"
            return f"{a:.2f} ({b:.2f})"

        torch_ips = ips.get("torch")
        report.add(f"| {title}{' (width 0.25)' if quick else ''} | {r['config']['batch']} | {fmt(ips.get('full'))} | "
                   f"{fmt(ips.get('compute'))} | {both('full', 'compute', invert=True, pct=True)} | "
                   f"{fmt(ips.get('supervised'))} | {both('compute', 'supervised', invert=True)} | "
                   f"{fmt(torch_ips) if torch_ips else 'skipped (no torch)'} | {both('compute', 'torch')} | "
                   f"{fmt(r.get('achieved_gflops_compute'))} | {fmt(r.get('matmul_peak_gflops'))} | "
                   f"{r['peak_rss_mb']:.0f} |")
    report.add("", "Input overhead = compute-only rate / full rate - 1. The achieved FLOP/s can exceed the TF matmul "
               "rate: TF's own matmul kernels are not built for AVX-512 here, while its oneDNN convolutions are "
               "(and may use Winograd), so the matmul is a lower bound of the machine's peak, not the peak.", "")
    report.add("Commands:", "")
    for _, args, _ in results:
        report.command("throughput.py", args)
    return [r for _, _, r in results]


def scaling_section(report: Report, quick: bool) -> None:
    width = "0.125" if quick else "0.25"
    batches = [64, 128, 256] if quick else [64, 128, 256, 512, 1024]
    report.add("## Scaling (ResNet-18, CIFAR stem, 32 px, width %s)" % width, "",
               "Compute-only step time (pre-made batch) against the global batch, one row process each. The "
               "width is reduced so that batch 1024 fits the time budget on 2 cores; the full-width step at "
               "batch 256 is in the throughput table.", "",
               "| global batch | s/step | img/s | peak RSS MiB |", "|---|---|---|---|")
    commands = []
    for batch in batches:
        args = ["--depth", "18", "--width", width, "--image_size", "32", "--batch", str(batch), "--steps", "2",
                "--rounds", "2", "--modes", "compute"]
        commands.append(args)
        r = run_cached("throughput.py", args)
        if r:
            report.add(f"| {batch} | {r['sec_per_step']['compute']:.3f} | {r['images_per_s']['compute']:.1f} | "
                       f"{r['peak_rss_mb']:.0f} |")
    report.add("", "Replicas: the same step at global batch 256 on 1 and 2 logical CPU devices "
               "(MirroredStrategy; NT-Xent gathers negatives across replicas, BN synchronised).", "",
               "| replicas | full s/step | compute s/step | compute img/s | peak RSS MiB |", "|---|---|---|---|---|")
    for replicas in (1, 2):
        args = ["--depth", "18", "--width", width, "--image_size", "32", "--batch", "256", "--steps", "2",
                "--rounds", "2", "--modes", "full,compute", "--replicas", str(replicas)]
        commands.append(args)
        r = run_cached("throughput.py", args)
        if r:
            report.add(f"| {replicas} | {r['sec_per_step']['full']:.3f} | {r['sec_per_step']['compute']:.3f} | "
                       f"{r['images_per_s']['compute']:.1f} | {r['peak_rss_mb']:.0f} |")
    report.add("", "Commands:", "")
    for args in commands:
        report.command("throughput.py", args)


def loss_section(report: Report, quick: bool) -> None:
    args = ["--batches", "256,512,1024" if quick else "256,512,1024,2048,4096,8192"]
    report.add("## NT-Xent loss alone", "", "Forward + backward of `losses.nt_xent` on random [2B, 128] "
               "projections (best of 3), one replica: the [B, 2B] logit blocks make it O(B^2).", "")
    r = run_cached("loss.py", args)
    if r:
        report.add("| B | ms | ms / B^2 x 1e6 |", "|---|---|---|")
        for row in r["rows"]:
            report.add(f"| {row['batch']} | {row['ms']:.1f} | {1e6 * row['ms'] / row['batch'] ** 2:.2f} |")
        report.add("", f"Peak RSS of the row: {r['peak_rss_mb']:.0f} MiB.", "")
    report.command("loss.py", args)


def augment_section(report: Report, quick: bool) -> None:
    args = ["--sizes", "32,224", "--seconds", "4" if quick else "8", "--rounds", "2" if quick else "3"]
    report.add("## Augmentation: batched vs per-image", "",
               "Two-view pretraining batches from JPEG-decoded 256x320 sources; ours (per-element crop + resize, "
               "then one XLA program for flip, jitter, grayscale, blur: per batch below 192 px, per example "
               "from 192 px) against the reference's "
               "one-image-at-a-time `map` of the same ops, alternating rounds in one process (median).", "")
    r = run_cached("augment.py", args)
    if r:
        report.add("| image size | batch | per-image views/s | batched views/s | ratio (wall) | ratio per CPU-s |",
                   "|---|---|---|---|---|---|")
        for row in r["rows"]:
            report.add(f"| {row['image_size']} | {row['batch']} | {row['per_image_views_per_s']:.0f} | "
                       f"{row['batched_views_per_s']:.0f} | {row['ratio']:.2f}x | {row['ratio_per_cpu_s']:.2f}x |")
        report.add("", f"Peak RSS of the row: {r['peak_rss_mb']:.0f} MiB.", "")
    report.command("augment.py", args)


def accuracy_section(report: Report, minutes: float, recorded: Optional[str]) -> None:
    args = ["--data", "../shared/data/cifar10_dev.npz", "--budget_minutes", f"{minutes:g}"]
    report.add("## Accuracy at a wall-clock budget (CIFAR-10 dev subset)", "",
               "SimCLR pretraining of ResNet-18 (CIFAR stem, width 0.25) on the 10,000 training images of "
               "`cifar10_dev.npz` for a fixed wall-clock budget (batch 256, LARS lr 1.0, temperature 0.5, "
               "colour strength 0.5, no blur, 2-layer head, warmup 1 epoch then cosine to the step count a "
               "short calibration predicts for the budget; a timer stops at the budget in any case). Then the "
               "frozen encoder's h on the centre-crop views of the 10,000 train / 2,000 test images: "
               "linear-eval top-1 (`simclr_tf.linear_eval.linear_eval`, 100 epochs of softmax regression on "
               "standardised features) and weighted kNN top-1 (`simclr_tf.knn`, k = 200, T = 0.1). The random-"
               "init row is the same protocol on a freshly initialised encoder.", "")
    if recorded:
        with open(recorded) as f:
            r = json.load(f)
        report.add(f"(Recorded run, not re-run by this invocation: `{r.get('command', 'bench/accuracy.py')}`.)", "")
    else:
        r = run_cached("accuracy.py", args, timeout=60 * minutes * 3 + 1800)
        report.command("accuracy.py", args)
    if r is None:
        report.add("Row failed; see the log of `make bench`.", "")
        return
    p, q = r["pretrained"], r["random_init"]
    stopped = (f" The budget timer stopped training at step {r['steps_done']} of the {r['train_steps']} the "
               "calibration had planned (other processes slowed the steps down after calibrating), so the cosine "
               "schedule did not reach 0." if r["steps_done"] < r["train_steps"] else "")
    report.add(f"Budget {r['config']['budget_minutes']:g} min: {r['steps_done']} steps ({r['epochs']:.1f} epochs) "
               f"in {r['train_minutes']:.1f} min of training (wall time including tracing and the checkpoint)."
               + stopped, "",
               "| encoder | linear-eval top-1 | linear-eval top-5 | kNN top-1 |", "|---|---|---|---|",
               f"| SimCLR-pretrained | {100 * p['linear_top1']:.1f}% | {100 * p['linear_top5']:.1f}% | "
               f"{100 * p['knn_top1']:.1f}% |",
               f"| random init | {100 * q['linear_top1']:.1f}% | {100 * q['linear_top5']:.1f}% | "
               f"{100 * q['knn_top1']:.1f}% |", "", f"Peak RSS: {r['peak_rss_mb']:.0f} MiB.", "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--accuracy_minutes", type=float, default=10.0)
    parser.add_argument("--accuracy_result", default=None,
                        help="JSON of an earlier bench/accuracy.py result to publish instead of re-running")
    parser.add_argument("--skip", default="", help=f"comma-separated subset of {','.join(ROW_NAMES)}")
    parser.add_argument("--results_dir", default=os.path.join(common.REPO_DIR, "runs", "bench"),
                        help="each row's JSON result is saved here")
    parser.add_argument("--reuse", action="store_true", help="load saved row results instead of re-running")
    parser.add_argument("--output", default=os.path.join(common.REPO_DIR, "BENCHMARKS.md"))
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    os.makedirs(args.results_dir, exist_ok=True)
    _CACHE.update(dir=args.results_dir, reuse=args.reuse)

    try:
        import torch  # noqa: F401
        with_torch = True
    except ImportError:
        with_torch = False
    machine = common.machine_description()
    report = Report()
    report.add("# Benchmarks", "",
               f"Generated by `make bench` (`python bench/run_all.py {' '.join(sys.argv[1:])}`) on "
               f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. Every ratio compares "
               "numbers measured side by side in one process of this run; absolute numbers depend on the "
               "load of the machine, which is shared (see the load average).", "",
               "| machine | |", "|---|---|", *[f"| {k} | {v} |" for k, v in machine.items()], "")
    if "augment" not in skip:
        augment_section(report, args.quick)
    if "throughput" not in skip:
        throughput_section(report, args.quick, with_torch)
    if "scaling" not in skip:
        scaling_section(report, args.quick)
    if "loss" not in skip:
        loss_section(report, args.quick)
    if "accuracy" not in skip and (os.path.exists(DATA) or args.accuracy_result):
        accuracy_section(report, args.accuracy_minutes, args.accuracy_result)
    elif "accuracy" not in skip:
        report.add("## Accuracy at a wall-clock budget", "", "Skipped: ../shared/data/cifar10_dev.npz is absent.", "")
    load = os.getloadavg()
    report.add(f"Load average at the end: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}.", "")
    # Hand-written sections of runs too long or too special for `make bench`, appended as is.
    for recorded in ("vs_official_recorded.md", "distill_recorded.md", "optimisations.md"):
        path = os.path.join(common.BENCH_DIR, recorded)
        if os.path.exists(path):
            with open(path) as f:
                report.add(f.read())
    with open(args.output, "w") as f:
        f.write("\n".join(report.lines).rstrip() + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
