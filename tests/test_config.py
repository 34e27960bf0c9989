"""Settings from the environment (CONTRACT.md, "Configuration"), and the pika parameters built from them."""

from __future__ import annotations

import re
import socket
import ssl
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from ai_service.broker import (
    NodeRing,
    broker_name,
    connected_node,
    connection_parameters,
    describe_endpoint,
    node_parameters,
    session,
)
from ai_service.config import BrokerNode, ConfigError, Settings

REPO = Path(__file__).resolve().parents[1]
PASSWORD = "Sup3r-S3cret-pw"

CONTRACT_DEFAULTS = {
    "enable_rabbitmq": True,
    "rabbitmq_host": "localhost",
    "rabbitmq_port": 5672,
    "rabbitmq_user": "guest",
    "rabbitmq_password": "guest",
    "rabbitmq_vhost": "/",
    "rabbitmq_ssl": False,
    "rabbitmq_ca_file": None,
    "rabbitmq_cert_file": None,
    "rabbitmq_key_file": None,
    "rabbitmq_heartbeat": 60,
    "rabbitmq_queue_type": "quorum",
    "cancel_retention": 24 * 3600,
    "rabbitmq_delivery_limit": 5,
    "train_request_queue": "train_request_q",
    "train_update_queue": "train_update_q",
    "train_result_queue": "train_result_q",
    "convert_request_queue": "convert_request_q",
    "convert_update_queue": "convert_update_q",
    "convert_result_queue": "convert_result_q",
    "infer_request_queue": "infer_request_q",
    "infer_result_queue": "infer_result_q",
    "events_exchange": "ai.events",
    "control_exchange": "ai.control",
    "dead_letter_exchange": "ai.dlx",
    "storage_backend": "local",
    "storage_dir": Path("./data"),
    "s3_bucket": None,
    "work_dir": Path("./.work"),
    "device": "auto",
    "log_format": "text",
    "log_level": "INFO",
    "metrics_port": None,
    "max_message_bytes": 16 * 1024 * 1024,
}

