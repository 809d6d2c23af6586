"""TLS and mTLS on the gRPC port, with certificates made here by trustme.

Every server listens on 127.0.0.1. The non-loopback rules are tested on the
flags alone (``listen_refusal``) and on ``main`` with every way to a socket
made to fail the test: nothing here binds or connects anywhere else.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import os
import signal
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import longbatch.server.main as server_main
from longbatch.client import Client, NotFound, TlsOptions, Unauthenticated, Unavailable
from longbatch.server.app import Running, start_server
from longbatch.server.config import ApiKey, ConfigError, ServerConfig, TlsClient, config_from_dict
from longbatch.server.tls import CertificateReloader, TlsError, TlsFiles
from longbatch.v1 import content_pb2

from support import ServerProcess, cli, run_process


def prompt(text: str) -> content_pb2.GenerateContentRequest:
    return content_pb2.GenerateContentRequest(contents=[content_pb2.Content(parts=[content_pb2.Part(text=text)])])


@dataclass
class Pki:
    """A server CA with a server certificate for 127.0.0.1, and a client CA."""

    dir: Path
    ca: trustme.CA
    client_ca: trustme.CA
    ca_pem: Path
    client_ca_pem: Path
    cert: Path
    key: Path

    def files(self, *, mtls: bool = False) -> TlsFiles:
        return TlsFiles(self.cert, self.key, self.client_ca_pem if mtls else None)

    def client(self, name: str, *identities: str, ca: trustme.CA | None = None) -> tuple[Path, Path]:
        """A client certificate with common name ``name`` (and SANs), signed by the client CA."""
        # cryptography 51 refuses a certificate with an empty SAN list, which
        # trustme makes when given no identities: one that matches nothing.
        leaf = (ca or self.client_ca).issue_cert(*(identities or (f"{name}.clients.invalid",)), common_name=name)
        cert, key = self.dir / f"{name}.pem", self.dir / f"{name}.key"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        return cert, key


def write_leaf(leaf: trustme.LeafCert, cert: Path, key: Path) -> None:
    """Replace both files, each by a rename, as a rotation would."""
    for blob, path in ((leaf.private_key_pem, key), (leaf.cert_chain_pems[0], cert)):
        tmp = path.with_name(path.name + ".new")
        blob.write_to_path(str(tmp))
        os.replace(tmp, path)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca, client_ca = trustme.CA(), trustme.CA()
    d = tmp_path / "pki"
    d.mkdir()
    p = Pki(d, ca, client_ca, d / "ca.pem", d / "client-ca.pem", d / "server.pem", d / "server.key")
    ca.cert_pem.write_to_path(str(p.ca_pem))
    client_ca.cert_pem.write_to_path(str(p.client_ca_pem))
    write_leaf(ca.issue_cert("127.0.0.1", "localhost"), p.cert, p.key)
    return p


Serve = Callable[..., Awaitable[tuple[str, Running, CertificateReloader]]]


@pytest.fixture
async def serve_tls(tmp_path: Path, pki: Pki) -> AsyncIterator[Serve]:
    """Start in-process servers with TLS on 127.0.0.1:0; all stop at the end."""
    started: list[Running] = []

    async def start(config: ServerConfig | None = None, *, mtls: bool = False) -> tuple[str, Running,
                                                                                       CertificateReloader]:
        reloader = CertificateReloader(pki.files(mtls=mtls))
        running = await start_server(config or ServerConfig(), tmp_path / f"data{len(started)}", "127.0.0.1", 0,
                                     tls=reloader, http_port=0)
        started.append(running)
        return f"127.0.0.1:{running.port}", running, reloader

    yield start
    for running in reversed(started):
        await running.stop(grace_s=1.0)


async def served_certificate(target: str, ca: Path) -> bytes:
    """The DER certificate the server presents to a new TLS connection."""
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])
    host, port = target.rsplit(":", 1)

    def handshake() -> bytes:
        # Closed without a TLS shutdown: gRPC answers none, asyncio would wait for it.
        with socket.create_connection((host, int(port)), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der

    return await asyncio.to_thread(handshake)


def der_of(pem: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.read_text())


# -- TLS round trips --------------------------------------------------------------


async def test_a_batch_round_trip_over_tls(serve_tls: Serve, pki: Pki) -> None:
    target, _, _ = await serve_tls()
    async with Client(target, tls=TlsOptions(ca=pki.ca_pem), timeout=20) as client:
        op = await client.create_generate_batch("models/echo", [prompt("over tls")])
        output = await op.result(timeout=30)
    assert output.inlined_responses.inlined_responses[0].response.candidates[0].content.parts[0].text == "over tls"


async def test_the_cli_over_tls_with_flags_and_with_the_environment(serve_tls: Serve, pki: Pki) -> None:
    target, _, _ = await serve_tls()
    code, out, err = await cli("--target", target, "--ca", str(pki.ca_pem), "submit", "--prompt", "hi", "--wait")
    assert code == 0, err
    assert out.startswith("[0] hi\n"), out
    code, out, err = await cli("models", env={"LONGBATCH_TARGET": target, "LONGBATCH_CA": str(pki.ca_pem)})
    assert code == 0, err
    assert "models/echo" in out
    # Plaintext to the TLS port: refused, with a hint at --tls.
    code, _, err = await cli("--target", target, "models")
    assert code == 1
    assert "UNAVAILABLE" in err and "--tls" in err, err
    # A CA file that is not PEM: one line before any connection.
    code, _, err = await cli("--target", target, "--ca", str(pki.key), "models")
    assert code == 1 and err.count("\n") == 1 and "no valid PEM certificate" in err, err
    code, _, err = await cli("--target", target, "--cert", str(pki.cert), "models")
    assert code == 2 and "--cert and --key go together" in err, err


async def test_the_cli_against_a_real_serve_over_mtls_and_sighup(tmp_path: Path, pki: Pki) -> None:
    """``longbatch serve --tls-*`` end to end: flags wired, mTLS enforced,
    the certificate rotated and SIGHUP handled without a restart."""
    config = tmp_path / "longbatch.toml"
    config.write_text('[[tls_clients]]\nsubject_cn = "svc-a"\ntenant = "alice"\n')
    server = ServerProcess(tmp_path / "data", config, extra=[
        "--tls-cert", str(pki.cert), "--tls-key", str(pki.key), "--tls-client-ca", str(pki.client_ca_pem)])
    cert, key = pki.client("svc-a")
    try:
        target = await server.start()
        creds = ["--target", target, "--ca", str(pki.ca_pem), "--cert", str(cert), "--key", str(key)]
        code, out, err = await cli(*creds, "submit", "--prompt", "mutual", "--wait")
        assert code == 0, err
        assert out.startswith("[0] mutual\n")
        code, _, err = await cli("--target", target, "--ca", str(pki.ca_pem), "models")
        assert code == 1 and "UNAVAILABLE" in err, err  # no client certificate: no handshake
        write_leaf(pki.ca.issue_cert("127.0.0.1", common_name="rotated"), pki.cert, pki.key)
        assert server.proc is not None
        server.proc.send_signal(signal.SIGHUP)
        assert await served_certificate(target, pki.ca_pem) == der_of(pki.cert)
        code, out, err = await cli(*creds, "list")
        assert code == 0 and "SUCCEEDED" in out, err
        assert server.proc.returncode is None
        assert await server.terminate() == 0
    finally:
        await server.ensure_dead()


async def test_the_rest_api_over_mtls_maps_certificates_to_tenants(serve_tls: Serve, pki: Pki) -> None:
    """The HTTP port speaks TLS with the same certificate, requires the client
    CA's certificates under mTLS, and maps them to tenants as gRPC does."""
    config = ServerConfig(tls_clients=(TlsClient(tenant="alice", subject_cn="svc-a"),
                                       TlsClient(tenant="bob", subject_cn="svc-b")))
    _, running, _ = await serve_tls(config, mtls=True)
    base = f"https://localhost:{running.http_port}"

    def context(name: str | None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(pki.ca_pem))
        if name is not None:
            cert, key = pki.client(name)
            ctx.load_cert_chain(str(cert), str(key))
        return ctx

    body = {"batch": {"inputConfig": {"requests": {"requests": [
        {"request": {"contents": [{"parts": [{"text": "over https"}]}]}}]}}}}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}/v1beta/models/echo:batchGenerateContent", json=body,
                             ssl=context("svc-a")) as r:
            assert r.status == 200, await r.text()
            name = (await r.json())["name"]
        async with http.get(f"{base}/v1beta/{name}", ssl=context("svc-a")) as r:
            assert r.status == 200
        async with http.get(f"{base}/v1beta/{name}", ssl=context("svc-b")) as r:
            assert r.status == 404
        async with http.get(f"{base}/v1beta/batches", ssl=context("svc-b")) as r:
            assert await r.json() == {"operations": []}
        async with http.get(f"{base}/v1beta/batches", ssl=context("stranger")) as r:
            assert r.status == 401  # a certificate of the CA, listed nowhere, and no key
        with pytest.raises(aiohttp.ClientError):  # no client certificate: no handshake
            async with http.get(f"{base}/healthz", ssl=context(None)):
                pass


