#!/usr/bin/env python3
"""Container health probe: ask a Flower process's gRPC health server whether it serves.

Flower 1.41's ``flower-superlink`` and ``flower-supernode`` start a plain-text gRPC
health server when given ``--health-server-address HOST:PORT``. This probe calls
``grpc.health.v1.Health/Check`` on it (``grpcio-health-checking`` ships with flwr), so
no extra binary is needed in the image.

Usage: ``healthcheck.py [HOST:PORT]`` (default ``$FLWR_HEALTH_ADDRESS`` or
``127.0.0.1:9098``). Exit 0 when SERVING, 1 otherwise.
"""

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main() -> int:
    address = (sys.argv[1:] or [os.environ.get("FLWR_HEALTH_ADDRESS", "127.0.0.1:9098")])[0]
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
    except grpc.RpcError as err:
        print(f"unhealthy: {address}: {err.code().name}", file=sys.stderr)
        return 1
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"unhealthy: {address}: status {reply.status}", file=sys.stderr)
        return 1
    print(f"healthy: {address}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