# Every variable CONTRACT.md names, a distinct non-default value, the field and what it becomes.
CONTRACT_VARIABLES: dict[str, tuple[str, str, object]] = {
    "ENABLE_RABBITMQ": ("false", "enable_rabbitmq", False),
    "CANCEL_RETENTION": ("3600", "cancel_retention", 3600),
    "RABBITMQ_HOST": ("rabbit.example.com", "rabbitmq_host", "rabbit.example.com"),
    "RABBITMQ_PORT": ("5999", "rabbitmq_port", 5999),
    "RABBITMQ_USER": ("svc-ai", "rabbitmq_user", "svc-ai"),
    "RABBITMQ_PASSWORD": (PASSWORD, "rabbitmq_password", PASSWORD),
    "RABBITMQ_VHOST": ("ai", "rabbitmq_vhost", "ai"),
    "RABBITMQ_SSL": ("true", "rabbitmq_ssl", True),
    "RABBITMQ_CA_FILE": ("/etc/ai/ca.pem", "rabbitmq_ca_file", "/etc/ai/ca.pem"),
    "RABBITMQ_CERT_FILE": ("/etc/ai/cert.pem", "rabbitmq_cert_file", "/etc/ai/cert.pem"),
    "RABBITMQ_KEY_FILE": ("/etc/ai/key.pem", "rabbitmq_key_file", "/etc/ai/key.pem"),
    "RABBITMQ_HEARTBEAT": ("30", "rabbitmq_heartbeat", 30),
    "RABBITMQ_QUEUE_TYPE": ("classic", "rabbitmq_queue_type", "classic"),
    "RABBITMQ_DELIVERY_LIMIT": ("7", "rabbitmq_delivery_limit", 7),
    "TRAIN_REQUEST_QUEUE": ("q1", "train_request_queue", "q1"),
    "TRAIN_UPDATE_QUEUE": ("q2", "train_update_queue", "q2"),
    "TRAIN_RESULT_QUEUE": ("q3", "train_result_queue", "q3"),
    "CONVERT_REQUEST_QUEUE": ("q4", "convert_request_queue", "q4"),
    "CONVERT_UPDATE_QUEUE": ("q5", "convert_update_queue", "q5"),
    "CONVERT_RESULT_QUEUE": ("q6", "convert_result_queue", "q6"),
    "INFER_REQUEST_QUEUE": ("q7", "infer_request_queue", "q7"),
    "INFER_RESULT_QUEUE": ("q8", "infer_result_queue", "q8"),
    "EVENTS_EXCHANGE": ("x1", "events_exchange", "x1"),
    "CONTROL_EXCHANGE": ("x2", "control_exchange", "x2"),
    "DEAD_LETTER_EXCHANGE": ("x3", "dead_letter_exchange", "x3"),
    "STORAGE_BACKEND": ("s3", "storage_backend", "s3"),
    "STORAGE_DIR": ("/srv/ai/data", "storage_dir", Path("/srv/ai/data")),
    "S3_BUCKET": ("ai-bucket", "s3_bucket", "ai-bucket"),
    "WORKER_NAME": ("host-a/gpu0", "worker_name", "host-a/gpu0"),
    "WORK_DIR": ("/srv/ai/work", "work_dir", Path("/srv/ai/work")),
    "DEVICE": ("cuda:1", "device", "cuda:1"),
    "LOG_FORMAT": ("json", "log_format", "json"),
    "LOG_LEVEL": ("debug", "log_level", "DEBUG"),
    "METRICS_PORT": ("9100", "metrics_port", 9100),
    "HTTP_PORT": ("8100", "http_port", 8100),
    "HTTP_HOST": ("0.0.0.0", "http_host", "0.0.0.0"),
    "HTTP_TOKEN": ("s3cr3t-http-token", "http_token", "s3cr3t-http-token"),
    "MAX_MESSAGE_BYTES": ("1048576", "max_message_bytes", 1048576),
    "JOBS_PREFIX": ("svc/state", "jobs_prefix", "svc/state/"),
    "MAX_IMAGES_PER_REQUEST": ("32", "max_images_per_request", 32),
    "TRUST_EXTERNAL_MODELS": ("true", "trust_external_models", True),
}

#: Variables the contract names that belong to work not landed yet (each an open issue):
#: listed here so the check below stays exact for everything else.
NOT_YET_READ: dict[str, str] = {}


SHARED_CONTRACT = REPO.parent / "shared" / "CONTRACT.md"  # the law, beside the checkout where there is one
DOCS_CONTRACT = REPO / "docs" / "CONTRACT.md"  # its copy in the repository, so every clone can check


def contract_file() -> Path:
    return SHARED_CONTRACT if SHARED_CONTRACT.is_file() else DOCS_CONTRACT


def test_the_repositorys_copy_of_the_contract_is_the_contract() -> None:
    assert DOCS_CONTRACT.is_file()
    if SHARED_CONTRACT.is_file():
        assert DOCS_CONTRACT.read_text() == SHARED_CONTRACT.read_text(), "copy ../shared/CONTRACT.md to docs/"


def test_defaults_are_the_contracts() -> None:
    settings = Settings.from_env({})

    for name, value in CONTRACT_DEFAULTS.items():
        assert getattr(settings, name) == value, name
    assert settings == Settings()


def test_the_default_port_is_5671_with_tls() -> None:
    assert Settings.from_env({"RABBITMQ_SSL": "true"}).rabbitmq_port == 5671
    assert Settings.from_env({"RABBITMQ_SSL": "true", "RABBITMQ_PORT": "5673"}).rabbitmq_port == 5673
    assert Settings.from_env({"RABBITMQ_SSL": "false"}).rabbitmq_port == 5672


def test_every_contract_variable_is_read() -> None:
    env = {name: raw for name, (raw, _, _) in CONTRACT_VARIABLES.items()}

    settings = Settings.from_env(env)

    for name, (_, field, expected) in CONTRACT_VARIABLES.items():
        assert getattr(settings, field) == expected, name