# -- refusals at the handshake ------------------------------------------------------


async def test_a_plaintext_client_is_refused(serve_tls: Serve) -> None:
    target, _, _ = await serve_tls()
    async with Client(target, timeout=10) as client:
        with pytest.raises(Unavailable):
            await client.list_models()


async def test_a_client_trusting_another_ca_is_refused(serve_tls: Serve, tmp_path: Path) -> None:
    target, _, _ = await serve_tls()
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    async with Client(target, tls=TlsOptions(ca=other), timeout=10) as client:
        with pytest.raises(Unavailable):
            await client.list_models()


async def test_a_wrong_server_name_is_refused_and_the_right_one_accepted(serve_tls: Serve, pki: Pki) -> None:
    target, _, _ = await serve_tls()
    async with Client(target, tls=TlsOptions(ca=pki.ca_pem, server_name="elsewhere.example"), timeout=10) as client:
        with pytest.raises(Unavailable):
            await client.list_models()
    async with Client(target, tls=TlsOptions(ca=pki.ca_pem, server_name="localhost"), timeout=10) as client:
        assert await client.list_models()


async def test_mtls_refuses_a_client_without_a_certificate_or_with_a_foreign_one(serve_tls: Serve, pki: Pki) -> None:
    target, _, _ = await serve_tls(mtls=True)
    async with Client(target, tls=TlsOptions(ca=pki.ca_pem), timeout=10) as client:
        with pytest.raises(Unavailable):
            await client.list_models()
    cert, key = pki.client("stranger", ca=trustme.CA())  # signed by a CA the server does not trust
    async with Client(target, tls=TlsOptions(ca=pki.ca_pem, cert=cert, key=key), timeout=10) as client:
        with pytest.raises(Unavailable):
            await client.list_models()
    cert, key = pki.client("member")
    async with Client(target, tls=TlsOptions(ca=pki.ca_pem, cert=cert, key=key), timeout=10) as client:
        assert await client.list_models()  # no [[tls_clients]], no keys: the CA is the check, one tenant


