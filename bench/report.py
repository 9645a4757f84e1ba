"""What every bench does with its table: print it and, when asked, write it to docs/results/."""

from __future__ import annotations

from pathlib import Path


def publish(text: str, path: Path | None) -> None:
    print(text)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
