"""Paired timing for the benchmarks: runs alternate, so a shared machine's slow drifts hit them alike."""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List

import torch


def parse_arguments(
    description: str, repeats_flag: str = "--repeats", repeats: int = 10, model: str = ""
) -> argparse.Namespace:
    """``--threads`` (applied to torch here), ``--device``, the number of timed rounds and, given a default,
    ``--model``. ``--device cuda`` without a GPU stops with one line saying so."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(repeats_flag, type=int, default=repeats, dest="repeats")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N): where the models and inputs run")
    if model:
        parser.add_argument("--model", default=model, help="a torchvision model name, or timm/<name>")
        parser.add_argument(
            "--channels-last", action="store_true", help="weights and inputs in channels-last memory (both models)"
        )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.device = checked_device(parser, args.device)
    return args


def checked_device(parser: argparse.ArgumentParser, name: str) -> torch.device:
    """``--device`` as a ``torch.device``; without a GPU, ``cuda`` stops the benchmark with one line."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {name}: this machine has no CUDA device (torch {torch.__version__}).")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work (a no-op on the CPU), so that a timed call includes it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def paired_times(
    runs: Dict[str, Callable[[], object]], repeats: int, warmup: int = 1, device: torch.device = torch.device("cpu")
) -> Dict[str, List[float]]:
    """Seconds of each run per round, rounds taken in turn (under ``torch.no_grad``; on a GPU each run's queued
    work is waited for before and after it)."""
    times: Dict[str, List[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for _ in range(warmup):
            for run in runs.values():
                run()
        for _ in range(repeats):
            for name, run in runs.items():
                synchronize(device)
                start = time.perf_counter()
                run()
                synchronize(device)
                times[name].append(time.perf_counter() - start)
    return times


def ratio_of_pairs(numerator: List[float], denominator: List[float]) -> float:
    """The median of the per-round ratios."""
    return statistics.median(n / d for n, d in zip(numerator, denominator))


def print_medians(times: Dict[str, List[float]], decimals: int = 3) -> None:
    """One line per run: its median time."""
    width = max(len(name) for name in times)
    for name, values in times.items():
        print(f"  {name:{width}}  {statistics.median(values):.{decimals}f} s")
