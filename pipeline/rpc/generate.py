"""Regenerate the committed gRPC stubs from proto/*.proto.

    python -m pipeline.rpc.generate            # rewrite pipeline/rpc/*_pb2*.py
    python -m pipeline.rpc.generate --out DIR  # write elsewhere (the drift test)

Needs grpcio-tools (the `test` extra), pinned to the runtime grpcio version.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parents[2] / "proto"
STUB_DIR = Path(__file__).resolve().parent


def generate(out_dir: Path) -> list[Path]:
    """Compile every proto/*.proto into out_dir; return the files written."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    written: list[Path] = []
    for proto in sorted(PROTO_DIR.glob("*.proto")):
        args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}",
                f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", str(proto)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
        stem = proto.stem
        grpc_file = out_dir / f"{stem}_pb2_grpc.py"
        # protoc emits a top-level import; the stubs live in a package.
        text = re.sub(rf"^import {stem}_pb2 as", f"from pipeline.rpc import {stem}_pb2 as",
                      grpc_file.read_text(), flags=re.M)
        grpc_file.write_text(text)
        written += [out_dir / f"{stem}_pb2.py", grpc_file]
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=STUB_DIR)
    for path in generate(parser.parse_args().out):
        print(path)


if __name__ == "__main__":
    main()