# -- client certificates as tenants ---------------------------------------------------


async def test_client_certificates_map_to_tenants_that_cannot_see_each_other(serve_tls: Serve, pki: Pki) -> None:
    config = ServerConfig(
        api_keys=(ApiKey("key-bob", "bob"),),
        tls_clients=(TlsClient(tenant="alice", subject_cn="svc-a"), TlsClient(tenant="bob", san_dns="svc-b.internal")),
    )
    target, _, _ = await serve_tls(config, mtls=True)
    a_cert, a_key = pki.client("svc-a")
    b_cert, b_key = pki.client("anything", "svc-b.internal")
    u_cert, u_key = pki.client("unlisted")

    def options(cert: Path, key: Path) -> TlsOptions:
        return TlsOptions(ca=pki.ca_pem, cert=cert, key=key)

    async with Client(target, tls=options(a_cert, a_key), timeout=20) as alice, \
            Client(target, tls=options(b_cert, b_key), timeout=20) as bob:
        op = await alice.create_generate_batch("models/echo", [prompt("alice's")])
        await op.result(timeout=30)
        assert [o.name async for o in alice.list_operations()] == [op.name]
        assert [o.name async for o in bob.list_operations()] == []
        with pytest.raises(NotFound):
            await bob.get_operation(op.name)
        mine = await bob.create_generate_batch("models/echo", [prompt("bob's")])
        assert [o.name async for o in bob.list_operations()] == [mine.name]
        assert [o.name async for o in alice.list_operations()] == [op.name]

    # An unlisted certificate needs a key; with one it acts for the key's tenant.
    async with Client(target, tls=options(u_cert, u_key), timeout=20) as unlisted:
        with pytest.raises(Unauthenticated) as missing:
            await unlisted.list_models()
        assert missing.value.reason == "CREDENTIALS_MISSING"
    async with Client(target, api_key="key-bob", tls=options(u_cert, u_key), timeout=20) as keyed:
        assert [o.name async for o in keyed.list_operations()] == [mine.name]
    # A key for one tenant over a certificate of another: refused, not guessed.
    async with Client(target, api_key="key-bob", tls=options(a_cert, a_key), timeout=20) as both:
        with pytest.raises(Unauthenticated) as conflict:
            await both.list_models()
        assert conflict.value.reason == "CREDENTIALS_CONFLICT"
    # The same tenant both ways is fine; a bad key is bad even with a good certificate.
    async with Client(target, api_key="key-bob", tls=options(b_cert, b_key), timeout=20) as agreeing:
        assert [o.name async for o in agreeing.list_operations()] == [mine.name]
    async with Client(target, api_key="wrong", tls=options(a_cert, a_key), timeout=20) as bad_key:
        with pytest.raises(Unauthenticated) as invalid:
            await bad_key.list_models()
        assert invalid.value.reason == "API_KEY_INVALID"


