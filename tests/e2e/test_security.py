"""TLS, tokens and connection limits on the real server, with a CA and certificates made
here by openssl: gRPC and wss over TLS, bearer tokens on every RPC but health checks and
on every WebSocket, tokens re-read on SIGHUP, mutual TLS, idle and per-address limits."""
from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import soundfile as sf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from pipeline.bench.local_server import ServerProcess
from pipeline.client import channel, speech_like_audio
from pipeline.rpc import monolithic_pb2 as pb
from pipeline.rpc import monolithic_pb2_grpc as pb_grpc
from tests.conftest import write_config

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")

TOKEN, NEW_TOKEN = "s3cret-token", "rotated-token"


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_pki(tmp: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    files = {name: tmp / f"{name}.pem" for name in
             ("ca", "ca_key", "server", "server_key", "client", "client_key")}
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test CA",
            "-keyout", str(files["ca_key"]), "-out", str(files["ca"]))
    for name, extension in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
                            ("client", "extendedKeyUsage=clientAuth")):
        csr = tmp / f"{name}.csr"
        ext = tmp / f"{name}.ext"
        ext.write_text(extension + "\n")
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                "-keyout", str(files[f"{name}_key"]), "-out", str(csr))
        openssl("x509", "-req", "-in", str(csr), "-CA", str(files["ca"]), "-CAkey",
                str(files["ca_key"]), "-CAcreateserial", "-days", "2", "-extfile", str(ext),
                "-out", str(files[name]))
    return files


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, small_models_root: Path, pki):
    tmp = tmp_path_factory.mktemp("secure")
    tokens = tmp / "tokens"
    tokens.write_text(f"# one per line\n{TOKEN}\n")
    config = write_config(tmp / "config.yaml", small_models_root, **{
        "server.tls": {"cert_file": str(pki["server"]), "key_file": str(pki["server_key"])},
        "server.auth": {"tokens_file": str(tokens)},
        "streaming.idle_timeout_s": 1.5, "streaming.max_sessions_per_address": 2,
        "streaming.capacity_fps": 1000, "compositor.pool_size": 1})
    with ServerProcess(config, log_path=tmp / "server.log", tls_ca=pki["ca"]) as srv:
        srv.tokens = tokens  # type: ignore[attr-defined]
        yield srv


def tls_channel(server, pki, token: str | None = None) -> grpc.Channel:
    return channel(server.address, token=token or "", tls_ca=pki["ca"])


def infer(ch: grpc.Channel) -> pb.CompositeBatchResponse:
    return pb_grpc.MonolithicServiceStub(ch).InferBatchComposite(pb.CompositeBatchRequest(
        model_id="demo", batch_size=1, raw_audio=speech_like_audio(0.64).tobytes()), timeout=60)


