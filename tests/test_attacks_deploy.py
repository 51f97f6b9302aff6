"""Issue 22, items 1-3: a stranger on the network, a SuperNode machine and another local account
each try what the deployment must not allow.

1. A stranger holding only the public CA certificate dials the address SuperNodes use, to
   register a key of their own, list runs or submit a run (code every SuperNode would execute).
   A local process without the secret asks the SuperLink's Runtime API for the ServerApp's task.
2. A SuperNode's credentials are checked for the SuperLink's TLS key.
3. Private keys are written while another account watches for a readable moment.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import stat
import subprocess
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.error import ApiErrorCode, FlowerError
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
from flwr.supercore.runtime import RuntimeHttpClient
from starlette.testclient import TestClient

from fl_app.deploy import credentials
from fl_app.deploy.credentials import make_supernode_keys, make_tls
from fl_app.deploy.federation import CONNECTION, LocalFederation
from fl_app.deploy.fleet_gateway import create_app, parse_args
from fl_app.deploy.processes import alive
from fl_app.deploy.runner import PROJECT_ROOT, flwr_env, toml_run_config

FAST = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1", "OMP_NUM_THREADS": "1"}
PRIVATE_FILES = ["ca.key", "server.key", "supernode-0.key", "supernode-1.key",
                 "supernode-0-runtime.key", "supernode-1-runtime.key",
                 "superexec.secret", "superlink-superexec.secret"]


# -- 3. private keys: 0600 from the moment they exist ------------------------------------------

@pytest.fixture
def permissive_umask_and_no_chmod(monkeypatch):
    """A umask of 0 and every chmod a no-op: a file is private only if created private."""
    for name in ("chmod", "fchmod", "lchmod"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, lambda *args, **kwargs: None)
    old = os.umask(0)
    yield
    os.umask(old)


def _modes(paths) -> dict[str, int]:
    return {path.name: stat.S_IMODE(path.stat().st_mode) for path in paths}


def test_private_keys_and_secrets_are_created_0600_not_chmod_ed_after(
        tmp_path, permissive_umask_and_no_chmod):
    fed = LocalFederation(tmp_path, num_supernodes=2)
    fed.write_credentials()
    modes = _modes([*fed.creds.glob("*.key"), *fed.creds.glob("*.secret")])
    assert modes == dict.fromkeys(modes, 0o600)
    assert sorted(modes) == sorted(PRIVATE_FILES)


def test_the_credentials_tool_creates_its_private_keys_0600(tmp_path,
                                                             permissive_umask_and_no_chmod):
    credentials.main([str(tmp_path / "creds"), "--supernodes", "2"])
    modes = _modes((tmp_path / "creds").glob("*.key"))
    assert modes == dict.fromkeys(modes, 0o600)
    assert len(modes) == 6  # ca, server, 2 authentication keys, 2 Runtime API keys
    assert stat.S_IMODE((tmp_path / "creds").stat().st_mode) == 0o700


def test_a_reader_who_opened_an_old_readable_key_file_never_sees_the_new_key(tmp_path):
    """Rewriting a key in place (write, then chmod) hands the new key to whoever opened the
    old world-readable file; a new file created 0600 and renamed over it does not."""
    old = tmp_path / "server.key"
    old.write_bytes(b"old key")
    old.chmod(0o644)
    with old.open("rb") as reader:  # another account, while the file was readable
        make_tls(tmp_path, ["127.0.0.1"])
        assert reader.read() == b"old key"
    assert b"PRIVATE KEY" in old.read_bytes()
    assert stat.S_IMODE(old.stat().st_mode) == 0o600


# -- 2. a certificate of its own for each SuperNode -------------------------------------------

def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _assert_issued_by_ca_for(cert: x509.Certificate, ca: x509.Certificate, host: str) -> None:
    cert.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert host in [str(n) for n in names.get_values_for_type(x509.IPAddress)]


def _public(cert_or_key_file: Path) -> bytes:
    data = cert_or_key_file.read_bytes()
    key = (x509.load_pem_x509_certificate(data).public_key() if b"CERTIFICATE" in data
           else serialization.load_pem_private_key(data, password=None).public_key())
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def test_each_supernode_gets_its_own_runtime_certificate_and_never_the_superlinks_key(tmp_path):
    fed = LocalFederation(tmp_path, num_supernodes=3)
    fed.write_credentials()
    ca = _cert(fed.creds / "ca.crt")
    used = []
    for i in range(3):
        cmd = fed.supernode_cmd(i)
        assert not any("server.key" in arg or "server.pem" in arg for arg in cmd), cmd
        certfile = Path(cmd[cmd.index("--ssl-certfile") + 1])
        keyfile = Path(cmd[cmd.index("--ssl-keyfile") + 1])
        _assert_issued_by_ca_for(_cert(certfile), ca, "127.0.0.1")
        assert _public(keyfile) == _public(certfile)  # the key is the certificate's
        used.append(_public(certfile))
    assert len({*used, _public(fed.creds / "server.pem")}) == 4  # all different


def test_the_credentials_tool_issues_runtime_certificates_for_the_named_hosts(tmp_path):
    out = tmp_path / "creds"
    credentials.main([str(out), "--hosts", "10.0.0.5", "--supernodes", "2",
                      "--supernode-hosts", "10.0.0.7"])
    ca = _cert(out / "ca.crt")
    for i in range(2):
        _assert_issued_by_ca_for(_cert(out / f"supernode-{i}-runtime.pem"), ca, "10.0.0.7")
    # The SuperLink's certificate also names loopback, where its private API listens.
    _assert_issued_by_ca_for(_cert(out / "server.pem"), ca, "10.0.0.5")
    _assert_issued_by_ca_for(_cert(out / "server.pem"), ca, "127.0.0.1")


# -- 1. the fleet gateway, in-process: what passes and what never reaches the SuperLink -------

class FakeSuperLink:
    """Records what reaches it; answers like the SuperLink's Fleet API."""

    def __init__(self, status: int = 200, fail: bool = False) -> None:
        self.requests: list[httpx.Request] = []
        self.status, self.fail = status, fail

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.fail:
            raise httpx.ConnectError("connection refused", request=request)
        self.requests.append(request)
        return httpx.Response(self.status, content=b"\x08\x07reply",
                              headers={"content-type": "application/protobuf",
                                       "flwr-version": "1.42.0"})


