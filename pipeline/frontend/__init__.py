"""Role: the asyncio frontend (gRPC, admission, routing, answers)."""