def code_of(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_grpc_needs_tls_and_a_token_except_health_checks(server, pki) -> None:
    """Plaintext is refused; over TLS every RPC needs a valid bearer token
    (UNAUTHENTICATED otherwise) except grpc.health.v1; with one, requests succeed."""
    with channel(server.address, token="", tls_ca="") as plain:
        assert code_of(lambda: pb_grpc.MonolithicServiceStub(plain).ListModels(
            pb.ListModelsRequest(), timeout=5)) == grpc.StatusCode.UNAVAILABLE
    with tls_channel(server, pki) as anonymous:
        stub = pb_grpc.MonolithicServiceStub(anonymous)
        for call in (lambda: infer(anonymous),
                     lambda: stub.LoadModel(pb.LoadModelRequest(model_id="demo"), timeout=10),
                     lambda: stub.UnloadModel(pb.UnloadModelRequest(model_id="demo"), timeout=10),
                     lambda: stub.Health(pb.HealthRequest(), timeout=10)):
            assert code_of(call) == grpc.StatusCode.UNAUTHENTICATED
        checked = health_pb2_grpc.HealthStub(anonymous).Check(health_pb2.HealthCheckRequest(),
                                                              timeout=10)
        assert checked.status == health_pb2.HealthCheckResponse.SERVING
    with tls_channel(server, pki, token="wrong") as wrong:
        assert code_of(lambda: infer(wrong)) == grpc.StatusCode.UNAUTHENTICATED
    with tls_channel(server, pki, token=TOKEN) as good:
        assert infer(good).success


def test_websocket_needs_wss_and_a_token(server, pki) -> None:
    """wss only; 401 without a token; a token in the Authorization header or ?token= (for
    browsers) opens the session."""
    context = ssl.create_default_context(cafile=str(pki["ca"]))
    base = f"wss://127.0.0.1:{server.ws_port}/audio"

    async def status(url: str, **kwargs) -> int | str:
        try:
            async with connect(url, ssl=context, **kwargs) as ws:
                return json.loads(await ws.recv())["type"]
        except InvalidStatus as exc:
            return exc.response.status_code

    async def run() -> list[int | str]:
        plain_refused = False
        try:
            async with connect(f"ws://127.0.0.1:{server.ws_port}/audio", open_timeout=5):
                pass
        except (OSError, InvalidStatus, ConnectionClosed, TimeoutError, Exception):
            plain_refused = True
        return [plain_refused, await status(base),
                await status(base, additional_headers={"Authorization": "Bearer nope"}),
                await status(base, additional_headers={"Authorization": f"Bearer {TOKEN}"}),
                await status(f"{base}?token={TOKEN}")]

    assert asyncio.run(run()) == [True, 401, 401, "ready", "ready"]


def test_tokens_are_reloaded_on_sighup(server, pki) -> None:
    """SIGHUP to `lipsync serve`: the tokens file is read again, the old token stops
    working and the new one works, without a restart."""
    server.tokens.write_text(f"{NEW_TOKEN}\n")
    try:
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        with tls_channel(server, pki, token=NEW_TOKEN) as new:
            while code_of(lambda: infer(new)) != grpc.StatusCode.OK:
                assert time.monotonic() < deadline, "the new token was not accepted"
                time.sleep(0.1)
        with tls_channel(server, pki, token=TOKEN) as old:
            assert code_of(lambda: infer(old)) == grpc.StatusCode.UNAUTHENTICATED
        assert server.proc.poll() is None  # a reload, not a stop
    finally:
        server.tokens.write_text(f"{TOKEN}\n")
        server.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)


def _reload(server, content: str) -> None:
    """Write the tokens file, SIGHUP the server, and give the frontend a moment to read it."""
    server.tokens.write_text(content)
    server.proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)


