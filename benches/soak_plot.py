"""RSS (and CPU) of the relay over time from target/bench-soak.csv.

Usage: soak_plot.py CSV PNG TITLE [WARM_UP_MINUTES]   (run by benches/soak.rs)
"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    source, target, title = sys.argv[1], sys.argv[2], sys.argv[3]
    warm_up = float(sys.argv[4]) if len(sys.argv) > 4 else 1.0
    series: dict[str, dict[str, list[float]]] = {}
    with open(source, newline="") as f:
        for row in csv.DictReader(f):
            s = series.setdefault(row["variant"], {"t": [], "rss": [], "cpu": []})
            s["t"].append(float(row["seconds"]) / 60.0)
            s["rss"].append(int(row["rss_kib"]) / 1024.0)
            s["cpu"].append(float(row["cpu_percent"]))
    fig, (rss, cpu) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for name, s in series.items():
        rss.plot(s["t"], s["rss"], marker=".", label=name)
        cpu.plot(s["t"][1:], s["cpu"][1:], marker=".", label=name)
    rss.axvline(warm_up, color="grey", linestyle=":", linewidth=1)
    rss.set_ylabel("RSS (MiB)")
    low = min(min(s["rss"]) for s in series.values())
    high = max(max(s["rss"]) for s in series.values())
    rss.set_ylim(max(0.0, low - 4.0), high + 4.0)
    rss.set_title(title)
    rss.legend(loc="lower right")
    rss.grid(True, alpha=0.3)
    cpu.set_ylabel("CPU (% of a core)")
    cpu.set_xlabel("minutes (dotted line: end of the warm-up, the reference for the bound)")
    cpu.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(target, dpi=100)


if __name__ == "__main__":
    main()
