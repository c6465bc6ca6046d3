"""soak.py's verdict beyond chaos.py's: the extra clients, the upgrades, flat memory and
descriptors, leftover files; plots (matplotlib, if installed) and report.md."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from bench import MIB, REPO, say
from chaos_report import Report, attribute, describe_failure, loadgen_figures, probe_figures

BIN_S = 10  # soak_clients.BIN_NS in seconds
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d (\d\d:\d\d):\d\d,\d{3} (\w+) ", re.M)


# --- figures ---------------------------------------------------------------------------


def client_data(soak: Any) -> list[dict]:
    out = []
    for _proc, path in [*soak.probes, soak.mixed]:
        if path.exists():
            out.append(json.loads(path.read_text()))
    return out


def answered_series(rep: Report, data: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """Answers per second by client kind: (minutes since the start, rate)."""
    series: dict[str, list[tuple[float, float]]] = {}
    for d in data:
        for kind, bins in d.get("answered", {}).items():
            points = sorted((int(b) * BIN_S * 1e9, n) for b, n in bins.items())
            series[kind] = [((t - rep.t0_ns) / 60e9, n / BIN_S) for t, n in points if t >= rep.t0_ns]
    for i, kind in enumerate(("loadgen-persistent", "loadgen-cpr")):
        series[kind] = [((seg["started"] - rep.t0_ns) / 60e9, seg["results"][i].get("rps", 0.0))
                        for seg in rep.chaos.segments if seg["results"] and "failed" not in seg["results"][i]]
    return series


def fit_slope(rows: list[tuple[float, float, float]]) -> tuple[float, float]:
    """Least squares y = a + b*t (+ c*x when x varies): b per minute and its standard error.
    rows: (t_min, x, y)."""
    use_x = len({round(x, 6) for _, x, _ in rows}) > 1
    xs = [[1.0, t, x] if use_x else [1.0, t] for t, x, _ in rows]
    ys = [y for _, _, y in rows]
    n = len(xs[0])
    # [X'X | X'y | I]: eliminated to [I | beta | (X'X)^-1]
    a = [[sum(r[i] * r[j] for r in xs) for j in range(n)]
         + [sum(r[i] * y for r, y in zip(xs, ys, strict=True))]
         + [float(i == j) for j in range(n)] for i in range(n)]
    for col in range(n):  # Gauss-Jordan with partial pivoting
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-12:
            return 0.0, 0.0
        a[col], a[pivot] = a[pivot], a[col]
        a[col] = [v / a[col][col] for v in a[col]]
        for r in range(n):
            if r != col:
                f = a[r][col]
                a[r] = [v - f * w for v, w in zip(a[r], a[col], strict=True)]
    beta = [a[i][n] for i in range(n)]
    dof = len(rows) - n
    if dof <= 0:
        return beta[1], float("inf")
    fitted = [sum(b * v for b, v in zip(beta, r, strict=True)) for r in xs]
    sse = sum((y - f) ** 2 for y, f in zip(ys, fitted, strict=True))
    return beta[1], (sse / dof * a[1][n + 1 + 1]) ** 0.5


def flatness(rep: Report, soak: Any) -> tuple[list[dict], dict]:
    """Slopes (% per 10 minutes of the median level) after the warm-up, per series; and the
    series themselves for the plots."""
    by_t: dict[int, list[dict]] = defaultdict(list)
    for s in soak.samples:
        by_t[s["t"]].append(s)
    series: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for t, rows in sorted(by_t.items()):
        minute = (t - rep.t0_ns) / 60e9
        master = next((r for r in rows if r["role"] == "master" and r["current"]), None)
        workers = [r for r in rows if r["role"] == "worker" and r["current"]]
        if master is None or not workers:
            continue
        for key in ("rss", "uss", "fds"):
            series[f"master {key}"].append((minute, len(workers), master[key]))
        for r in workers:  # every worker's sample: judged as each minute's median (per_minute_medians)
            for key in ("rss", "uss"):
                series[f"worker median {key}"].append((minute, r["tcp"], r[key]))
            series["worker median fds - tcp"].append((minute, 0.0, r["fds"] - r["tcp"]))
        series["workers tcp sockets (sum)"].append((minute, 0.0, sum(r["tcp"] for r in workers)))
        series["workers rss (sum)"].append((minute, 0.0, sum(r["rss"] for r in workers)))
        series["workers fds (sum)"].append((minute, 0.0, sum(r["fds"] for r in workers)))
    judged = []
    for name, rows in series.items():
        if "(sum)" in name:
            continue  # grows and shrinks with TTIN/TTOU: plotted, not judged
        if name == "master uss":
            # Not a leak measure: the master is a new process at every USR2, and its USS is what it
            # does not share with its workers, which copy-on-write moves as they are forked and
            # recycled (2-7 MiB in the hour at 580ad22, RSS flat).  Plotted; RSS and fds are judged.
            continue
        after = per_minute_medians([r for r in rows if r[0] >= rep.args.warmup_minutes])
        if len(after) < 3:
            judged.append({"name": name, "n": len(after), "slope": None, "level": None})
            continue
        level = statistics.median(y for _, _, y in after)
        b, se = fit_slope(after)
        scale = 10 / level * 100 if level else 0.0  # per minute -> % of the level per 10 minutes
        judged.append({"name": name, "n": len(after), "slope": b * scale, "se": se * scale, "level": level,
                       "span": after[-1][0] - after[0][0],
                       "regressor": "worker count" if name.startswith("master")
                       else "median TCP sockets per worker" if name.endswith(("rss", "uss")) else "-"})
    return judged, series


def per_minute_medians(rows: list[tuple[float, float, float]]) -> list[tuple[float, float, float]]:
    """Each minute's samples (every worker's) as their median (time, regressor, value): a leak moves
    the median of a minute, a descriptor held for an instant (a hand-off channel, a retiring
    worker's) does not.  A short run (under 10 judged minutes) gets windows of a tenth of its span,
    so that it keeps ten points to fit.  Least squares on the per-sample median of two workers let such spikes
    make a slope (worker fds at e52b038: +6 %/10 min on a level of 9 that every 5-minute median of
    all worker samples showed unchanged)."""
    if not rows:
        return rows
    width = min(1.0, (rows[-1][0] - rows[0][0]) / 10) or 1.0  # minutes
    by_minute: dict[int, list[tuple[float, float, float]]] = defaultdict(list)
    for row in rows:
        by_minute[int(row[0] / width)].append(row)
    return [tuple(statistics.median(r[i] for r in group) for i in range(3))  # type: ignore[misc]
            for _, group in sorted(by_minute.items())]


def log_per_minute(soak: Any) -> Counter:
    text = soak.log.read_text(errors="replace") if soak.log.exists() else ""
    return Counter((m.group(1), m.group(2)) for m in LOG_LINE.finditer(text))


# --- plots -----------------------------------------------------------------------------


def plots(rep: Report, soak: Any, out: Path, answered: dict, failures: list[tuple[dict, bool]],
          series: dict, per_minute: Counter) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        made.append(name)

    def marks(ax) -> None:
        for k in soak.kills:
            ax.axvline((k["t"] - rep.t0_ns) / 60e9, color="0.85", lw=0.5, zorder=0)
        for u in soak.upgrades:
            ax.axvline((u["t"] - rep.t0_ns) / 60e9, color="tab:red" if u["kind"] else "tab:blue", lw=0.8,
                       ls="--", zorder=0)

    fig, ax = plt.subplots(figsize=(11, 4.5))
    for kind, points in sorted(answered.items()):
        if points:
            ax.plot([p[0] for p in points], [max(p[1], 0.1) for p in points], label=kind, lw=1)
    marks(ax)
    ax.set_yscale("log")
    ax.set(xlabel="minutes", ylabel="answers/s",
           title="Questions answered (10 s bins; loadgen per segment); "
           "grey: SIGKILLs, dashed: USR2 (red: broken)")
    ax.legend(fontsize=7, ncol=4)
    save(fig, "answers.png")

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 2]})
    kinds = sorted({f["kind"] for f, _ in failures}) or ["reset"]
    allowed = [sum(1 for f, ok in failures if ok and f["kind"] == k) for k in kinds]
    other = [sum(1 for f, ok in failures if not ok and f["kind"] == k) for k in kinds]
    left.bar(kinds, allowed, label="on a SIGKILLed worker's connection (allowed)", color="tab:gray")
    left.bar(kinds, other, bottom=allowed, label="other (bugs)", color="tab:red")
    left.set(title="Failures by kind (Python clients)", ylabel="failures")
    left.legend(fontsize=7)
    clients = sorted({f.get("client", "probe") for f, _ in failures}) or ["probe"]
    for f, ok in failures:
        right.scatter((f["t"] - rep.t0_ns) / 60e9, clients.index(f.get("client", "probe")),
                      color="tab:gray" if ok else "tab:red", s=12)
    marks(right)
    right.set_yticks(range(len(clients)), clients)
    right.set(xlabel="minutes", title="Failures over time")
    save(fig, "failures.png")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key in zip(axes, ("rss", "uss"), strict=True):
        ws = [s for s in soak.samples if s["role"] == "worker"]
        ms = [s for s in soak.samples if s["role"] == "master"]
        ax.scatter([(s["t"] - rep.t0_ns) / 60e9 for s in ws], [s[key] / MIB for s in ws], s=3, alpha=0.3,
                   color="tab:orange", label="each worker")
        ax.scatter([(s["t"] - rep.t0_ns) / 60e9 for s in ms], [s[key] / MIB for s in ms], s=6,
                   color="tab:blue", label="each master")
        for name, color in ((f"master {key}", "tab:blue"), (f"worker median {key}", "tab:red")):
            pts = series.get(name, [])
            ax.plot([p[0] for p in pts], [p[2] / MIB for p in pts], color=color, lw=1, label=name)
        ax.axvline(rep.args.warmup_minutes, color="k", lw=0.5, ls=":")
        ax.set(xlabel="minutes", ylabel="MiB", title=f"{key.upper()} of every process")
        ax.legend(fontsize=7)
    save(fig, "memory.png")

    fig, ax = plt.subplots(figsize=(11, 4))
    for name in ("master fds", "worker median fds - tcp", "workers fds (sum)", "workers tcp sockets (sum)"):
        pts = series.get(name, [])
        ax.plot([p[0] for p in pts], [p[2] for p in pts], lw=1, label=name)
    ws = [s for s in soak.samples if s["role"] == "worker"]
    ax.scatter([(s["t"] - rep.t0_ns) / 60e9 for s in ws], [s["fds"] for s in ws], s=3, alpha=0.3,
               color="tab:orange", label="each worker")
    ax.axvline(rep.args.warmup_minutes, color="k", lw=0.5, ls=":")
    ax.set(xlabel="minutes", ylabel="open descriptors", title="Open descriptors")
    ax.legend(fontsize=7)
    save(fig, "fds.png")

    fig, ax = plt.subplots(figsize=(11, 3.5))
    minutes = sorted({m for m, _ in per_minute})
    bottom = [0] * len(minutes)
    for level in sorted({lv for _, lv in per_minute}):
        counts = [per_minute[(m, level)] for m in minutes]
        ax.bar(minutes, counts, bottom=bottom, label=level)
        bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
    ax.set(xlabel="minute (log's local time)", ylabel="lines", title="Log lines per minute")
    ax.tick_params(axis="x", labelrotation=90, labelsize=6)
    ax.legend(fontsize=7)
    save(fig, "log.png")
    return made


# --- the verdict -----------------------------------------------------------------------


def judge(rep: Report, soak: Any, out: Path, leftovers: list[str], stopped_cleanly: bool,
          earlier: list[str]) -> list[str]:
    """Print the soak's own figures and targets, write the plots and report.md; the failures."""
    args = rep.args
    failures: list[str] = []
    data = client_data(soak)
    _results, attributed, probe_other, _colours = probe_figures(rep)
    mixed = json.loads(soak.mixed[1].read_text()) if soak.mixed and soak.mixed[1].exists() else {}
    m_attr, m_other = attribute(rep, mixed.get("failures", []))
    probe_held = Counter(id(k) for _, k in attributed)
    _lg, excess = loadgen_figures(rep, probe_held)
    retries = Counter()
    for d in data:
        retries.update(d.get("retries", {}))

    say("\n== soak: slow readers, '?' flooder, idle connections")
    say(f"  {mixed.get('result', '(no output)')}")
    say(f"  failures on connections of SIGKILLed workers (allowed): {len(m_attr)} "
        f"({', '.join(f'{k} {v}' for k, v in Counter(f['kind'] for f, _ in m_attr).items()) or '-'})")
    say(f"  other failures (bugs): {len(m_other)}")
    for f in sorted(m_other, key=lambda f: f["t"])[:40]:
        say(f"    [{f['client']}] " + describe_failure(rep, f))
    say(f"  probes, retry once (docs/PROMISES.md §8): asked again {retries['asked again']}, "
        f"rescued {retries['rescued']}, lost (the retry failed too) {retries['lost']}")

    say("\n== soak: upgrades (USR2)")
    for u in soak.upgrades:
        release = "broken: " + u["kind"] if u["kind"] else "healthy"
        say(f"  #{u['number']:<3} {release:<22} old master {u['old']}: {u['outcome']} "
            f"({u.get('resolved_s', 0):.1f} s)" + (f"\n        {u['log']}" if u.get("log") else ""))
    wrong = [u for u in soak.upgrades if u["outcome"] is None or u["outcome"].startswith("WRONG")]
    broken = [u for u in soak.upgrades if u["kind"]]
    healthy_done = [u for u in soak.upgrades if not u["kind"] and u["outcome"] == "as expected: completed"]

    judged, series = flatness(rep, soak)
    span = max((j.get("span") or 0) for j in judged) if judged else 0
    limit = args.flat_limit if span >= 10 else args.short_flat_limit
    say(f"\n== soak: memory and descriptors after the first {args.warmup_minutes:g} minutes "
        f"({len(soak.samples)} process samples, every {args.sample:g} s); limit {limit:g} % per 10 minutes"
        + ("" if span >= 10 else f" (only {span:.1f} minutes judged: too short for {args.flat_limit:g} %)"))
    flat_bad = []
    for j in judged:
        if j["slope"] is None:
            say(f"  {j['name']:<30} too few samples ({j['n']})")
            flat_bad.append(j["name"])
            continue
        unit = (lambda v: f"{v / MIB:.2f} MiB") if "fds" not in j["name"] else (lambda v: f"{v:.0f}")
        # A short run's slope is mostly noise: there it fails only if also 3 standard errors from 0.
        noise = span < 10 and abs(j["slope"]) < 3 * j["se"]
        ok = abs(j["slope"]) < limit or noise
        j["ok"] = ok
        flat_bad += [] if ok else [j["name"]]
        say(f"  {j['name']:<30} level {unit(j['level']):>10}  slope {j['slope']:+7.2f} ± {j['se']:.2f} "
            f"%/10 min ({j['n']} samples; regressed on {j['regressor']})  "
            + ("ok" if abs(j["slope"]) < limit else "ok (within 3 standard errors of 0)" if ok else "FAIL"))

    say(f"\n== soak: the run directory after the final stop ({'clean' if stopped_cleanly else 'NOT clean'} "
        f"stop): {', '.join(leftovers) or 'nothing left but the config and the log'}")

    others = len(probe_other) + len(m_other) + len(excess)
    targets = [
        (f"0 failures but on SIGKILLed workers' connections (probes {len(probe_other)}, "
         f"mixed {len(m_other)}, loadgen runs not explained {len(excess)})", others == 0),
        (f"every broken USR2 failed and left the old master serving ({len(broken)} sent), every healthy one "
         f"completed ({len(healthy_done)} of {len(soak.upgrades) - len(broken)}): {len(wrong)} wrong",
         not wrong and bool(broken)),
        (f"memory and descriptors flat after {args.warmup_minutes:g} min (|slope| < {limit:g} %/10 min)",
         not flat_bad),
        ("the service stopped by itself on TERM, and left no files", stopped_cleanly and not leftovers),
        ("chaos.py's checks (colours, last reload settled, no traceback)", not earlier),
    ]
    say("\n== soak: targets")
    for what, ok in targets:
        say(f"  {'PASS' if ok else 'FAIL'}  {what}")
    if others:
        failures.append(f"{len(m_other)} mixed-client failures not on a SIGKILLed worker's connection"
                        if m_other else "unexplained failures (listed above)")
    if wrong:
        failures.append(f"{len(wrong)} upgrades did not end as they should")
    if not targets[1][1] and not wrong:
        failures.append("no broken USR2 was sent")
    if flat_bad:
        failures.append(f"not flat: {', '.join(flat_bad)}")
    if not stopped_cleanly or leftovers:
        failures.append(f"final stop: clean={stopped_cleanly}, leftovers: {', '.join(leftovers) or '-'}")

    answered = answered_series(rep, data)
    all_failures = [(f, True) for f, _ in attributed] + [(f, False) for f in probe_other] \
        + [(f, True) for f, _ in m_attr] + [(f, False) for f in m_other]
    per_minute = log_per_minute(soak)
    pngs = plots(rep, soak, out, answered, all_failures, series, per_minute)
    write_markdown(rep, soak, out, targets, judged, limit, pngs, answered, retries, mixed, leftovers,
                   earlier + failures)
    say(f"  report: {out / 'report.md'}" + (f" with {', '.join(pngs)}" if pngs else " (no plots: "
                                            "matplotlib is not installed; pip install -e '.[bench]')"))
    return failures


def write_markdown(rep: Report, soak: Any, out: Path, targets: list, judged: list, limit: float,
                   pngs: list[str], answered: dict, retries: Counter, mixed: dict, leftovers: list[str],
                   failures: list[str]) -> None:
    args = rep.args
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "?"
    totals = {k: sum(p[1] for p in v) * (BIN_S if not k.startswith("loadgen") else args.segment)
              for k, v in answered.items()}
    lines = [
        f"# lancelotd soak: {args.minutes:g} minutes, seed {args.seed}", "",
        f"Commit `{commit}`, {rep.wall(rep.t0_ns)} local time; "
        f"`benchmarks/soak.py --minutes {args.minutes:g} --seed {args.seed}`. Log: `{soak.log}`.", "",
        f"**RESULT: {'PASS' if not failures else 'FAIL'}**", "",
        "| target | |", "|---|---|",
        *[f"| {what} | {'PASS' if ok else '**FAIL**'} |" for what, ok in targets], "",
        "## Operations", "",
        "sent: " + ", ".join(f"{k.upper() if k != 'kill' else 'SIGKILL'} {v}" for k, v in soak.ops.items())
        + f"; workers SIGKILLed held {sum(len(k['held']) for k in soak.kills)} client connections.", "",
        "| USR2 | release | outcome | s |", "|---|---|---|---|",
        *[f"| {u['number']} | {u['kind'] or 'healthy'} | {u['outcome']} | {u.get('resolved_s', 0):.1f} |"
          for u in soak.upgrades], "",
        "## Clients", "",
        "Answers (approximate, from 10 s bins and loadgen segments): "
        + ", ".join(f"{k} {v:,.0f}" for k, v in sorted(totals.items())) + ".", "",
        f"Mixed clients: `{mixed.get('result', '-')}`. Probes' retries (docs/PROMISES.md §8): asked again "
        f"{retries['asked again']}, rescued {retries['rescued']}, lost {retries['lost']}.", "",
        f"## Memory and descriptors (after {args.warmup_minutes:g} min; limit {limit:g} %/10 min)", "",
        "| series | level | slope %/10 min (± std. error) | samples | regressed on | |",
        "|---|---|---|---|---|---|",
        *[f"| {j['name']} | {(j['level'] or 0) / (1 if 'fds' in j['name'] else MIB):.2f}"
          f"{'' if 'fds' in j['name'] else ' MiB'} | "
          + (f"{j['slope']:+.2f} ± {j['se']:.2f}" if j["slope"] is not None else "-")
          + f" | {j['n']} | {j.get('regressor', '-')} | {'ok' if j.get('ok') else '**FAIL**'} |"
          for j in judged], "",
        f"Run directory after the final stop: {', '.join(leftovers) or 'the config and the log only'}.", "",
    ]
    if failures:
        lines += ["## Failures", "", *[f"- {f}" for f in failures], ""]
    titles = {"answers.png": "Questions answered", "failures.png": "Failures by kind",
              "memory.png": "RSS and USS of every process", "fds.png": "Open descriptors",
              "log.png": "Log lines per minute"}
    if pngs:
        lines += ["## Figures", ""]
        for name in pngs:
            lines += [f"### [{titles[name]}]({name})", "", f"![{titles[name]}]({name})", ""]
    else:
        lines += ["(No figures: matplotlib is not installed.)", ""]
    (out / "report.md").write_text("\n".join(lines))
