"""Run mypy (strict) on longbatch.server and longbatch.client.

The packages are mapped from server/, client/ and gen/ by pyproject's
package-dir, which mypy cannot follow through an editable install; this
links them into build/typecheck/longbatch/ and points mypy there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINKS = {"server": ROOT / "server", "client": ROOT / "client", "v1": ROOT / "gen" / "longbatch" / "v1"}


def main() -> int:
    tree = ROOT / "build" / "typecheck" / "longbatch"
    tree.mkdir(parents=True, exist_ok=True)
    for name, target in LINKS.items():
        link = tree / name
        if not link.is_symlink():
            link.symlink_to(target, target_is_directory=True)
    env = {**os.environ, "MYPYPATH": str(tree.parent)}
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
           "-p", "longbatch.server", "-p", "longbatch.client", *sys.argv[1:]]
    return subprocess.run(cmd, env=env, cwd=ROOT).returncode


if __name__ == "__main__":
    raise SystemExit(main())
