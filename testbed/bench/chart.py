"""The PNG chart of one boot's phases (matplotlib, an optional dev dependency)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from testbed.bench.report import PHASE_NAMES, Phase
from testbed.errors import HostCapabilityError

# One colour per phase, the same on every architecture's bar (tab10 + 1).
COLOURS = (
    "#7f7f7f",
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#bcbd22",
)


def draw_phases(phases: Mapping[str, Sequence[Phase]], path: Path, title: str) -> Path:
    """A horizontal bar per architecture, one coloured segment per phase, labelled."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on a CI runner
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise HostCapabilityError(
            "matplotlib is not installed, so there is no chart; "
            "`.venv/bin/pip install -e '.[dev]'` installs it"
        ) from exc

    colour = dict(zip(PHASE_NAMES, COLOURS, strict=True))
    arches = list(phases)
    fig, ax = plt.subplots(figsize=(12, 1.4 + 1.1 * len(arches)), dpi=110)
    try:
        for row, arch in enumerate(arches):
            for phase in phases[arch]:
                ax.barh(
                    row,
                    phase.duration,
                    left=phase.start,
                    height=0.6,
                    color=colour.get(phase.name, "#333333"),
                    edgecolor="white",
                    label=phase.name if row == 0 else None,
                )
                if phase.duration >= 0.12:
                    ax.text(
                        phase.start + phase.duration / 2,
                        row,
                        f"{phase.duration:.2f}",
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white",
                    )
        ax.set_yticks(range(len(arches)), arches)
        ax.invert_yaxis()
        ax.set_xlabel("seconds since GuestVM.start (TCG)")
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
        ax.legend(
            loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=5, fontsize=8, frameon=False
        )
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path
