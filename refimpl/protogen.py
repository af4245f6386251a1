"""``make proto``: generate ``refimpl/v1/`` from ``proto/refimpl/v1/chat.proto``.

Strategy
--------
One command makes every generated file, so the checked-in code can always
be remade and compared (``tests/test_grpc_codegen.py``).  ``grpc_tools``
bundles ``protoc`` itself, so nothing outside the venv is needed:

* ``--python_out`` / ``--pyi_out``: the protobuf messages and their types;
* ``--grpc_python_out``: the grpcio client stubs (tests, ``refimpl chat``);
* ``--connectrpc_out`` (the ``protoc-gen-connectrpc`` plugin, with
  ``protobuf=google`` so it uses the same message classes): the ASGI
  application the server mounts, and Connect clients.

The proto package ``refimpl.v1`` becomes the Python package ``refimpl.v1``
(protoc maps one to the other), which is why the output lands inside ours.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = Path("refimpl/v1/chat.proto")  # relative to ROOT / "proto"
GENERATED = ("chat_pb2.py", "chat_pb2.pyi", "chat_pb2_grpc.py", "chat_connect.py")


def generate(out: Path = ROOT) -> list[Path]:
    """Run protoc with the three generators; the files written, under ``out``."""
    from grpc_tools import protoc  # the [grpc] extra: only needed to generate

    plugin = shutil.which("protoc-gen-connectrpc", path=str(Path(sys.executable).parent))
    if plugin is None:
        raise SystemExit("protoc-gen-connectrpc is not installed: pip install -e '.[grpc]'")
    args = [
        "protoc",
        f"-I{ROOT / 'proto'}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        f"--plugin=protoc-gen-connectrpc={plugin}",
        f"--connectrpc_out={out}",
        "--connectrpc_opt=protobuf=google",
        str(ROOT / "proto" / PROTO),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed (its message is above)")
    return [out / PROTO.parent / name for name in GENERATED]


if __name__ == "__main__":
    for path in generate():
        print("wrote", path.relative_to(ROOT))
