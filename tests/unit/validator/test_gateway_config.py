"""The validator's ``gateways:`` section: ids derived from the signing key, only https, the API
key read from a credential or a 0600 file and never shown, the CA as the only trust root."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from cryptography import x509

from byteleap.core.config import ConfigError, load_config
from byteleap.core.lease import gateway_id_of
from byteleap.validator.config import (
    ENV_PREFIX,
    GatewayKeyError,
    GatewaySettings,
    ValidatorConfig,
)
from byteleap.validator.leases import gateway_ssl_context
from tests.unit.validator.lease_helpers import CertAuthority, SigningGateway

API_KEY = "blk_9f8e7d6c5b4a39281706f5e4d3c2b1a0"
GATEWAY = SigningGateway()


def load(tmp_path: Path, text: str, **env: str) -> ValidatorConfig:
    path = tmp_path / "validator.yaml"
    path.write_text(text)
    return load_config(path, ValidatorConfig, env_prefix=ENV_PREFIX, environ=env)


def settings(**overrides: object) -> GatewaySettings:
    fields: dict[str, object] = {
        "name": "market",
        "url": "https://gateway.example:8443",
        "ca_file": "/etc/byteleap/gateway-ca.pem",
        "signing_public_key": GATEWAY.public_hex,
    }
    fields.update(overrides)
    return GatewaySettings(**fields)  # type: ignore[arg-type]


def key_file(tmp_path: Path, content: str, mode: int = 0o600) -> Path:
    path = tmp_path / "gateway.key"
    path.write_text(content)
    path.chmod(mode)
    return path


def test_gateways_load_with_ids_derived_from_their_keys(tmp_path: Path) -> None:
    other = SigningGateway()
    config = load(
        tmp_path,
        f"""
gateways:
  - name: market
    url: https://gateway.example:8443/
    ca_file: /etc/byteleap/market-ca.pem
    api_key_file: /etc/byteleap/market.key
    signing_public_key: {GATEWAY.public_hex}
  - name: lab-2
    url: https://10.0.0.5/byteleap
    ca_file: /etc/byteleap/lab-ca.pem
    signing_public_key: {other.public_hex.upper()}
    poll_interval_s: 15
    lease_grace_s: 600
""",
    )
    market, lab = config.gateways
    assert market.gateway_id == GATEWAY.gateway_id == gateway_id_of(market.public_key)
    assert lab.gateway_id == other.gateway_id
    assert market.feed_url == "https://gateway.example:8443/v1/lease-feed"
    assert lab.feed_url == "https://10.0.0.5/byteleap/v1/lease-feed"
    # Default grace: the gateway's checkpoint interval (300 s) and two polls.
    assert (market.poll_interval_s, market.grace_s) == (60.0, 420.0)
    assert (lab.poll_interval_s, lab.grace_s) == (15.0, 600.0)
    assert lab.credential_name == "gateway-lab-2-key"
    assert load_config(None, ValidatorConfig, env_prefix=ENV_PREFIX, environ={}).gateways == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"url": "http://gateway.example"}, "must be https"),
        ({"url": "https://"}, "must be https"),
        ({"url": "https://user:pw@gateway.example"}, "must not hold credentials"),
        ({"url": "https://gateway.example/?after=1"}, "no query"),
        ({"url": "https://gateway.example:99999"}, "not a valid URL"),
        ({"signing_public_key": "ab" * 31}, "64 hex digits"),
        ({"signing_public_key": "zz" * 32}, "64 hex digits"),
        ({"ca_file": ""}, "ca_file"),
    ],
)
def test_bad_gateway_settings_are_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        settings(**overrides)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("name: Market", "name"),  # names a systemd credential: lower case
        ("name: -x", "name"),
        ("poll_interval_s: 0", "poll_interval_s"),
        ("gateway_id: abc", "gateway_id"),  # derived, never configured
    ],
)
def test_bad_gateway_entries_name_their_key(tmp_path: Path, entry: str, message: str) -> None:
    fields = {
        "name": "market",
        "url": "https://gateway.example",
        "ca_file": "/ca.pem",
        "signing_public_key": GATEWAY.public_hex,
    }
    key, _, value = entry.partition(": ")
    fields[key] = value
    body = "".join(f"    {k}: {v}\n" for k, v in fields.items())
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, "gateways:\n  -\n" + body)


def test_two_gateways_may_not_share_a_name_or_a_key(tmp_path: Path) -> None:
    base = settings()
    with pytest.raises(ValueError, match="used twice"):
        ValidatorConfig(gateways=[base, settings(signing_public_key=SigningGateway().public_hex)])
    with pytest.raises(ValueError, match="same signing key"):
        ValidatorConfig(gateways=[base, settings(name="copy")])


def test_the_api_key_comes_from_a_private_file_or_the_credential(tmp_path: Path) -> None:
    path = key_file(tmp_path, API_KEY + "\n")
    assert settings(api_key_file=str(path)).resolve_api_key({}) == API_KEY

    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "gateway-market-key").write_text("cred_" + API_KEY)
    (credentials / "gateway-market-key").chmod(0o400)  # as systemd hands it over
    env = {"CREDENTIALS_DIRECTORY": str(credentials)}
    assert settings(api_key_file=str(path)).resolve_api_key(env) == "cred_" + API_KEY
    assert settings().resolve_api_key(env) == "cred_" + API_KEY


@pytest.mark.parametrize(
    ("content", "mode", "message"),
    [
        (API_KEY, 0o644, "chmod 600"),
        ("short-key", 0o600, "at least 16"),
        (API_KEY + " " + API_KEY, 0o600, "one key"),
        ("ключ" * 8, 0o600, "not ASCII"),
    ],
)
def test_an_unsafe_or_malformed_api_key_is_refused_without_showing_it(
    tmp_path: Path, content: str, mode: int, message: str
) -> None:
    path = key_file(tmp_path, content, mode)
    with pytest.raises(GatewayKeyError, match=message) as raised:
        settings(api_key_file=str(path)).resolve_api_key({})
    assert str(path) in str(raised.value)
    assert content not in str(raised.value) and API_KEY not in str(raised.value)


def test_a_missing_api_key_names_where_it_was_looked_for(tmp_path: Path) -> None:
    with pytest.raises(GatewayKeyError, match="credential 'gateway-market-key'"):
        settings().resolve_api_key({})
    with pytest.raises(GatewayKeyError, match="does not exist"):
        settings(api_key_file=str(tmp_path / "nope")).resolve_api_key({})


def test_the_ca_file_is_the_only_trust_root(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        gateway_ssl_context(str(tmp_path / "missing.pem"))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ValueError, match="no usable PEM certificate"):
        gateway_ssl_context(str(junk))
    ca = CertAuthority("gateway test CA")
    context = gateway_ssl_context(str(ca.write_ca(tmp_path / "ca.pem")))
    trusted = [x509.load_der_x509_certificate(d) for d in context.get_ca_certs(binary_form=True)]
    assert trusted == [ca.cert]  # that CA and nothing else, no system CA
    assert context.check_hostname and context.verify_mode is ssl.CERT_REQUIRED