class FedStream:
    """A StreamAudio call fed 0.2 s of speech every 0.2 s from a thread; counts its frames
    and keeps the status it ended with."""

    def __init__(self, ch: grpc.Channel) -> None:
        import threading

        self.frames, self.code, self.details = 0, None, ""
        self.stop = threading.Event()
        chunk = (speech_like_audio(0.2) * 32767).astype("<i2").tobytes()

        def requests():
            yield pb.StreamAudioRequest(config=pb.StreamConfig(model_id="demo"))
            while not self.stop.wait(0.2):
                yield pb.StreamAudioRequest(audio=chunk)

        self.call = pb_grpc.MonolithicServiceStub(ch).StreamAudio(requests(), timeout=60)
        self.reader = threading.Thread(target=self._read)
        self.reader.start()

    def _read(self) -> None:
        try:
            for response in self.call:
                self.frames += response.WhichOneof("message") == "frame"
        except grpc.RpcError as exc:
            self.code, self.details = exc.code(), exc.details()

    def wait_frames(self, more_than: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while self.frames <= more_than:
            assert time.monotonic() < deadline and self.code is None, (self.code, self.details)
            time.sleep(0.05)

    def close(self) -> None:
        self.stop.set()
        self.call.cancel()
        self.reader.join(10)


def test_revoking_a_token_ends_the_sessions_opened_with_it(server, pki) -> None:
    """Two StreamAudio sessions, each with its own token: a reload without the first token
    ends its session at once with UNAUTHENTICATED (a call in flight, not just new ones); the
    other session keeps streaming frames."""
    _reload(server, f"{TOKEN}\n{NEW_TOKEN}\n")
    try:
        with tls_channel(server, pki, token=TOKEN) as old, \
                tls_channel(server, pki, token=NEW_TOKEN) as new:
            revoked, kept = FedStream(old), FedStream(new)
            try:
                revoked.wait_frames(0)
                kept.wait_frames(0)
                server.tokens.write_text(f"{NEW_TOKEN}\n")
                sighup = time.monotonic()
                server.proc.send_signal(signal.SIGHUP)
                revoked.reader.join(10)
                ended_after = time.monotonic() - sighup
                assert revoked.code == grpc.StatusCode.UNAUTHENTICATED, revoked.details
                assert "revoked" in revoked.details and ended_after < 2.0
                frames = kept.frames
                kept.wait_frames(frames + 5)  # the other session goes on
            finally:
                revoked.close()
                kept.close()
    finally:
        _reload(server, f"{TOKEN}\n")


def test_revoking_a_token_ends_its_websocket_sessions_too(server, pki) -> None:
    """A live WebSocket session admitted with a token is closed 1008 "token revoked" within
    2 s of a reload that drops the token; one admitted with another token goes on."""
    context = ssl.create_default_context(cafile=str(pki["ca"]))
    base = f"wss://127.0.0.1:{server.ws_port}/audio?mode=live&token="
    _reload(server, f"{TOKEN}\n{NEW_TOKEN}\n")

    async def run() -> tuple[int | None, str | None, float, int]:
        async with connect(base + TOKEN, ssl=context) as old, \
                connect(base + NEW_TOKEN, ssl=context) as new:
            for ws in (old, new):
                assert json.loads(await ws.recv())["type"] == "ready"

            async def keep_alive() -> None:  # idle_timeout_s is 1.5 s here
                while True:
                    for ws in (old, new):
                        with contextlib.suppress(ConnectionClosed):
                            await ws.send(json.dumps({"type": "ping"}))
                    await asyncio.sleep(0.3)

            pinger = asyncio.create_task(keep_alive())
            server.tokens.write_text(f"{NEW_TOKEN}\n")
            sighup = time.monotonic()
            server.proc.send_signal(signal.SIGHUP)
            with pytest.raises(ConnectionClosed):
                while True:
                    await asyncio.wait_for(old.recv(), 5)
            ended_after = time.monotonic() - sighup
            frames = 0
            while frames < 10:  # the other session's video goes on
                frames += isinstance(await asyncio.wait_for(new.recv(), 5), bytes)
            pinger.cancel()
            return old.close_code, old.close_reason, ended_after, frames

    try:
        code, reason, ended_after, frames = asyncio.run(run())
    finally:
        _reload(server, f"{TOKEN}\n")
    assert (code, reason) == (1008, "token revoked") and ended_after < 2.0, (code, reason)
    assert frames == 10


def test_an_empty_tokens_file_keeps_the_tokens(server, pki) -> None:
    """A reload of an empty tokens file (caught mid-write) keeps the tokens valid, and the
    log says why."""
    try:
        _reload(server, "")
        with tls_channel(server, pki, token=TOKEN) as ch:
            assert infer(ch).success
        assert "holds no token (caught mid-write?)" in server.log_path.read_text()
    finally:
        _reload(server, f"{TOKEN}\n")


def test_unauthenticated_calls_are_refused_before_their_message_is_read(server, pki) -> None:
    """Bursts of unauthenticated 95 MiB calls are refused UNAUTHENTICATED from the metadata
    alone: the frontend's private memory stays within 150 MB of where it was (it grew by
    gigabytes when each message was received and parsed first)."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.conftest import ops_stats

    size = 95 * 2**20
    message = b"\x12" + bytes([0x80 | (size & 0x7F), 0x80 | (size >> 7 & 0x7F),
                               0x80 | (size >> 14 & 0x7F), size >> 21]) + bytes(size)

    def private_mb() -> float:
        return ops_stats(server.config)["frontend"]["private_bytes"] / 2**20

    def send(_: int) -> grpc.StatusCode:
        with tls_channel(server, pki) as ch:
            call = ch.unary_unary("/monolithic.MonolithicService/InferBatchComposite",
                                  request_serializer=None, response_deserializer=None)
            return code_of(lambda: call(message, timeout=60))

    baseline, after = private_mb(), []
    for _ in range(2):
        with ThreadPoolExecutor(4) as pool:
            assert set(pool.map(send, range(4))) == {grpc.StatusCode.UNAUTHENTICATED}
        after.append(private_mb())
    print(f"UNAUTHENTICATED 4 x 95 MiB bursts, frontend private MB: baseline {baseline:.0f}, "
          f"after each {[round(a) for a in after]}")
    assert max(after) < baseline + 150, (baseline, after)


def test_render_takes_token_and_tls_ca(server, pki, tmp_path: Path) -> None:
    """`lipsync render --token --tls-ca` renders through the secured server."""
    wav, out = tmp_path / "a.wav", tmp_path / "a.mp4"
    sf.write(wav, speech_like_audio(0.8), 16000)
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "render", "--wav", str(wav),
                             "--out", str(out), "--address", server.address, "--token", TOKEN,
                             "--tls-ca", str(pki["ca"]), "--quiet"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert out.stat().st_size > 0


def test_idle_sessions_close_and_one_address_cannot_lock_others_out(server, pki) -> None:
    """A session that sends nothing for idle_timeout_s is closed (1000 "idle"); a third
    session from one address is refused (503) while another address still connects."""
    context = ssl.create_default_context(cafile=str(pki["ca"]))
    url = f"wss://127.0.0.1:{server.ws_port}/audio?token={TOKEN}"

    async def from_address(source: str):
        sock = socket.create_connection(("127.0.0.1", server.ws_port),
                                        source_address=(source, 0))
        return await connect(url, ssl=context, sock=sock, server_hostname="127.0.0.1")

    async def run() -> tuple[int, int | None, str | None, str]:
        first, second = await from_address("127.0.0.1"), await from_address("127.0.0.1")
        for ws in (first, second):
            await ws.recv()
        with pytest.raises(InvalidStatus) as third:
            await from_address("127.0.0.1")
        other = await from_address("127.0.0.2")
        kind = json.loads(await other.recv())["type"]
        await other.close()
        t0 = time.monotonic()
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await first.recv()
        assert 1.0 < time.monotonic() - t0 < 5
        await second.close()
        return (third.value.response.status_code, closed.value.rcvd.code,
                closed.value.rcvd.reason, kind)

    assert asyncio.run(run()) == (503, 1000, "idle", "ready")


def test_mutual_tls_refuses_clients_without_a_certificate(tmp_path: Path,
                                                          small_models_root: Path, pki) -> None:
    """server.tls.client_ca_file: a client without a certificate the CA signed is refused;
    one with it is served."""
    config = write_config(tmp_path / "config.yaml", small_models_root, **{
        "server.tls": {"cert_file": str(pki["server"]), "key_file": str(pki["server_key"]),
                       "client_ca_file": str(pki["ca"])},
        "compositor.pool_size": 1})
    ca = pki["ca"].read_bytes()
    with_cert = grpc.ssl_channel_credentials(ca, pki["client_key"].read_bytes(),
                                             pki["client"].read_bytes())
    with ServerProcess(config, log_path=tmp_path / "server.log", tls_ca=pki["ca"],
                       client_cert=(pki["client"], pki["client_key"])) as srv:
        with grpc.secure_channel(srv.address, grpc.ssl_channel_credentials(ca)) as without:
            assert code_of(lambda: infer(without)) == grpc.StatusCode.UNAVAILABLE
        with grpc.secure_channel(srv.address, with_cert) as ch:
            assert infer(ch).success
