"""Deterministic built-in demo avatar and ONNX graphs."""
