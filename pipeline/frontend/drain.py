"""A drain that a load balancer does not see: `server.drain_delay_s` of lame duck before
the gRPC server stops.

Stopping a gRPC server sends GOAWAY and closes each connection once its last call ends.
Behind HAProxy (one HTTP/2 connection per box carrying many clients' calls) that close
races the end of the last responses: measured on loopback, about one call in twenty that
was in flight when the stop began lost its trailers (the client saw UNKNOWN, which no
retry policy retries). So a box behind a balancer, on SIGTERM:

1. says 503 on /readyz at once (ops_http) and keeps serving for `drain_delay_s`, time for
   the balancer's checks to take it out of rotation (fall 2 x inter 500 ms);
2. then waits until no call is in flight (or the grace ends), plus a moment for the last
   responses to leave, and only then stops the server, whose connections are idle by then.

With `drain_delay_s: 0` (one box, no balancer) the server stops at once: new calls get
UNAVAILABLE while the ones in flight finish.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from pipeline.frontend.heap import HeapTrim

log = logging.getLogger(__name__)

# after the last call ended: its trailers may still be in the transport's buffers
SETTLE_S = 0.1


class InflightCalls(grpc.aio.ServerInterceptor):
    """Counts the calls in flight, from their arrival to their end (status sent or
    cancelled), with an event set while there are none; every end settles `heap` (a call
    refused after its message arrived leaves its buffers to trim too)."""

    def __init__(self, heap: HeapTrim) -> None:
        self.count = 0
        self.heap = heap
        self.idle = asyncio.Event()
        self.idle.set()

    def _enter(self, context: grpc.aio.ServicerContext) -> None:
        self.count += 1
        self.idle.clear()
        context.add_done_callback(self._exit)

    def _exit(self, _context: object) -> None:
        self.count -= 1
        if self.count == 0:
            self.idle.set()
        self.heap.settle()

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler]],
            handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behavior = getattr(handler, kind)
            if behavior is not None:
                return handler._replace(**{kind: self._counted(behavior)})
        return handler

    def _counted(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        # grpc.aio tells a streaming handler by it being an async generator: keep its kind
        if inspect.isasyncgenfunction(behavior):
            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                self._enter(context)
                async for response in behavior(request, context):
                    yield response
            return stream

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            self._enter(context)
            return await behavior(request, context)
        return call


async def wait_out_balancer(calls: InflightCalls, delay_s: float, grace_s: float) -> float:
    """Serve on for `delay_s`, then until no call is in flight (at most `grace_s`); returns
    what is left of the grace for the server's own stop."""
    log.info("draining: lame duck for %.1f s while the balancer takes this box out", delay_s)
    await asyncio.sleep(delay_s)
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        async with asyncio.timeout(grace_s):
            await calls.idle.wait()
            await asyncio.sleep(SETTLE_S)
    except TimeoutError:
        log.warning("draining: %d call(s) still in flight after %.1f s", calls.count, grace_s)
    return max(0.0, grace_s - (loop.time() - start))
