"""``PruneConfig``: the options of ``prune``, each declared once (type, default, choices, help),
from which ``onnxzip prune``'s options are generated."""

from __future__ import annotations

from dataclasses import dataclass

from onnxzip.config import (
    ConfigError,
    Criterion,
    IgnoredScope,
    Scope,
    Switch,
    check,
    coerce,
    option,
)

# Criteria read from gradients (the training engine); the others read the weights.
GRADIENT_CRITERIA = (Criterion.TAYLOR, Criterion.FISHER, Criterion.GRAD_STABILITY)


@dataclass
class PruneConfig:
    """Options of ``prune``; ``ratio`` or ``target_macs`` says how much."""

    ratio: float | None = option(
        None, "fraction of prunable channels to remove, in [0, 1)", metavar="R"
    )
    target_macs: float | None = option(None, "prune until MACs <= F x the original's", metavar="F")
    criterion: Criterion = option(
        Criterion.L1,
        "channel importance: l1, l2, bn, or from gradients (needs samples): taylor, fisher, "
        "grad-stability",
    )
    scope: Scope = option(
        Scope.GLOBAL,
        "one threshold over normalised scores (global) or the same ratio per group (local)",
    )
    max_group_ratio: float = option(
        0.9, "never remove more than this fraction of one group", metavar="F"
    )
    round_to: int = option(
        0,
        "keep channel counts multiples of N (0 = automatic: 16 for groups of 64+ channels, 8 "
        "from 32, else any count)",
        metavar="N",
    )
    exclude: IgnoredScope = option(
        IgnoredScope(),
        "leave the groups of these nodes (names or op types) alone",
        metavar="NODE",
        patterns_flag="--exclude-pattern",
        patterns_help="leave alone the groups of every node whose whole name matches this "
        "regular expression",
    )
    batch_size: int = option(32, cli=False)  # for the channel statistics, when samples are given
    # Mean compensation of the removed channels (with samples): "auto" keeps it only when it
    # lowers the output error on the samples; dead channels are always compensated (exact).
    compensation: Switch = option(Switch.AUTO, cli=False)
    # With samples: refit each layer whose inputs lost channels by least squares on the samples
    # (gradient-free recovery, pruning/reconstruct.py)
    reconstruct: bool = option(
        False,
        "with samples: refit every layer whose inputs lost channels by least squares on the "
        "samples (gradient-free recovery; no training engine needed)",
    )

    def __post_init__(self) -> None:
        coerce(self)

    def validate(self) -> None:
        check(self)
        if (self.ratio is None) == (self.target_macs is None):
            raise ConfigError("ratio", "give exactly one of {name} and target_macs")
        if self.ratio is not None and not 0 <= self.ratio < 1:
            raise ConfigError(
                "ratio", f"{{name}}: a ratio of channels must be in [0, 1), got {self.ratio}"
            )
        if self.target_macs is not None and not 0 < self.target_macs <= 1:
            raise ConfigError("target_macs", f"{{name}} must be in (0, 1], got {self.target_macs}")
        if not 0 < self.max_group_ratio < 1:
            raise ConfigError(
                "max_group_ratio", f"{{name}} must be in (0, 1), got {self.max_group_ratio}"
            )
        if self.round_to < 0:
            raise ConfigError(
                "round_to", f"{{name}} must be at least 0 (0 = automatic), got {self.round_to}"
            )
        if self.batch_size < 1:
            raise ConfigError("batch_size", f"{{name}} must be at least 1, got {self.batch_size}")
