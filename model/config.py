"""``ModelConfig``: every size and every ablation of the unified backbone in one dataclass."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Compression = Literal["learned", "pyramid"]

DEFAULT_WIDTHS = (1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.125, 0.125)
INPUT_COMPRESSION_WIDTHS = (0.125,) * 8


@dataclass(frozen=True)
class ModelConfig:
    """Sizes and switches of the backbone (docs/model.md). Ablations are plain values here.

    - ``layer_widths``: per layer, the fraction of the ``history_len`` S tokens that layer works
      on. The default is UniRec's delayed schedule (n, n, n/2, n/2, n/4, n/4, n/8, n/8);
      ``INPUT_COMPRESSION_WIDTHS`` compresses at the input instead.
    - ``compression``: ``"learned"`` (UniRec: softmax(Q_c S^T / sqrt d) S with learned queries)
      or ``"pyramid"`` (OneTrans: only the newest S tokens stay as queries).
    - ``seq_feature_mixing``: False closes the S<->NS off-diagonal blocks of the mask.
    - ``ug_sep``: True closes U -> G (the user side never reads the candidate); False reopens it.
    - ``use_state``: the GRU user-state token on or off.
    - ``core_selection``: CDNet's top-``core_k`` core behaviours plus the interest-distribution
      token (``interest_bins`` bins) on or off.
    - ``compensation``: UG-Sep's information compensation term on or off.
    - ``affinity_len``: the newest events of the user the candidate's affinity (C_g) is counted
      over, at least ``history_len`` (None: the history window itself). The S tokens and the
      user's action shares stay on the newest ``history_len``; a longer affinity window only
      counts more events, and the state store keeps that many (``stored_events``).
    """

    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 8
    ffn_mult: int = 4
    dropout: float = 0.1
    history_len: int = 50
    affinity_len: int | None = None
    layer_widths: tuple[float, ...] = DEFAULT_WIDTHS
    compression: Compression = "learned"
    seq_feature_mixing: bool = True
    ug_sep: bool = True
    use_state: bool = True
    core_selection: bool = True
    core_k: int = 16
    interest_bins: int = 5
    compensation: bool = True
    tasks: tuple[str, ...] = field(default=("click",))

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if len(self.layer_widths) != self.n_layers:
            raise ValueError(
                f"layer_widths has {len(self.layer_widths)} entries for {self.n_layers} layers"
            )
        if any(not 0 < w <= 1 for w in self.layer_widths):
            raise ValueError(f"layer_widths must lie in (0, 1], got {self.layer_widths}")
        if any(b > a for a, b in zip(self.layer_widths, self.layer_widths[1:], strict=False)):
            raise ValueError(f"layer_widths must not grow with depth, got {self.layer_widths}")
        if self.compression not in ("learned", "pyramid"):
            raise ValueError(f"compression must be 'learned' or 'pyramid': {self.compression!r}")
        if self.history_len < 1 or self.core_k < 1 or self.interest_bins < 1:
            raise ValueError("history_len, core_k and interest_bins must be positive")
        if not self.tasks:
            raise ValueError("at least one task head is needed")
        if self.affinity_len is not None and self.affinity_len < self.history_len:
            raise ValueError(f"affinity_len={self.affinity_len} is shorter than "
                             f"history_len={self.history_len}")

    @property
    def seq_widths(self) -> tuple[int, ...]:
        """The number of S tokens each layer outputs (at least one)."""
        return tuple(max(1, math.ceil(self.history_len * w)) for w in self.layer_widths)

    @property
    def stored_events(self) -> int:
        """The newest events of a user that one request reads, what the state store keeps per
        user: the affinity window, which holds the history window (``affinity_len`` >=
        ``history_len``)."""
        return self.history_len if self.affinity_len is None else self.affinity_len

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict; ``affinity_len`` only when set, so a config without it has
        the dict (and the serving signature, ``model.signature``) it had before the field."""
        data = asdict(self)
        if data["affinity_len"] is None:
            del data["affinity_len"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        data = dict(data)
        data["layer_widths"] = tuple(data["layer_widths"])
        data["tasks"] = tuple(data["tasks"])
        return cls(**data)
