"""`robustmim report`: several evaluations in one markdown table, plus PNG plots (certified
accuracy against radius per model; accuracy against epsilon per norm)."""

from __future__ import annotations

import json
from pathlib import Path

from robustmim.eval.attack_names import attack_labels, in_255ths
from robustmim.eval.certify import largest_certifiable_radius
from robustmim.eval.records import RECORDS_FORMAT
from robustmim.eval.summary import accuracy
from robustmim.errors import UserError
from robustmim.fileio import atomic_write_text


def load_summary(eval_dir: str | Path) -> dict:
    """summary.json, merging the records first when only the tasks' files exist (array jobs)."""
    eval_dir = Path(eval_dir)
    path = eval_dir / "summary.json"
    if not path.is_file():
        from robustmim.eval.runner import finalize

        return finalize(eval_dir)
    summary = json.loads(path.read_text())
    if summary.get("records_format") != RECORDS_FORMAT:
        raise UserError(f"{path}: written by an earlier robustmim (records format {summary.get('records_format', 1)}, "
                        f"this one reads {RECORDS_FORMAT}); re-run its evaluation with fresh=true")
    return summary


def percent(entry: dict | None) -> str:
    """An accuracy in %, with its 95% interval when known: 85.2 [82.0, 88.1]."""
    if not entry or entry.get("accuracy") is None:
        return "–"
    if not entry.get("ci95"):
        return f"{100 * entry['accuracy']:.1f}"
    low, high = entry["ci95"]
    return f"{100 * entry['accuracy']:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


# Marks a certified accuracy at a radius CERTIFY cannot reach with the run's n and alpha: 0 by construction.
UNREACHABLE = "†"


def summary_row(summary: dict, labels: dict[str, str] | None = None) -> dict[str, str]:
    """One table row; `labels`: the attacks' column names (attack_labels over every summary of
    the table, so attacks that differ only in a setting get separate columns)."""
    labels = labels or attack_labels(summary.get("attacks", {}))
    trained = summary.get("trained") or {}
    row = {"method": summary["method"]}
    if trained:  # which encoder and how many fine-tuning images: what a comparison must hold equal
        row["init"] = Path(trained["init"]).stem if trained.get("init") else "scratch"
        row["fine-tuned on"] = str(trained.get("samples_seen", "?"))
    row.update({"n": str(summary["samples"]), "clean": percent(summary.get("clean"))})
    for key, entry in sorted(summary.get("attacks", {}).items(), key=lambda kv: (kv[1]["norm"], kv[1]["epsilon"])):
        row[labels[key]] = percent(entry)
    certify = summary.get("certify")
    if certify:
        n = summary["samples"]
        reach = largest_certifiable_radius(certify["sigma"], certify["n"], certify["alpha"])
        for radius, value in certify["certified_accuracy"].items():
            flag = f" {UNREACHABLE}" if float(radius) > reach else ""
            row[f"cert. r={radius} (σ={certify['sigma']:g})"] = percent(accuracy(round(value * n), n)) + flag
    if summary.get("predict"):
        row["PREDICT"] = percent(summary["predict"])
    return row


def markdown_table(rows: list[tuple[str, dict[str, str]]]) -> str:
    columns = []
    for _, row in rows:
        columns += [c for c in row if c not in columns]
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for label, row in rows:
        lines.append(f"| {label} | " + " | ".join(row.get(c, "–") for c in columns) + " |")
    return "\n".join(lines) + "\n"


def summaries_table(summaries: list[tuple[str, dict]]) -> str:
    """One row per evaluation; an attack's column is shared by the evaluations that ran it with
    the same settings (its key), so a column never mixes attacks that differ in any setting."""
    every_attack = {key: fields for _, s in summaries for key, fields in s.get("attacks", {}).items()}
    labels = attack_labels(every_attack)
    return markdown_table([(label, summary_row(s, labels)) for label, s in summaries])


def pgd_curves(summaries: list[tuple[str, dict]], norm: str) -> list[tuple[str, list[tuple[float, float]]]]:
    """Per run, (ε, accuracy) under PGD in `norm`, from clean (ε 0) up. PGD only: an APGD point at
    one ε beside the PGD points would read as a jump of the curve."""
    curves = []
    for label, s in summaries:
        points = sorted((a["epsilon"], a["accuracy"]) for a in s.get("attacks", {}).values()
                        if a["norm"] == norm and a.get("attack", "pgd") == "pgd")
        if points:
            clean = s.get("clean", {}).get("accuracy")
            curves.append((label, ([(0.0, clean)] if clean is not None else []) + points))
    return curves


def write_plots(summaries: list[tuple[str, dict]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    certified = [(label, s["certify"]) for label, s in summaries if s.get("certify")]
    if certified:
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, cert in certified:
            radii, values = zip(*cert["curve"])
            ax.step(radii, [100 * v for v in values], where="post", label=f"{label} (σ={cert['sigma']:g})")
        ax.set(xlabel="L2 radius", ylabel="certified accuracy (%)", title="Randomized smoothing (CERTIFY)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        written.append(out / "certified_accuracy.png")
        fig.savefig(written[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    for norm, symbol in (("linf", "L∞"), ("l2", "L2")):
        curves = pgd_curves(summaries, norm)
        if not curves:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        per_255 = norm == "linf" and all(in_255ths(e) for _, points in curves for e, _ in points)
        for label, points in curves:
            eps, acc = zip(*points)
            ax.plot([e * 255 if per_255 else e for e in eps], [100 * a for a in acc], marker="o", label=label)
        ax.set(xlabel="ε (/255)" if per_255 else f"ε ({symbol}, [0, 1] pixels)", ylabel="accuracy (%)",
               title=f"PGD, {symbol}")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        written.append(out / f"accuracy_vs_epsilon_{norm}.png")
        fig.savefig(written[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    return written


def write_report(eval_dirs: list[str], out_dir: str | Path) -> str:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries = []
    for eval_dir in eval_dirs:
        if not Path(eval_dir).is_dir():
            raise UserError(f"evaluation directory not found: {eval_dir}")
        summaries.append((Path(eval_dir).name, load_summary(eval_dir)))
    table = summaries_table(summaries)
    plots = write_plots(summaries, out)
    notes = ["", "Accuracies in %, over `n` samples, with 95% Clopper-Pearson intervals; randomized models are "
             "attacked end to end with EOT and scored by a majority of noise draws; certified accuracy counts "
             "abstentions as wrong."]
    if UNREACHABLE in table:
        notes.append(f"{UNREACHABLE} A radius beyond sigma * Phi^-1(alpha^(1/n)), the largest CERTIFY can give with "
                     "the evaluation's n and alpha: 0 whatever the model; raise certify.n to read it.")
    notes += [f"![{p.stem}]({p.name})" for p in plots]
    atomic_write_text(out / "report.md", "# Robustness report\n\n" + table + "\n".join(notes) + "\n")
    return table