def _gateway(superlink: FakeSuperLink) -> TestClient:
    return TestClient(create_app("link.invalid:9093", None, httpx.MockTransport(superlink)))


def test_gateway_passes_a_fleet_call_with_its_node_signature_unchanged():
    superlink = FakeSuperLink()
    headers = {"content-type": "application/protobuf", "flwr-public-key": "cGs=",
               "flwr-signature": "c2ln", "flwr-timestamp": "2026-12-03T10:00:00+00:00"}
    with _gateway(superlink) as gateway:
        reply = gateway.post("/v1/fleet/pull-messages?x=1", content=b"\x0a\x02hi",
                             headers=headers)
    assert reply.status_code == 200 and reply.content == b"\x08\x07reply"
    assert reply.headers["content-type"] == "application/protobuf"
    assert reply.headers["flwr-version"] == "1.42.0"
    [seen] = superlink.requests
    assert (seen.method, str(seen.url)) == ("POST", "http://link.invalid:9093/v1/fleet/pull-messages")
    assert seen.content == b"\x0a\x02hi"
    assert {k: seen.headers[k] for k in headers} == headers


def test_gateway_relays_the_superlinks_refusal_of_a_node():
    superlink = FakeSuperLink(status=401)
    with _gateway(superlink) as gateway:
        reply = gateway.post("/v1/fleet/activate-node", content=b"")
    assert reply.status_code == 401 and len(superlink.requests) == 1


