"""Validation curves of the comparison arms (issue 11 §4: do the arms reach a plateau at the common budget?).

    python scripts/arms_curves.py [--arms runs/arms] [--out docs/figures/arms_validation.png]

Each arm's training logs validation Dice every `validate_every` steps (`<arm>_work/validation.jsonl`).
Per target context, the curves compare the joint arm (mean over that context's structures), the
dedicated arm and the transfer arm's fine-tuning; make_results.py embeds the figure and the table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["LeftAtriumMR", "BrainTumorMR", "CardiacCineMR"]


def read_curve(work: Path) -> list[dict]:
    path = work / "validation.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def context_mean(entry: dict, names: list[str]) -> float | None:
    values = [entry["dice"][n] for n in names if entry["dice"].get(n) is not None]
    return sum(values) / len(values) if values else None


def curves(arms: Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{context: {arm kind: [(step, mean validation Dice of the context's structures)]}}; the context's
    structures are those its dedicated arm reports."""
    joint = read_curve(arms / "joint_work")
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for ctx in TARGETS:
        dedicated = read_curve(arms / f"dedicated_{ctx}_work")
        if not dedicated:
            continue
        names = [n for n in dedicated[0]["dice"] if n != "mean"]
        per_arm = {
            "joint": joint,
            "dedicated": dedicated,
            "transfer (fine-tuning)": read_curve(arms / f"transfer_{ctx}_work"),
        }
        out[ctx] = {
            kind: [(e["step"], m) for e in entries if (m := context_mean(e, names)) is not None]
            for kind, entries in per_arm.items()
            if entries
        }
    return out


def plot(data: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(len(data), 1), figsize=(4.2 * max(len(data), 1), 3.4), squeeze=False)
    for ax, (ctx, arms) in zip(axes[0], data.items()):
        for kind, points in arms.items():
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3, label=kind)
        ax.set_title(ctx)
        ax.set_xlabel("step (batch 2)")
        ax.set_ylabel("validation Dice\n(mean of the context's structures)", fontsize=8)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def table(data: dict) -> list[str]:
    """The last three validation points per arm and context: a plateau shows as a flat tail."""
    lines = ["| context | arm | last validation points (step: Dice) |", "|---|---|---|"]
    for ctx, arms in data.items():
        for kind, points in arms.items():
            tail = ", ".join(f"{s}: {d:.3f}" for s, d in points[-3:])
            lines.append(f"| {ctx} | {kind} | {tail} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", type=Path, default=ROOT / "runs" / "arms")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "figures" / "arms_validation.png")
    args = ap.parse_args()
    data = curves(args.arms)
    if not data:
        raise SystemExit(f"no dedicated arm has validation points in {args.arms} yet")
    plot(data, args.out)
    print("\n".join(table(data)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
