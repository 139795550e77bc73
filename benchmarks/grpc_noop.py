"""grpcio's own ceiling for the v2 benchmark: the protocol's gRPC service answering every ModelInfer with a
fixed phone-price answer, no validation, batching or model, in ``--workers`` processes sharing one port
(grpc binds with SO_REUSEPORT on Linux), as the service's workers do. What ``perf_analyzer`` reaches here
bounds what any servicer written on grpcio can reach on the same machine.

    python -m benchmarks.grpc_noop --port 8002 [--workers 2]
"""

import argparse
import asyncio
import os

import grpc

from service.v2.generated import inference_pb2 as pb
from service.v2.generated import inference_pb2_grpc as pb_grpc

MODEL, INPUT, OUTPUT = "phone-price", ("features", "FP64", [-1, 20]), ("probabilities", "FP64", [-1, 4])


class NoopServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Just enough of the protocol for perf_analyzer: metadata, config, and a canned inference answer."""

    def __init__(self):
        self.answer = pb.ModelInferResponse(model_name=MODEL, model_version="1")
        self.answer.outputs.add(name=OUTPUT[0], datatype=OUTPUT[1], shape=[1, 4])
        self.answer.raw_output_contents.append(bytes(8 * 4))

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="noop", version="1", extensions=["binary_tensor_data"])

    async def ModelMetadata(self, request, context):
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=MODEL,
            versions=["1"],
            platform="pytorch",
            inputs=[tensor(name=INPUT[0], datatype=INPUT[1], shape=INPUT[2])],
            outputs=[tensor(name=OUTPUT[0], datatype=OUTPUT[1], shape=OUTPUT[2])],
        )

    async def ModelConfig(self, request, context):
        return pb.ModelConfigResponse(
            config=pb.ModelConfig(
                name=MODEL,
                platform="pytorch",
                backend="pytorch",
                max_batch_size=0,
                input=[pb.ModelInput(name=INPUT[0], data_type="TYPE_FP64", dims=INPUT[2])],
                output=[pb.ModelOutput(name=OUTPUT[0], data_type="TYPE_FP64", dims=OUTPUT[2])],
            )
        )

    async def ModelInfer(self, request, context):
        return self.answer


async def serve(port: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(NoopServicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    for _ in range(args.workers - 1):  # before grpc starts anything: grpc's threads do not survive a fork
        if os.fork() == 0:
            break
    asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
