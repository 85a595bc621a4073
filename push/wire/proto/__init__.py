"""The Protocol Buffers schema of wire contract v1 (push.proto) and its generated Python.

push_pb2.py and push_pb2.pyi are generated: never edit them by hand. Regenerate from the
repository root with the pinned grpcio-tools:

    python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. push/wire/proto/push.proto
"""
