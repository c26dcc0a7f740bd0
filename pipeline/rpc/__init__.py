"""gRPC stubs generated from proto/ (committed; tests/rpc/test_stubs.py fails when they drift)."""