def test_settings_are_read_from_the_process_environment_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAIN_REQUEST_QUEUE", "from-os-environ")

    assert Settings.from_env().train_request_queue == "from-os-environ"


def test_blank_variables_count_as_unset() -> None:
    settings = Settings.from_env({"RABBITMQ_PORT": "", "RABBITMQ_HOST": "  ", "METRICS_PORT": ""})

    assert (settings.rabbitmq_port, settings.rabbitmq_host, settings.metrics_port) == (5672, "localhost", None)


def test_the_contract_names_no_variable_the_settings_do_not_read() -> None:
    text = contract_file().read_text()
    names = set(re.findall(r"`([A-Z][A-Z0-9_]{2,})`", text))
    names = {n for n in names if not n.startswith("AWS_") and n != "ACCESS_REFUSED"}

    assert names <= set(CONTRACT_VARIABLES) | set(NOT_YET_READ), sorted(names - set(CONTRACT_VARIABLES))
    assert set(NOT_YET_READ) <= names, "a variable left the contract: drop it from NOT_YET_READ"
    fields = {f.upper() for f in Settings.__dataclass_fields__}
    assert not set(NOT_YET_READ) & fields, "read now: move it to CONTRACT_VARIABLES"


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"RABBITMQ_PORT": "abc"}, "RABBITMQ_PORT"),
        ({"RABBITMQ_PORT": "0"}, "RABBITMQ_PORT"),
        ({"RABBITMQ_PORT": "70000"}, "RABBITMQ_PORT"),
        ({"RABBITMQ_QUEUE_TYPE": "stream"}, "RABBITMQ_QUEUE_TYPE"),
        ({"ENABLE_RABBITMQ": "maybe"}, "ENABLE_RABBITMQ"),
        ({"RABBITMQ_SSL": "sometimes"}, "RABBITMQ_SSL"),
        ({"RABBITMQ_HEARTBEAT": "-1"}, "RABBITMQ_HEARTBEAT"),
        ({"RABBITMQ_HEARTBEAT": "1m"}, "RABBITMQ_HEARTBEAT"),
        ({"RABBITMQ_DELIVERY_LIMIT": "0"}, "RABBITMQ_DELIVERY_LIMIT"),
        ({"STORAGE_BACKEND": "s3"}, "S3_BUCKET"),
        ({"STORAGE_BACKEND": "gcs"}, "STORAGE_BACKEND"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        ({"LOG_LEVEL": "verbose"}, "LOG_LEVEL"),
        ({"METRICS_PORT": "on"}, "METRICS_PORT"),
        ({"METRICS_PORT": "70000"}, "METRICS_PORT"),
        ({"MAX_MESSAGE_BYTES": "16MiB"}, "MAX_MESSAGE_BYTES"),
    ],
)
def test_bad_values_raise_config_error_naming_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)

    assert variable in str(info.value)
    assert "None" not in str(info.value)


def test_config_error_messages_do_not_echo_the_password() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"RABBITMQ_PASSWORD": PASSWORD, "RABBITMQ_PORT": "x"})

    assert PASSWORD not in str(info.value)


@pytest.mark.parametrize("raw", ["1", "true", "TRUE", "yes", "on"])
def test_true_spellings_are_accepted(raw: str) -> None:
    assert Settings.from_env({"RABBITMQ_SSL": raw}).rabbitmq_ssl is True


@pytest.mark.parametrize("raw", ["0", "false", "False", "no", "off"])
def test_false_spellings_are_accepted(raw: str) -> None:
    assert Settings.from_env({"ENABLE_RABBITMQ": raw}).enable_rabbitmq is False


def test_guest_credentials_on_a_remote_host_are_called_insecure() -> None:
    settings = Settings.from_env({"RABBITMQ_HOST": "rabbit.example.com", "RABBITMQ_SSL": "true"})

    warning = settings.insecurity()

    assert warning is not None
    assert "guest" in warning