@pytest.mark.parametrize("method, path", [
    ("POST", "/v1/control/register-node"),
    ("POST", "/v1/control/start-run"),
    ("POST", "/v1/control/list-runs"),
    ("POST", "/v1/runtime/acquire-task"),
    ("POST", "/v1/runtime/pull-messages"),
    ("POST", "/v1/runtime/responses"),
    ("POST", "/v1/fleet/%2e%2e/control/list-runs"),
    ("POST", "/v1/fleet/pull-messages/../../control/start-run"),
    ("POST", "/v1/fleetx/pull-messages"),
    ("GET", "/v1/fleet/pull-messages"),
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
])
def test_gateway_answers_any_other_api_itself_and_never_reaches_the_superlink(method, path):
    superlink = FakeSuperLink()
    with _gateway(superlink) as gateway:
        reply = gateway.request(method, path, content=b"x")
    assert reply.status_code == 404
    assert "Fleet API only" in reply.json()["detail"]
    assert superlink.requests == []


@pytest.mark.parametrize("declare_length", [True, False])
def test_gateway_refuses_a_body_over_its_limit_without_reading_it_all(declare_length):
    superlink = FakeSuperLink()
    oversized = b"\0" * (2**20 + 1)
    gateway = TestClient(create_app("link.invalid:9093", None, httpx.MockTransport(superlink),
                                    max_body_mb=1))
    # A generator body has no Content-Length: the limit must hold while streaming too.
    content = oversized if declare_length else (oversized[i:i + 4096]
                                                for i in range(0, len(oversized), 4096))
    with gateway:
        reply = gateway.post("/v1/fleet/push-messages", content=content)
        within = gateway.post("/v1/fleet/push-messages", content=oversized[:2**20])
    assert reply.status_code == 413 and "--max-body-mb" in reply.json()["detail"]
    assert within.status_code == 200
    assert [len(r.content) for r in superlink.requests] == [2**20]


def test_gateway_answers_502_when_the_superlink_is_down_so_supernodes_retry():
    with _gateway(FakeSuperLink(fail=True)) as gateway:
        reply = gateway.post("/v1/fleet/pull-messages", content=b"")
    assert reply.status_code == 502
    assert "did not answer" in reply.json()["detail"]


@pytest.mark.parametrize("argv, complaint", [
    (["--listen", "0.0.0.0:9092", "--superlink", "127.0.0.1:9093"], "or --insecure"),
    (["--listen", "0.0.0.0:9092", "--superlink", "127.0.0.1:9093", "--insecure",
      "--ssl-ca-certfile", __file__], "or --insecure"),
    (["--listen", "9092", "--superlink", "127.0.0.1:9093", "--insecure"], "is not host:port"),
    (["--listen", "0.0.0.0:9092", "--superlink", "127.0.0.1:9093",
      "--ssl-certfile", "/nonexistent.pem"], "/nonexistent.pem is not a file"),
])
def test_gateway_bad_arguments_get_one_clear_error(argv, complaint, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert complaint in capsys.readouterr().err


# -- 1. over loopback, against a real federation ----------------------------------------------

@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    fed = LocalFederation(tmp_path_factory.mktemp("attacked-federation"), num_supernodes=2,
                          env=FAST)
    fed.start()
    pids = [p.pid for p in fed.procs.values()]
    yield fed
    fed.stop()
    assert not any(alive(pid) for pid in pids)


def _supernode_address(fed: LocalFederation) -> str:
    """The address the running SuperNodes dial (their --superlink)."""
    args = fed.procs["supernode-0"].args
    return args[args.index("--superlink") + 1]


@pytest.fixture
def stranger(federation, tmp_path) -> dict[str, str]:
    """A fresh FLWR_HOME holding only the CA certificate, pointed at the SuperNodes' address."""
    home = tmp_path / "stranger-home"
    home.mkdir()
    shutil.copy(federation.creds / "ca.crt", home / "ca.crt")
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "target"\n\n[superlink.target]\n'
        f'address = "{_supernode_address(federation)}"\n'
        f'root-certificates = "{home / "ca.crt"}"\n')
    return flwr_env({"FLWR_HOME": str(home)})


