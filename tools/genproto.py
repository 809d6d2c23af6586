"""Regenerate the Python code for protos/ into gen/, or check it is current.

    python tools/genproto.py             # write gen/longbatch/v1/*
    python tools/genproto.py --check     # exit 1 if gen/ differs from protos/
    python tools/genproto.py --buf-deps  # fill .buf-deps/ for `buf lint`

The googleapis protos come from the installed googleapis-common-protos and the
well-known types from grpcio-tools, so no copied tree is committed. Output is
reproducible for the pinned grpcio-tools and mypy-protobuf versions.
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.util
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
GEN = ROOT / "gen"
PACKAGE = Path("longbatch") / "v1"


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations)))


def googleapis_tree(out: Path) -> None:
    """Copy the googleapis protos that protos/ imports into ``out``.

    googleapis-common-protos ships google/longrunning/operations.proto as
    operations_proto.proto (its descriptor keeps the upstream name), so it is
    copied back under the upstream name that other languages' tools expect.
    """
    shutil.rmtree(out, ignore_errors=True)
    site = _package_dir("google.rpc").parent.parent
    for sub in ("google/api", "google/longrunning", "google/rpc"):
        (out / sub).mkdir(parents=True, exist_ok=True)
        for proto in (site / sub).glob("*.proto"):
            name = "operations.proto" if proto.name == "operations_proto.proto" else proto.name
            shutil.copyfile(proto, out / sub / name)


def generate(out: Path) -> None:
    """Run protoc over protos/longbatch/v1 into ``out``."""
    scripts = Path(sysconfig.get_path("scripts"))
    sources = sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / PACKAGE).glob("*.proto"))
    with tempfile.TemporaryDirectory() as deps:
        googleapis_tree(Path(deps))
        args = [
            sys.executable, "-m", "grpc_tools.protoc",
            f"-I{PROTOS}", f"-I{_package_dir('grpc_tools') / '_proto'}", f"-I{deps}",
            f"--plugin=protoc-gen-mypy={scripts / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={scripts / 'protoc-gen-mypy_grpc'}",
            f"--python_out={out}", f"--grpc_python_out={out}",
            f"--mypy_out={out}", f"--mypy_grpc_out={out}",
            *sources,
        ]
        subprocess.run(args, check=True, cwd=PROTOS)
    pkg = out / PACKAGE
    (pkg / "__init__.py").write_text('"""Generated from protos/longbatch/v1 by tools/genproto.py."""\n')
    (pkg / "py.typed").write_text("")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if gen/ is stale")
    parser.add_argument("--buf-deps", action="store_true", help="fill .buf-deps/ for buf lint")
    args = parser.parse_args()
    if args.buf_deps:
        googleapis_tree(ROOT / ".buf-deps")
        return 0
    if not args.check:
        shutil.rmtree(GEN / PACKAGE, ignore_errors=True)
        generate(GEN)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        cmp = filecmp.dircmp(Path(tmp) / PACKAGE, GEN / PACKAGE, ignore=["__pycache__"])
        stale = cmp.left_only + cmp.right_only + cmp.diff_files
        if stale:
            print(f"gen/ is stale ({', '.join(sorted(stale))}); run: python tools/genproto.py")
            return 1
    print("gen/ is up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