def test_no_tls_to_a_remote_host_is_called_insecure() -> None:
    settings = Settings.from_env(
        {"RABBITMQ_HOST": "10.0.0.5", "RABBITMQ_USER": "svc", "RABBITMQ_PASSWORD": PASSWORD}
    )

    warning = settings.insecurity()

    assert warning is not None
    assert "TLS" in warning
    assert PASSWORD not in warning


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "::1"])
def test_guest_without_tls_on_localhost_is_fine(host: str) -> None:
    assert Settings.from_env({"RABBITMQ_HOST": host}).insecurity() is None


def test_real_credentials_over_tls_to_a_remote_host_are_fine() -> None:
    env = {"RABBITMQ_HOST": "rabbit.example.com", "RABBITMQ_SSL": "true", "RABBITMQ_USER": "svc",
           "RABBITMQ_PASSWORD": PASSWORD}

    assert Settings.from_env(env).insecurity() is None


def test_the_password_never_appears_in_repr_or_redacted() -> None:
    settings = Settings.from_env({"RABBITMQ_USER": "svc", "RABBITMQ_PASSWORD": PASSWORD})

    redacted = settings.redacted()

    assert PASSWORD not in repr(settings)
    assert PASSWORD not in str(settings)
    assert PASSWORD not in repr(redacted)
    assert redacted["rabbitmq_password"] == "***"
    assert redacted["rabbitmq_user"] == "svc"
    assert redacted["storage_dir"] == "data"


def test_the_http_token_never_appears_in_repr_or_redacted_and_opens_a_public_host() -> None:
    token = "s3cr3t-http-token"
    settings = Settings.from_env({"HTTP_TOKEN": token, "HTTP_HOST": "0.0.0.0", "HTTP_PORT": "8100"})

    assert token not in repr(settings)
    assert token not in str(settings)
    assert token not in repr(settings.redacted())
    assert settings.redacted()["http_token"] == "***"
    assert settings.http_api_allowed
    assert not Settings.from_env({"HTTP_HOST": "0.0.0.0"}).http_api_allowed
    assert Settings.from_env({}).http_api_allowed  # 127.0.0.1


def test_for_program_names_the_worker_after_host_and_program_when_unset() -> None:
    settings = Settings.from_env({}).for_program("train")

    assert settings.worker_name == f"{socket.gethostname()}/train"


def test_for_program_keeps_an_explicit_worker_name() -> None:
    settings = Settings.from_env({"WORKER_NAME": "host-a/gpu0"})

    assert settings.for_program("train") is settings
    assert settings.for_program("train").worker_name == "host-a/gpu0"


