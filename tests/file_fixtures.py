"""The part the data-prep file fixtures share: a tree of good and bad input files and their bytes."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass
class FileTree:
    root: Path
    good: dict = field(default_factory=dict)  # rel path -> expectation
    bad: dict[str, str] = field(default_factory=dict)  # rel path -> reason prefix
    data: dict[str, bytes] = field(default_factory=dict)  # rel path -> bytes written

    def add(self, good: dict[str, tuple[bytes, object]], bad: dict[str, tuple[bytes, str]],
            place: Callable[[str], str] = str) -> None:
        """Record ``{rel: (bytes, expectation)}`` and ``{rel: (bytes, reason)}``, each at ``place(rel)``."""
        for rel, (data, good_file) in good.items():
            self.good[place(rel)] = good_file
            self.data[place(rel)] = data
        for rel, (data, reason) in bad.items():
            self.bad[place(rel)] = reason
            self.data[place(rel)] = data

    def write(self) -> None:
        """Write every file of ``data`` under ``root``."""
        for rel, data in self.data.items():
            path = self.root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