def _flwr(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["flwr", *args], env=env, capture_output=True, text=True, timeout=120)


def _operator_sees(fed: LocalFederation, what: str) -> set[str]:
    """The ids of the nodes or runs the operator lists on the SuperLink's private address."""
    args, key = (["supernode", "list"], "node-id") if what == "nodes" else (["ls"], "run-id")
    result = _flwr([*args, CONNECTION, "--format", "json"], fed.env)
    listing = json.loads(result.stdout)
    assert listing["success"], result.stdout
    return {entry[key] for entry in listing[what]}


@pytest.mark.e2e
def test_a_stranger_cannot_register_a_node_through_the_supernodes_address(
        federation, stranger, tmp_path):
    nodes_before = _operator_sees(federation, "nodes")
    _, public = make_supernode_keys(tmp_path, 1, start=66)[0]
    result = _flwr(["supernode", "register", str(public), "target"], stranger)
    assert result.returncode != 0, result.stdout
    assert "Fleet API only" in result.stdout + result.stderr
    assert _operator_sees(federation, "nodes") == nodes_before


@pytest.mark.e2e
def test_a_stranger_cannot_list_or_submit_runs_through_the_supernodes_address(
        federation, stranger):
    runs_before = _operator_sees(federation, "runs")
    for args in (["ls", "target"], ["run", str(PROJECT_ROOT), "target"]):
        result = _flwr([*args, "--format", "json"], stranger)
        reply = json.loads(result.stdout)
        assert reply["success"] is False and "Fleet API only" in reply["error-message"], reply
    assert _operator_sees(federation, "runs") == runs_before


@pytest.mark.e2e
def test_the_superlinks_runtime_api_refuses_a_superexec_without_the_secret(federation):
    """Without the secret, a process that reaches the SuperLink's private port cannot take the
    ServerApp's task (and with it every client's reply)."""
    client = RuntimeHttpClient.from_server_address(
        server_address=federation.address, insecure=False,
        root_certificates=(federation.creds / "ca.crt").read_bytes(),
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")])
    with pytest.raises(httpx.HTTPStatusError) as refusal:
        client.AcquireTask(AcquireTaskRequest(
            supported_task_types=[TaskType.SERVER_APP.value]))
    error = FlowerError.from_json(refusal.value.response.text)
    assert error is not None and error.code == ApiErrorCode.RUNTIME_AUTHENTICATION_FAILED


@pytest.mark.e2e
def test_the_supernodes_address_speaks_only_tls_with_the_superlinks_certificate(federation):
    address = _supernode_address(federation)
    with pytest.raises(httpx.HTTPError):  # a plaintext client gets no answer
        httpx.get(f"http://{address}/health", timeout=5)
    context = ssl.create_default_context(cafile=str(federation.creds / "ca.crt"))
    assert httpx.get(f"https://{address}/health", verify=context, timeout=5).is_success


@pytest.mark.e2e
def test_only_the_superlink_and_its_gateway_are_given_the_superlinks_tls_key(federation):
    holders = sorted(name for name, proc in federation.procs.items()
                     if str(federation.creds / "server.key") in proc.args)
    assert holders == ["fleet-gateway", "superlink"]
    assert _supernode_address(federation) != federation.address


@pytest.mark.e2e
def test_the_federation_still_completes_a_run_with_supernodes_behind_the_gateway(
        federation, tmp_path):
    out = tmp_path / "out"
    config = toml_run_config({"dataset": "digits",
                              "overrides": f"num_rounds=1 lr=0.1 output_dir={out}"},
                             tmp_path / "run.toml")
    result = federation.run(config, timeout=600)
    assert result.status == "finished:completed", result.log[-3000:]
    [row] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert row["sampled"] == 2 and not row["lost_nodes"]
