"""gRPC stubs generated from proto/ (committed; tests/unit/rpc/test_stubs.py fails when they drift)."""
