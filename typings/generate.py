"""Regenerate the type stubs of the Envoy APIs the data plane serves (`make stubs`).

Why: xds-protos ships the generated Python modules but neither the ``.proto`` sources nor type
stubs, so mypy saw every Envoy message and servicer as ``Any``. Each generated module carries its
file descriptor; this script collects those of the services below with everything they import
into one descriptor set and runs protoc's mypy-protobuf plugins on it, as ``make proto`` does for
the project's own schema. Only the data plane's services are stubbed: the config generator builds
Envoy's bootstrap from dozens of other files, which stay untyped.

Usage: ``python typings/generate.py OUT_DIR`` (``make stubs`` writes into ``typings/``).
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor, descriptor_pb2

# The .proto files whose messages and services the data plane uses.
SERVED = (
    "envoy/service/ext_proc/v3/external_processor.proto",
    "envoy/service/accesslog/v3/als.proto",
    "envoy/service/runtime/v3/rtds.proto",
    "envoy/service/cluster/v3/cds.proto",
    "envoy/service/discovery/v3/discovery.proto",
    "envoy/data/accesslog/v3/accesslog.proto",
)
# Files whose services are stubbed too (the others hold messages only).
WITH_SERVICES = SERVED[:4]


def descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    """The served files and everything they import, dependencies first."""
    out = descriptor_pb2.FileDescriptorSet()
    seen: set[str] = set()

    def add(fd: descriptor.FileDescriptor) -> None:
        if fd.name in seen:
            return
        seen.add(fd.name)
        for dep in fd.dependencies:
            add(dep)
        fd.CopyToProto(out.file.add())

    for name in SERVED:
        add(
            importlib.import_module(
                name.removesuffix(".proto").replace("/", ".") + "_pb2"
            ).DESCRIPTOR
        )
    return out


def generate(out_dir: Path) -> None:
    """Write the stubs under ``out_dir`` (``envoy/...``), with the ``__init__.pyi`` files that
    make each folder a package for mypy."""
    with tempfile.TemporaryDirectory() as tmp:
        fds = Path(tmp) / "envoy.pb"
        fds.write_bytes(descriptor_set().SerializeToString())
        for plugin, files in (("mypy", SERVED), ("mypy_grpc", WITH_SERVICES)):
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "grpc_tools.protoc",
                    f"--descriptor_set_in={fds}",
                    f"--{plugin}_out={out_dir}",
                    *files,
                ],
                check=True,
                capture_output=True,
            )
    for folder in [out_dir / "envoy", *(out_dir / "envoy").rglob("*")]:
        if folder.is_dir():
            (folder / "__init__.pyi").touch()


if __name__ == "__main__":
    generate(Path(sys.argv[1]))
