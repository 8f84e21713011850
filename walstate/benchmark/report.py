"""How ``walstate bench`` reports: the machine it ran on, one table per
workload with the targets under it, and the optional plot (throughput bars
and a put-latency CDF, when matplotlib is importable)."""

from __future__ import annotations

import os
import platform
import tempfile
from typing import Any


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _filesystem(path: str) -> str:
    """Type and device of the mount holding ``path`` (longest /proc/mounts prefix)."""
    path = os.path.realpath(path)
    best = ("", "unknown", "unknown")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and \
                        len(mnt) >= len(best[0]):
                    best = (mnt, fstype, dev)
    except OSError:
        pass
    return f"{best[1]} on {best[2]} (mounted at {best[0]})"


def machine(base: str | None) -> dict[str, Any]:
    d = base or tempfile.gettempdir()
    return {"nproc": os.cpu_count(), "machine": platform.machine(), "cpu": _cpu_model(),
            "kernel": platform.release(), "python": platform.python_version(),
            "bench_dir": os.path.realpath(d), "filesystem": _filesystem(d)}


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def text(res: dict[str, Any]) -> str:
    m = res["machine"]
    sz = res["sizes"]
    out = [f"walstate bench on {m['nproc']} x {m['cpu']} ({m['machine']}), kernel "
           f"{m['kernel']}, {m['filesystem']}",
           f"median of {sz['repeat']} repetition(s); ratio = the contender's figure divided by "
           "the baseline's (the first row) in the same repetition, median over repetitions"]
    for w in res["workloads"]:
        better = "higher" if w["higher_better"] else "lower"
        out.append("")
        out.append(f"== {w['title']} [{w['unit']}, {better} is better] ==")
        if w["detail"]:
            out.append(f"   {w['detail']}")
        width = max([len(r["contender"]) for r in w["rows"]] + [30]) + len(" (baseline)") + 1
        out.append(f"{'contender':<{width}} {w['unit']:>14} {'ratio':>8}")
        for r in w["rows"]:
            name = r["contender"] + (" (baseline)" if r["contender"] == w["baseline"] else "")
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
            out.append(f"{name:<{width}} {_fmt(r['value']):>14} {ratio:>8}")
        for t in w["targets"]:
            if t["value"] is None:
                verdict, val = "not checked", "-"
            else:
                verdict = "met" if t["met"] else "MISSED"
                val = _fmt(t["value"]) + ("" if t["versus"] is None else "x")
            out.append(f"   target: {t['text']}: {val} ({t['op']} {_fmt(t['bound'])}) "
                       f"-> {verdict}")
    targets = [t for w in res["workloads"] for t in w["targets"] if t["value"] is not None]
    if targets:
        met = sum(1 for t in targets if t["met"])
        out.append("")
        out.append(f"targets met: {met} of {len(targets)} checked")
    for n in res["notes"]:
        out.append(f"note: {n}")
    out.append(f"(bench took {res['seconds']:.0f} s)")
    return "\n".join(out)


def plot(res: dict[str, Any], path: str) -> str:
    """Draws every workload's figures and the durable put-latency CDF into ``path``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no plot (pip install 'walstate[bench]')"
    ws = res["workloads"]
    lat = res.get("latencies_us") or {}
    n = len(ws) + (1 if lat else 0)
    cols = 3
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.2 * rows), squeeze=False)
    flat = [a for row in axes for a in row]
    for ax, w in zip(flat, ws, strict=False):
        names = [r["contender"] for r in w["rows"]]
        vals = [r["value"] for r in w["rows"]]
        ours = w["key"].startswith("ckpt-latency")  # every row there is walstate
        colors = ["tab:gray" if nm == w["baseline"] else
                  ("tab:blue" if ours or nm.startswith("walstate") else "tab:orange")
                  for nm in names]
        ax.barh(range(len(names)), vals, color=colors)
        ax.set_yticks(range(len(names)), [nm[:38] for nm in names], fontsize=7)
        ax.invert_yaxis()
        ax.set_title(w["title"][:70], fontsize=8)
        ax.set_xlabel(w["unit"] + (" (higher is better)" if w["higher_better"]
                                   else " (lower is better)"), fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
        for i, r in enumerate(w["rows"]):
            if r["ratio"] is not None:
                ax.text(r["value"], i, f" {r['ratio']:.2f}x", va="center", fontsize=6)
    if lat:
        ax = flat[len(ws)]
        for name, xs in sorted(lat.items()):
            s = sorted(xs)
            if s:
                ax.plot(s, [(i + 1) / len(s) for i in range(len(s))], label=name[:30])
        ax.set_xscale("log")
        ax.set_xlabel("durable put latency, us (single writer)", fontsize=7)
        ax.set_ylabel("fraction of puts", fontsize=7)
        ax.set_title("put latency CDF (durable single writer)", fontsize=8)
        ax.legend(fontsize=6)
        ax.tick_params(labelsize=7)
    for ax in flat[n:]:
        ax.set_visible(False)
    m = res["machine"]
    fig.suptitle(f"walstate bench: {m['nproc']} x {m['cpu']}, {m['filesystem']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot written to {path}"


def markdown(res: dict[str, Any]) -> str:
    """The same report as Markdown tables (docs/PERFORMANCE.md is made of it)."""
    out: list[str] = []
    for w in res["workloads"]:
        better = "higher" if w["higher_better"] else "lower"
        out += ["", f"### {w['title']}", "", f"{w['unit']}, {better} is better. {w['detail']}",
                "", f"| contender | {w['unit']} | ratio to baseline |", "|---|---:|---:|"]
        for r in w["rows"]:
            name = r["contender"] + (" (baseline)" if r["contender"] == w["baseline"] else "")
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
            out.append(f"| {name} | {_fmt(r['value'])} | {ratio} |")
        if w["targets"]:
            out.append("")
        for t in w["targets"]:
            if t["value"] is None:
                verdict, val = "not checked", "-"
            else:
                verdict = "**met**" if t["met"] else "**missed**"
                val = _fmt(t["value"]) + ("" if t["versus"] is None else "x")
            out.append(f"- target: {t['text']}: {val} ({t['op']} {_fmt(t['bound'])}): {verdict}")
    return "\n".join(out).lstrip("\n")