# --- broker parameters ----------------------------------------------------------------


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed CA (certificate, key) made with the openssl CLI."""
    directory = tmp_path_factory.mktemp("ca")
    cert, key = directory / "ca.pem", directory / "ca.key"
    try:
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=ai-service test CA",
             "-addext", "basicConstraints=critical,CA:TRUE"],
            check=True, capture_output=True, timeout=30,
        )
    except FileNotFoundError:
        pytest.fail("openssl CLI not installed")
    return cert, key


def test_tls_parameters_verify_the_brokers_certificate(ca: tuple[Path, Path]) -> None:
    cert, _ = ca
    settings = Settings.from_env(
        {"RABBITMQ_SSL": "true", "RABBITMQ_CA_FILE": str(cert), "RABBITMQ_HOST": "rabbit.example.com"}
    )

    params = connection_parameters(settings, client_name="test/train")

    assert params.ssl_options is not None
    context = params.ssl_options.context
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True
    assert params.ssl_options.server_hostname == "rabbit.example.com"
    assert any(
        ("commonName", "ai-service test CA") in rdn for ca_cert in context.get_ca_certs() for rdn in ca_cert["subject"]
    )
    assert (params.host, params.port) == ("rabbit.example.com", 5671)


def test_tls_parameters_load_a_client_certificate(ca: tuple[Path, Path]) -> None:
    cert, key = ca
    env = {"RABBITMQ_SSL": "true", "RABBITMQ_CA_FILE": str(cert), "RABBITMQ_CERT_FILE": str(cert),
           "RABBITMQ_KEY_FILE": str(key)}

    params = connection_parameters(Settings.from_env(env), client_name="test/train")

    assert params.ssl_options is not None
    assert params.ssl_options.context.verify_mode == ssl.CERT_REQUIRED


def test_plain_parameters_carry_the_settings_without_tls() -> None:
    settings = Settings.from_env({"RABBITMQ_VHOST": "ai", "RABBITMQ_HEARTBEAT": "30", "RABBITMQ_USER": "svc",
                                  "RABBITMQ_PASSWORD": PASSWORD})

    params = connection_parameters(settings, client_name="host/train")

    assert params.ssl_options is None
    assert (params.port, params.virtual_host, params.heartbeat) == (5672, "ai", 30)
    assert params.client_properties is not None
    assert params.client_properties["connection_name"] == "host/train"
    assert PASSWORD not in repr(params)


@pytest.mark.parametrize("ssl_on", [False, True])
def test_describe_endpoint_never_contains_the_password(ssl_on: bool) -> None:
    settings = Settings.from_env(
        {"RABBITMQ_HOST": "rabbit.example.com", "RABBITMQ_USER": "svc", "RABBITMQ_PASSWORD": PASSWORD,
         "RABBITMQ_VHOST": "ai", "RABBITMQ_SSL": str(ssl_on).lower()}
    )

    endpoint = describe_endpoint(settings)

    assert PASSWORD not in endpoint
    scheme, port = ("amqps", 5671) if ssl_on else ("amqp", 5672)
    assert endpoint == f"{scheme}://svc@rabbit.example.com:{port}/ai"


def test_every_setting_is_in_the_readme_configuration_table() -> None:
    from dataclasses import fields
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    names = [f.name.upper() for f in fields(Settings)]
    missing = [n for n in names if f"`{n}`" not in table
               and not n.endswith(("_QUEUE", "_EXCHANGE"))]  # queue and exchange names: CONTRACT.md
    assert missing == [], f"settings not documented in the README: {missing}"


# --- RABBITMQ_HOST as a cluster's node list -------------------------------------------


def test_a_node_list_is_parsed_into_nodes_in_order_with_the_default_port() -> None:
    settings = Settings.from_env({"RABBITMQ_HOST": " node-a, node-b:5673 ,node-c,[::1]:5699,fe80::1,10.0.0.7:1",
                                  "RABBITMQ_PORT": "5680"})

    assert settings.rabbitmq_nodes == (
        BrokerNode("node-a", 5680), BrokerNode("node-b", 5673), BrokerNode("node-c", 5680),
        BrokerNode("::1", 5699), BrokerNode("fe80::1", 5680), BrokerNode("10.0.0.7", 1),
    )
    assert [str(n) for n in settings.rabbitmq_nodes[2:5]] == ["node-c:5680", "[::1]:5699", "[fe80::1]:5680"]


def test_one_host_is_a_list_of_one_node_on_the_tls_port_with_tls() -> None:
    assert Settings.from_env({}).rabbitmq_nodes == (BrokerNode("localhost", 5672),)
    assert Settings.from_env({"RABBITMQ_SSL": "true"}).rabbitmq_nodes == (BrokerNode("localhost", 5671),)


@pytest.mark.parametrize("raw", ["node-a,,node-b", ",", "node-a:", "node-a:http", "node-a:0", "node-a:70000",
                                 "[::1", "[::1]5673", "[]:5673", "a:b:c", "user@node-a", "node a",
                                 "node-a,node-a:5672", "amqp://node-a"])
def test_an_invalid_node_list_is_a_settings_error_naming_the_variable_and_the_entry(raw: str) -> None:
    with pytest.raises(ConfigError, match="RABBITMQ_HOST") as error:
        Settings.from_env({"RABBITMQ_HOST": raw, "RABBITMQ_PASSWORD": PASSWORD})
    assert PASSWORD not in str(error.value)


def test_settings_built_in_code_check_their_node_list_too() -> None:
    with pytest.raises(ConfigError, match="RABBITMQ_HOST"):
        replace(Settings(), rabbitmq_host="node-a,,node-b")


def test_node_parameters_give_one_set_per_node_each_checking_its_own_certificate(ca: tuple[Path, Path]) -> None:
    cert, _ = ca
    settings = Settings.from_env({"RABBITMQ_HOST": "node-a,node-b:5673,node-c", "RABBITMQ_SSL": "true",
                                  "RABBITMQ_CA_FILE": str(cert), "RABBITMQ_USER": "svc",
                                  "RABBITMQ_PASSWORD": PASSWORD})

    params = node_parameters(settings, client_name="host/train")

    assert [(p.host, p.port) for p in params] == [("node-a", 5671), ("node-b", 5673), ("node-c", 5671)]
    assert [p.ssl_options.server_hostname for p in params if p.ssl_options] == ["node-a", "node-b", "node-c"]
    assert {(getattr(p.credentials, "username", None), p.virtual_host, p.connection_attempts)
            for p in params} == {("svc", "/", 1)}
    assert all((p.client_properties or {})["connection_name"] == "host/train" for p in params)
    assert all(PASSWORD not in repr(p) for p in params)


def test_node_parameters_begin_at_start_and_wrap_round() -> None:
    settings = Settings.from_env({"RABBITMQ_HOST": "node-a,node-b,node-c"})

    assert [p.host for p in node_parameters(settings, client_name="t", start=1)] == ["node-b", "node-c", "node-a"]
    assert [p.host for p in node_parameters(settings, client_name="t", start=5)] == ["node-c", "node-a", "node-b"]


def test_a_ring_begins_the_next_connect_after_the_node_the_last_one_was_on() -> None:
    ring = NodeRing(Settings.from_env({"RABBITMQ_HOST": "node-a,node-b:5673,node-c"}))
    assert ring.start == 0

    ring.connected(BrokerNode("node-b", 5673))
    assert ring.start == 2
    ring.connected(BrokerNode("node-c", 5672))
    assert ring.start == 0
    ring.connected(BrokerNode("elsewhere", 5672))
    assert ring.start == 0


def test_describe_endpoint_shows_every_node_and_never_the_password() -> None:
    settings = Settings.from_env({"RABBITMQ_HOST": "node-a,node-b:5673", "RABBITMQ_USER": "svc",
                                  "RABBITMQ_PASSWORD": PASSWORD})

    assert describe_endpoint(settings) == "amqp://svc@node-a:5672,node-b:5673/"


def test_a_remote_node_anywhere_in_the_list_makes_guest_or_plain_text_insecure() -> None:
    assert Settings.from_env({"RABBITMQ_HOST": "localhost,rabbit.example.com"}).insecurity() is not None
    plain = Settings.from_env({"RABBITMQ_HOST": "127.0.0.1,rabbit.example.com", "RABBITMQ_USER": "svc",
                               "RABBITMQ_PASSWORD": PASSWORD})
    assert plain.insecurity() == "no TLS to remote host rabbit.example.com"
    assert Settings.from_env({"RABBITMQ_HOST": "127.0.0.1,localhost:5673"}).insecurity() is None


def test_a_connection_goes_to_the_first_node_that_answers_and_says_which(
    worker_env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        refused = s.getsockname()[1]
    port = Settings.from_env(worker_env).rabbitmq_port
    settings = Settings.from_env({**worker_env, "RABBITMQ_HOST": f"127.0.0.1:{refused},localhost:{port}"})
    ring = NodeRing(settings)

    with caplog.at_level("INFO", logger="ai_service.broker"), \
            session(settings, client_name="test node list", ring=ring) as connection:
        assert connected_node(connection) == BrokerNode("localhost", port)
        name = broker_name(connection)  # RabbitMQ names itself (cluster_name) in connection.start
    assert name
    assert ring.start == 0  # after the second of two nodes comes the first again
    assert f"[RMQ] Connected to localhost:{port} ({name}) for test node list" in caplog.text