def test_tls_clients_config() -> None:
    config = config_from_dict({"tls_clients": [{"subject_cn": "a", "tenant": "t"},
                                               {"san_uri": "spiffe://example.org/b", "tenant": "u"}]})
    assert config.tls_clients == (TlsClient(tenant="t", subject_cn="a"),
                                  TlsClient(tenant="u", san_uri="spiffe://example.org/b"))
    for bad, words in (
        ([{"tenant": "t"}], "exactly one of subject_cn, san_uri, san_dns"),
        ([{"subject_cn": "a", "san_dns": "b", "tenant": "t"}], "exactly one of"),
        ([{"subject_cn": "a"}], "tls_clients[0].tenant is required"),
        ([{"subject_cn": "", "tenant": "t"}], "must not be empty"),
        ([{"subject_cn": "a", "tenant": "t", "sn": 1}], "unknown key tls_clients[0].sn"),
        ([{"subject_cn": "a", "tenant": "t"}, {"subject_cn": "a", "tenant": "u"}], "listed twice"),
        ([{"subject_cn": 5, "tenant": "t"}], "expected str"),
    ):
        with pytest.raises(ConfigError, match=None) as e:
            config_from_dict({"tls_clients": bad})
        assert words in str(e.value), (bad, str(e.value))


# -- certificate reload ------------------------------------------------------------------


