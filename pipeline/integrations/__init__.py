"""The server as the avatar of voice-agent frameworks: a Pipecat video service
(`pipeline.integrations.pipecat`, extra `[pipecat]`) and a LiveKit Agents avatar worker
(`pipeline.integrations.livekit`, extra `[livekit]`), both clients of one live session
(`pipeline.integrations.live`). No role of the server imports them."""
