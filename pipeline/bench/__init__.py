"""`lipsync bench`: load generators (gRPC batches, WebSocket streams), in-process and
ONNX Runtime baselines, model load cycles, and the local server they drive."""
