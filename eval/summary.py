"""Numbers computed from the merged records only: accuracies with 95% Clopper–Pearson
intervals, certified accuracy at each radius (and on a 0.01 grid), Cohen's TSV."""

from __future__ import annotations

from robustmim.eval.certify import clopper_pearson_lower
from robustmim.eval.records import RECORDS_FORMAT

RADIUS_GRID_STEP = 0.01


def accuracy(correct: int, total: int) -> dict:
    """Accuracy with its two-sided 95% Clopper–Pearson interval."""
    if total == 0:
        return {"accuracy": None, "correct": 0, "n": 0, "ci95": None}
    low = clopper_pearson_lower(correct, total, 0.025)
    high = 1 - clopper_pearson_lower(total - correct, total, 0.025)
    return {"accuracy": correct / total, "correct": correct, "n": total, "ci95": [low, high]}


def certified_at(record: dict, radius: float) -> bool:
    """Whether the sample is predicted correctly with a certified radius >= r (abstain = wrong)."""
    return bool(record["certify"]["correct"] and record["certify"]["radius"] >= radius)


def certified_accuracy(records: list[dict], radius: float) -> float:
    return sum(certified_at(r, radius) for r in records) / len(records)


def summarize(records: list[dict], plan: dict) -> dict:
    summary = {"records_format": RECORDS_FORMAT, "model": plan["model"], "method": plan["method"],
               "defense": plan["defense"], "split": plan["split"], "samples": len(records), "seed": plan["seed"],
               "trained": plan.get("trained", {})}
    if records and "clean" in records[0]:
        summary["clean"] = accuracy(sum(r["clean"]["correct"] for r in records), len(records))
    attacks = {}
    for key in records[0].get("attacks", {}) if records else []:
        attacks[key] = {**accuracy(sum(r["attacks"][key]["correct"] for r in records), len(records)),
                        **plan["attacks"][key],  # the attack's settings: attack, norm, epsilon, steps, ...
                        "max_distance": max(r["attacks"][key]["distance"] for r in records)}
    if attacks:
        summary["attacks"] = attacks
    if records and "certify" in records[0]:
        first = records[0]["certify"]
        top = max(r["certify"]["radius"] for r in records)
        grid = [round(i * RADIUS_GRID_STEP, 2) for i in range(int(top / RADIUS_GRID_STEP) + 2)]
        summary["certify"] = {
            "sigma": first["sigma"], "n0": first["n0"], "n": first["n"], "alpha": first["alpha"],
            "abstain": sum(r["certify"]["predict"] == -1 for r in records) / len(records),
            "certified_accuracy": {f"{r:g}": certified_accuracy(records, r) for r in plan["radii"]},
            "curve": [[r, certified_accuracy(records, r)] for r in grid]}
    if records and "predict" in records[0]:
        summary["predict"] = {**accuracy(sum(r["predict"]["correct"] for r in records), len(records)),
                              "abstain": sum(r["predict"]["abstain"] for r in records) / len(records),
                              "sigma": records[0]["predict"]["sigma"], "n": records[0]["predict"]["n"]}
    return summary


def cohen_table(records: list[dict]) -> str:
    """locuslab/smoothing's certify output: idx label predict radius correct time."""
    lines = ["idx\tlabel\tpredict\tradius\tcorrect\ttime"]
    for r in records:
        c = r["certify"]
        lines.append(f"{r['idx']}\t{r['label']}\t{c['predict']}\t{c['radius']:.3}\t{int(c['correct'])}\t"
                     f"{r['time_s']:.4f}")
    return "\n".join(lines) + "\n"
