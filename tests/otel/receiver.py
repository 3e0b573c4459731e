#!/usr/bin/env python3
"""A real OTLP/gRPC trace receiver for tokend's tests: implements
opentelemetry.proto.collector.trace.v1.TraceService/Export (PyPI opentelemetry-proto + grpcio)
and appends every span it receives to a file, one JSON object per line.

    python receiver.py OUT_FILE      # prints the port it listens on, then serves until killed
"""

import json
import sys
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


def value(any_value):
    kind = any_value.WhichOneof("value")
    return None if kind is None else str(getattr(any_value, kind))


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, out):
        self.out = out

    def Export(self, request, context):
        for resource_spans in request.resource_spans:
            resource = {a.key: value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    record = {
                        "name": span.name,
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex(),
                        "kind": span.kind,
                        "status": span.status.code,
                        "status_message": span.status.message,
                        "trace_state": span.trace_state,
                        "events": [
                            {
                                "name": event.name,
                                "attributes": {a.key: value(a.value) for a in event.attributes},
                            }
                            for event in span.events
                        ],
                        "attributes": {a.key: value(a.value) for a in span.attributes},
                        "resource": resource,
                    }
                    self.out.write(json.dumps(record) + "\n")
        self.out.flush()
        return trace_service_pb2.ExportTraceServiceResponse()


def main():
    out = open(sys.argv[1], "a", encoding="utf-8")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(out), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