async def test_a_rotated_certificate_is_served_to_new_connections(
    serve_tls: Serve, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    target, _, reloader = await serve_tls()
    first = der_of(pki.cert)
    assert await served_certificate(target, pki.ca_pem) == first
    async with Client(target, tls=TlsOptions(ca=pki.ca_pem), timeout=20) as old_connection:
        await old_connection.list_models()

        write_leaf(pki.ca.issue_cert("127.0.0.1", common_name="second"), pki.cert, pki.key)
        second = der_of(pki.cert)
        assert second != first
        assert await served_certificate(target, pki.ca_pem) == second
        assert reloader.reloads == 1
        await old_connection.list_models()  # an open connection keeps working

        # Half a rotation (a new certificate, the old key): refused, the
        # current certificate kept, said once.
        caplog.set_level(logging.WARNING, "longbatch.tls")
        pki.ca.issue_cert("127.0.0.1", common_name="third").cert_chain_pems[0].write_to_path(str(pki.cert))
        assert await served_certificate(target, pki.ca_pem) == second
        assert await served_certificate(target, pki.ca_pem) == second
        refusals = [r for r in caplog.records if "not usable" in r.getMessage()]
        assert len(refusals) == 1 and "does not match" in refusals[0].getMessage()
        assert reloader.reload_now() is False  # SIGHUP says so too, and keeps it

        # The rotation completed: taken up by the next connection.
        write_leaf(pki.ca.issue_cert("127.0.0.1", common_name="fourth"), pki.cert, pki.key)
        assert await served_certificate(target, pki.ca_pem) == der_of(pki.cert)
        assert reloader.reloads == 2
    async with Client(target, tls=TlsOptions(ca=pki.ca_pem), timeout=20) as new_connection:
        assert await new_connection.list_models()


async def test_sighup_reload_takes_files_whose_stat_did_not_change(serve_tls: Serve, pki: Pki) -> None:
    target, _, reloader = await serve_tls()
    assert reloader.reload_now() is True
    assert reloader.reloads == 1
    assert await served_certificate(target, pki.ca_pem) == der_of(pki.cert)


# -- bad TLS files at start ---------------------------------------------------------------


def test_bad_tls_files_are_one_clear_error(pki: Pki, tmp_path: Path) -> None:
    other_key = tmp_path / "other.key"
    pki.ca.issue_cert("127.0.0.1").private_key_pem.write_to_path(str(other_key))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cases = [
        (TlsFiles(tmp_path / "missing.pem", pki.key), "cannot read the TLS certificate"),
        (TlsFiles(pki.cert, tmp_path / "missing.key"), "cannot read the TLS key"),
        (TlsFiles(pki.cert, other_key), "does not match the certificate"),
        (TlsFiles(garbage, pki.key), "is not valid PEM"),
        (TlsFiles(pki.cert, garbage), "is not valid PEM"),
        (TlsFiles(pki.cert, pki.key, garbage), "holds no valid PEM certificate"),
        (TlsFiles(pki.cert, pki.key, tmp_path / "missing-ca.pem"), "cannot read"),
    ]
    for files, words in cases:
        with pytest.raises(TlsError) as e:
            CertificateReloader(files)
        assert words in str(e.value) and "\n" not in str(e.value), (files, str(e.value))


async def serve_exit(*args: str) -> tuple[int, str]:
    """``longbatch serve ARGS`` expected to stop on its own: exit code and stderr."""
    code, _, err = await run_process(sys.executable, "-m", "longbatch.server.main", "--port", "0", *args, within=30)
    return code, err


async def test_serve_with_bad_tls_files_is_one_line_and_exit_2(pki: Pki, tmp_path: Path) -> None:
    other_key = tmp_path / "other.key"
    pki.ca.issue_cert("127.0.0.1").private_key_pem.write_to_path(str(other_key))
    data = tmp_path / "data"
    for args, words in (
        (["--tls-cert", str(pki.cert), "--tls-key", str(other_key)], "does not match"),
        (["--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", str(pki.key)], "cannot read"),
        (["--tls-cert", str(pki.cert)], "--tls-cert and --tls-key go together"),
        (["--tls-client-ca", str(pki.client_ca_pem)], "needs TLS"),
    ):
        code, err = await serve_exit("--data-dir", str(data), *args)
        assert code == 2, err
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err
    assert not data.exists()  # refused before the data dir was touched


# -- non-loopback binds ---------------------------------------------------------------------


def flags(*argv: str) -> argparse.Namespace:
    return server_main._parser().parse_args(list(argv))


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("LONGBATCH_"):
            monkeypatch.delenv(name)


def test_non_loopback_needs_tls_or_allow_insecure(clean_env: None, pki: Pki) -> None:
    keyed = ServerConfig(api_keys=(ApiKey("k", "t"),))
    tls = ["--tls-cert", str(pki.cert), "--tls-key", str(pki.key)]
    refusal = server_main.listen_refusal
    for host in ("0.0.0.0", "::", "10.1.2.3", "example.com"):
        why = refusal(flags("--host", host), keyed)
        assert why is not None and "plaintext" in why and "--allow-insecure" in why, why
        assert refusal(flags("--host", host, *tls), keyed) is None
        assert refusal(flags("--host", host, "--allow-insecure"), keyed) is None
        # Open (no keys): --allow-open as before, and TLS or --allow-insecure too.
        assert "--allow-open" in (refusal(flags("--host", host, *tls), ServerConfig()) or "")
        assert "plaintext" in (refusal(flags("--host", host, "--allow-open"), ServerConfig()) or "")
        assert refusal(flags("--host", host, "--allow-open", "--allow-insecure"), ServerConfig()) is None
        # mTLS is a credential: no --allow-open needed.
        assert refusal(flags("--host", host, *tls, "--tls-client-ca", str(pki.client_ca_pem)), ServerConfig()) is None
    for host in ("127.0.0.1", "::1", "localhost"):
        assert refusal(flags("--host", host), keyed) is None
        assert refusal(flags("--host", host), ServerConfig()) is None
    assert "needs mTLS" in (refusal(flags(*tls), ServerConfig(tls_clients=(TlsClient("t", subject_cn="a"),))) or "")


def test_main_refuses_a_non_loopback_host_before_any_socket(
    clean_env: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    def no(*args: object, **kwargs: object) -> None:
        raise AssertionError("a refused --host must not get this far")

    # Every step towards a listening socket fails the test if reached.
    monkeypatch.setattr(server_main, "_bind_failure", no)
    monkeypatch.setattr(server_main, "lock_data_dir", no)
    monkeypatch.setattr(server_main, "start_server", no)
    config = tmp_path / "keys.toml"
    config.write_text('[[api_keys]]\nkey = "k"\ntenant = "t"\n')
    monkeypatch.setenv("LONGBATCH_HOST", "0.0.0.0")
    assert server_main.main(["--port", "50999", "--data-dir", str(tmp_path / "d"), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: refusing to serve 0.0.0.0 in plaintext"), err
    assert not (tmp_path / "d").exists()


async def test_grpc_reports_the_peer_certificate_names_the_edge_reads(pki: Pki) -> None:
    """The auth-context properties the tenant mapping relies on, as this gRPC fills them."""
    seen: dict[str, list[bytes]] = {}
    server = grpc.aio.server()

    async def peek(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        seen.update({k: list(v) for k, v in context.auth_context().items()})
        return b""

    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "t.Peek", {"Peek": grpc.unary_unary_rpc_method_handler(peek)}),))
    port = server.add_secure_port("127.0.0.1:0", CertificateReloader(pki.files(mtls=True)).credentials())
    await server.start()
    try:
        cert, key = pki.client("svc-x", "svc-x.internal")
        channel = grpc.aio.secure_channel(f"127.0.0.1:{port}", TlsOptions(ca=pki.ca_pem, cert=cert, key=key)
                                          .credentials())
        async with channel:
            await channel.unary_unary("/t.Peek/Peek")(b"", timeout=10)
    finally:
        await server.stop(None)
    assert seen["x509_common_name"] == [b"svc-x"]
    assert seen["peer_dns"] == [b"svc-x.internal"]


def uri_certificate(d: Path, uri: str) -> tuple[Path, Path, Path]:
    """A CA and a client certificate whose only name is a URI SAN (trustme
    makes none): the CA file, the certificate and its key."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "uri test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(ca_name)
            .public_key(leaf_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_pem, cert, key = d / "uri-ca.pem", d / "uri.pem", d / "uri.key"
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return ca_pem, cert, key


async def test_a_uri_san_maps_to_its_tenant(pki: Pki, tmp_path: Path) -> None:
    client_ca, cert, key = uri_certificate(pki.dir, "spiffe://example.org/ns/b/svc")
    config = ServerConfig(tls_clients=(TlsClient(tenant="bob", san_uri="spiffe://example.org/ns/b/svc"),
                                       TlsClient(tenant="alice", san_uri="spiffe://example.org/ns/a/svc")))
    running = await start_server(config, tmp_path / "data", "127.0.0.1", 0,
                                 tls=CertificateReloader(TlsFiles(pki.cert, pki.key, client_ca)))
    try:
        target = f"127.0.0.1:{running.port}"
        async with Client(target, tls=TlsOptions(ca=pki.ca_pem, cert=cert, key=key), timeout=20) as bob:
            op = await bob.create_generate_batch("models/echo", [prompt("by uri")])
            assert [o.name async for o in bob.list_operations()] == [op.name]
        batch = await running.store.get_batch("bob", op.name.removeprefix("batches/"))
        assert batch is not None and batch.tenant == "bob"
    finally:
        await running.stop(grace_s=1.0)
