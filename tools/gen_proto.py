"""Regenerate (or check) the Python code generated from proto/sotto/v1/signals.proto.

    python -m tools.gen_proto          # write proto/sotto/v1/signals_pb2*.py(i)
    python -m tools.gen_proto --check  # exit 1 when the committed code differs from the .proto

The code is generated with `-I proto`, so the gRPC module imports `from sotto.v1 import signals_pb2`
and the package installs as `sotto.v1` (never a bare top-level `signals_pb2`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "proto"
PROTO_FILES = ["sotto/v1/signals.proto"]
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) into ``out_dir``; return the generated files."""
    try:
        from grpc_tools import protoc
    except ImportError:
        sys.exit("grpcio-tools is required: pip install -e '.[tools]'")
    import importlib.resources

    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *PROTO_FILES,
    ]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")
    return sorted(p for p in out_dir.rglob("*") if p.name.endswith(GENERATED_SUFFIXES))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        stale = []
        for produced in generate(tmp_dir):
            rel = produced.relative_to(tmp_dir)
            target = PROTO_ROOT / rel
            new = produced.read_bytes()
            if args.check:
                if not target.exists() or target.read_bytes() != new:
                    stale.append(str(target.relative_to(ROOT)))
            else:
                target.write_bytes(new)
                print(f"wrote {target.relative_to(ROOT)}")
    if stale:
        print(
            "generated code is out of date with the .proto; run: python -m tools.gen_proto", file=sys.stderr
        )
        for name in stale:
            print(f"  {name}", file=sys.stderr)
        return 1
    if args.check:
        print("generated code matches proto/sotto/v1/signals.proto")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
