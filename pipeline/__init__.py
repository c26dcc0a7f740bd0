"""Real-time lip-sync inference server.

Data path: gRPC/WebSocket -> frontend -> shared memory -> gpu_worker -> compositor -> frontend.
"""
