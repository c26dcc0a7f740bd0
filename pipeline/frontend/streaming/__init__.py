"""One stream session behind three transports: the WebSocket /audio, StreamAudio and
the seed's ProcessAudio."""
