"""`lipsync livekit-avatar`: a LiveKit Agents avatar worker backed by a live session of this
server (pipeline.integrations.livekit; the LiveKit SDK is the extra `[livekit]`)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import NoReturn


def cmd_livekit_avatar(args: argparse.Namespace) -> int:
    try:
        from livekit import rtc

        from pipeline.integrations.livekit import LipsyncVideoGenerator, serve_room
    except ImportError as exc:
        sys.exit(f"lipsync livekit-avatar: {exc.name or exc} is missing: "
                 "pip install 'lipsync-server[livekit]'")
    try:
        generator = LipsyncVideoGenerator(args.server, model=args.model,
                                          token=args.server_token or os.environ.get("LIPSYNC_TOKEN"),
                                          sample_rate=args.sample_rate)
        asyncio.run(serve_room(args.url, args.token, generator, args.agent_identity))
    except ValueError as exc:
        sys.exit(f"lipsync livekit-avatar: {exc}")
    except rtc.ConnectError as exc:
        _leave_now(f"lipsync livekit-avatar: cannot join the room at {args.url}: {exc.message}")
    return 0


def _leave_now(message: str) -> NoReturn:
    """Exit 1 with `message`, skipping the interpreter's teardown: after a failed join the
    LiveKit SDK's native runtime may still be retrying, and its exit handler then aborts the
    process now and then (a Rust panic in a function that cannot unwind: SIGABRT, 1 run in
    ~12 here), so a clear one-line error would end in a core dump."""
    print(message, file=sys.stderr, flush=True)
    logging.shutdown()
    os._exit(1)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("livekit-avatar", help="join a LiveKit room as the avatar of an Agents "
                                              "agent (extra [livekit])")
    p.add_argument("--url", required=True, help="the LiveKit server (wss://...)")
    p.add_argument("--token", required=True,
                   help="a LiveKit access token for the avatar participant")
    p.add_argument("--server", default="ws://localhost:8080",
                   help="this server's WebSocket base (default ws://localhost:8080)")
    p.add_argument("--model", help="the avatar (default: the server's streaming.default_model)")
    p.add_argument("--server-token", help="bearer token of a server with server.auth "
                                          "(default $LIPSYNC_TOKEN)")
    p.add_argument("--agent-identity", help="the agent participant whose audio to take "
                                            "(default: the first agent that joins)")
    p.add_argument("--sample-rate", type=int, default=24000,
                   help="rate of the audio published (the agent's is resampled to it)")
    p.set_defaults(func=cmd_livekit_avatar)
