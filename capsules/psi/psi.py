"""The PSI capsule function (the seed's Task 7): the names two parties have in common, and nothing else.

Reads /inputs/names-b and /inputs/names-c (UTF-8, one name a line; surrounding blanks and empty lines are
not names), writes the sorted intersection to /output/result, one name a line. No network, no devices, no
other file: the isolation forbids them anyway, and the function needs none. Runs as an unprivileged user
(65534, or the executor's per-run uid). Exit 2 with one line on stderr when an input is not UTF-8 text.
"""

from __future__ import annotations

import sys

INPUTS = ("/inputs/names-b", "/inputs/names-c")
RESULT = "/output/result"


def names(path: str) -> set[str]:
    with open(path, "rb") as f:
        text = f.read().decode("utf-8")
    return {line.strip() for line in text.splitlines() if line.strip()}


def intersect(a: set[str], b: set[str]) -> str:
    return "".join(name + "\n" for name in sorted(a & b))


def main() -> int:
    try:
        b, c = (names(p) for p in INPUTS)
    except UnicodeDecodeError as exc:
        print(f"psi: an input is not UTF-8 text: {exc.reason} at byte {exc.start}", file=sys.stderr)
        return 2
    with open(RESULT, "w", encoding="utf-8") as out:
        out.write(intersect(b, c))
    return 0


if __name__ == "__main__":
    sys.exit(main())
