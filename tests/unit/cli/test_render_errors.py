"""What `lipsync render` says when its stream fails: a connection lost mid-render is not
"cannot reach the server"."""
from __future__ import annotations

import grpc

from pipeline.cli.render import _rpc_error


class Refused(grpc.RpcError):
    """A gRPC error as a channel raises it: a status code and its details."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


ADDRESS = "127.0.0.1:50053"


def test_a_connection_lost_after_frames_says_the_server_went_away_mid_render() -> None:
    """The server's status lost in a race with its closing connection (the client saw its
    send fail): after frames came, the server was reached; it went away."""
    lost = Refused(grpc.StatusCode.UNAVAILABLE, "Stream removed (sendmsg: Broken pipe (32))")
    message = str(_rpc_error(lost, ADDRESS, frames=12))
    assert message.startswith(f"the connection to the server at {ADDRESS} was lost after 12 "
                              "frames (the server shut down, or the network failed)"), message
    assert "Broken pipe" in message and "no output was written" in message


def test_no_frame_yet_is_cannot_reach_and_a_shutdown_status_is_named() -> None:
    unreachable = Refused(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses")
    assert str(_rpc_error(unreachable, ADDRESS, frames=0)).startswith(
        f"cannot reach the server at {ADDRESS} (is `lipsync serve` running?)")
    stopping = Refused(grpc.StatusCode.UNAVAILABLE, "server shutting down")
    assert str(_rpc_error(stopping, ADDRESS, frames=5)) == (
        f"the server at {ADDRESS} shut down during the render; no output was written")
