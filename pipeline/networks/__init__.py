"""SyncTalk-2D's networks as ONNX graphs: one layout, its weights deterministic (the bench
model) or a trained state dict's, BatchNorm folded."""
