"""casam behind NVIDIA Triton Inference Server (through PyTriton).

Triton gives a hospital what one process cannot: HTTP and gRPC endpoints, health checks,
Prometheus metrics and the usual way to scale out (replicas behind a load balancer). The
model it serves is ``runtime.pipeline.Pipeline``; concurrent requests share encoder batches.

Nothing here imports pytriton or tritonclient at module level: the wire schema
(``runtime.wire``) is plain numpy, so the edge runtime works without the
``serve`` extra, and only starting a server or a remote client needs it.
"""
