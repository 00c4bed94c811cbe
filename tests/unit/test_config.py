"""Config loading: defaults, YAML, environment overrides and the precision of every error."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import msgspec.inspect as mi
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from msgspec import Meta

from byteleap.core.config import (
    ConfigError,
    ConfigStruct,
    LoggingConfig,
    Port,
    PositiveSeconds,
    load_config,
)

PREFIX = "BYTELEAP_WORKER"


class MinerSection(ConfigStruct, frozen=True, kw_only=True):
    url: str = "ws://127.0.0.1:8091"
    enrollment_secret: Annotated[str, Meta(max_length=64)] = ""
    reconnect_max_s: PositiveSeconds = 60.0


class GpuSection(ConfigStruct, frozen=True, kw_only=True):
    mode: str = "auto"
    exclude: list[str] = msgspec.field(default_factory=list)


class Peer(ConfigStruct, frozen=True, kw_only=True):
    hotkey: str
    port: Port = 8091


class WorkerConfig(ConfigStruct, frozen=True, kw_only=True):
    miner: MinerSection = MinerSection()
    gpu: GpuSection = GpuSection()
    logging: LoggingConfig = LoggingConfig()
    metrics_port: Port = 9101
    dry_run: bool = False
    api_token: int | None = None
    peers: list[Peer] = msgspec.field(default_factory=list)
    labels: dict[str, str] = msgspec.field(default_factory=dict)


class Required(ConfigStruct, frozen=True, kw_only=True):
    name: str
    miner: MinerSection = MinerSection()


def write(tmp_path: Path, text: str, name: str = "worker.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def load(path: Path | None, env: dict[str, str] | None = None) -> WorkerConfig:
    return load_config(path, WorkerConfig, env_prefix=PREFIX, environ=env or {})


def error(path: Path | None, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(path, env)
    return info.value


# ------------------------------------------------------------------------------------------------
# Happy paths


def test_defaults_without_file() -> None:
    assert load(None) == WorkerConfig()


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    assert load(write(tmp_path, "")) == WorkerConfig()
    assert load(write(tmp_path, "# only a comment\n")) == WorkerConfig()


def test_yaml_file_is_loaded(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        miner:
          url: wss://miner.example:8443
          reconnect_max_s: 30     # an int is fine for seconds
        gpu:
          exclude: [GPU-1, GPU-2]
        logging:
          level: debug
        peers:
          - hotkey: 5Fabc
            port: 9000
        labels:
          rack: r1
        """,
    )
    cfg = load(path)
    assert cfg.miner.url == "wss://miner.example:8443"
    assert cfg.miner.reconnect_max_s == 30.0
    assert isinstance(cfg.miner.reconnect_max_s, float)
    assert cfg.gpu.exclude == ["GPU-1", "GPU-2"]
    assert cfg.logging.level == "debug"
    assert cfg.peers == [Peer(hotkey="5Fabc", port=9000)]
    assert cfg.labels == {"rack": "r1"}
    assert cfg.metrics_port == 9101  # untouched default


def test_config_is_frozen() -> None:
    cfg = load(None)
    with pytest.raises(AttributeError):
        cfg.metrics_port = 1  # type: ignore[misc]


def test_nested_env_overrides_with_type_parsing(tmp_path: Path) -> None:
    path = write(tmp_path, "miner:\n  url: ws://from-file\nmetrics_port: 9200\n")
    env = {
        "BYTELEAP_WORKER__MINER__URL": "ws://from-env:1",
        "BYTELEAP_WORKER__MINER__RECONNECT_MAX_S": "2.5",
        "BYTELEAP_WORKER__METRICS_PORT": "9300",
        "BYTELEAP_WORKER__DRY_RUN": "true",
        "BYTELEAP_WORKER__GPU__EXCLUDE": "[GPU-7, GPU-8]",
        "BYTELEAP_WORKER__LOGGING__LEVEL": "warning",
        "BYTELEAP_WORKER__API_TOKEN": "12345",
        "BYTELEAP_WORKER__LABELS__ZONE": "eu",
        "BYTELEAP_OTHER__METRICS_PORT": "1",  # another agent's prefix: ignored
        "BYTELEAP_WORKER_METRICS_PORT": "1",  # single underscore: not an override
        "PATH": "/usr/bin",
    }
    cfg = load(path, env)
    assert cfg.miner.url == "ws://from-env:1"
    assert cfg.miner.reconnect_max_s == 2.5
    assert cfg.metrics_port == 9300
    assert cfg.dry_run is True
    assert cfg.gpu.exclude == ["GPU-7", "GPU-8"]
    assert cfg.logging.level == "warning"
    assert cfg.api_token == 12345
    assert cfg.labels == {"zone": "eu"}


def test_env_keys_are_case_insensitive_and_strings_stay_verbatim() -> None:
    cfg = load(None, {"BYTELEAP_WORKER__Miner__url": "8080", "BYTELEAP_WORKER__GPU__MODE": "yes"})
    assert cfg.miner.url == "8080"  # a str field is not YAML-parsed into an int
    assert cfg.gpu.mode == "yes"  # nor into a bool


def test_env_can_replace_a_whole_section() -> None:
    cfg = load(None, {"BYTELEAP_WORKER__MINER": "{url: ws://x, reconnect_max_s: 5}"})
    assert cfg.miner == MinerSection(url="ws://x", reconnect_max_s=5.0)


def test_env_prefix_may_carry_trailing_underscores() -> None:
    cfg = load_config(
        None,
        WorkerConfig,
        env_prefix="BYTELEAP_WORKER__",
        environ={"BYTELEAP_WORKER__DRY_RUN": "1"},
    )
    assert cfg.dry_run is True


def test_os_environ_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BYTELEAP_WORKER__METRICS_PORT", "9555")
    assert load_config(None, WorkerConfig, env_prefix=PREFIX).metrics_port == 9555


# ------------------------------------------------------------------------------------------------
# Errors


def test_unknown_key_in_file_names_file_path_and_allowed_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "miner:\n  ur1: ws://x\n")
    err = error(path)
    assert err.source == str(path)
    assert err.key_path == "miner.ur1"
    text = str(err)
    assert text.startswith(f"{path}: miner.ur1: unknown key 'ur1'")
    assert "did you mean 'url'" in text
    assert "allowed keys: enrollment_secret, reconnect_max_s, url" in text


def test_unknown_top_level_key_and_inside_lists(tmp_path: Path) -> None:
    assert error(write(tmp_path, "minr: {}\n")).key_path == "minr"
    err = error(write(tmp_path, "peers:\n  - hotkey: a\n  - hotkey: b\n    prt: 1\n"))
    assert err.key_path == "peers[1].prt"
    assert "allowed keys: hotkey, port" in str(err)


def test_unknown_key_in_env() -> None:
    err = error(None, {"BYTELEAP_WORKER__MINER__URLL": "ws://x"})
    assert err.source == "environment variable BYTELEAP_WORKER__MINER__URLL"
    assert err.key_path == "miner.urll"
    assert "unknown key 'urll'" in str(err)
    assert "allowed keys: enrollment_secret, reconnect_max_s, url" in str(err)
    assert str(err).startswith("environment variable BYTELEAP_WORKER__MINER__URLL: miner.urll:")

    err = error(None, {"BYTELEAP_WORKER__NOPE": "1"})
    assert err.key_path == "nope"
    err = error(None, {"BYTELEAP_WORKER__MINER__URL__HOST": "x"})
    assert err.key_path == "miner.url.host"
    assert "not a section" in str(err)
    err = error(None, {"BYTELEAP_WORKER__MINER": "{url: x, bogus: 1}"})
    assert (err.source, err.key_path) == (
        "environment variable BYTELEAP_WORKER__MINER",
        "miner.bogus",
    )
    err = error(None, {"BYTELEAP_WORKER____MINER": "x"})
    assert "malformed name" in str(err)


def test_bad_type_names_file_and_dotted_path(tmp_path: Path) -> None:
    path = write(tmp_path, "miner:\n  url: 5\n")
    err = error(path)
    assert str(err) == f"{path}: miner.url: expected str, got int"
    assert (err.source, err.key_path) == (str(path), "miner.url")

    err = error(write(tmp_path, "peers:\n  - hotkey: a\n    port: 70000\n"))
    assert err.key_path == "peers[0].port"
    assert "expected int <= 65535, got 70000" in str(err)

    err = error(write(tmp_path, "logging:\n  level: loud\n"))
    assert err.key_path == "logging.level"
    assert "expected one of" in str(err)
    assert "'debug'" in str(err)
    assert "got 'loud'" in str(err)

    err = error(write(tmp_path, "miner:\n  reconnect_max_s: 0\n"))
    assert "miner.reconnect_max_s: expected float > 0.0, got 0" in str(err)
    assert "expected bool, got str" in str(error(write(tmp_path, "dry_run: maybe\n")))
    assert error(write(tmp_path, "miner: 3\n")).key_path == "miner"


def test_bad_type_from_env_names_the_variable(tmp_path: Path) -> None:
    path = write(tmp_path, "metrics_port: 9200\n")
    err = error(path, {"BYTELEAP_WORKER__METRICS_PORT": "many"})
    assert err.source == "environment variable BYTELEAP_WORKER__METRICS_PORT"
    assert err.key_path == "metrics_port"
    assert "expected int, got str" in str(err)
    err = error(path, {"BYTELEAP_WORKER__METRICS_PORT": "[unclosed"})
    assert err.source == "environment variable BYTELEAP_WORKER__METRICS_PORT"
    assert "invalid YAML" in str(err)


def test_env_cannot_descend_into_a_scalar_set_by_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "miner: 3\n")
    err = error(path, {"BYTELEAP_WORKER__MINER__URL": "ws://x"})
    assert err.source == "environment variable BYTELEAP_WORKER__MINER__URL"
    assert str(path) in str(err)


def test_missing_required_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "miner: {}\n"), Required, env_prefix=PREFIX, environ={})
    assert info.value.key_path == "name"
    assert "required key is missing" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(None, Required, env_prefix=PREFIX, environ={})
    assert info.value.source == "(no config file)"
    err = error(write(tmp_path, "peers:\n  - port: 1\n"))
    assert err.key_path == "peers[0].hotkey"


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "miner:\n  url: ws://x\n  bad: [1, 2\nlogging: {}\n")
    err = error(path)
    assert err.source == str(path)
    assert err.line is not None
    assert str(err).startswith(f"{path}: line {err.line}, column ")
    assert "invalid YAML" in str(err)

    err = error(write(tmp_path, "miner:\n\turl: x\n"))
    assert err.line == 2


def test_duplicate_keys_are_an_error(tmp_path: Path) -> None:
    err = error(write(tmp_path, "metrics_port: 1\nminer: {}\nmetrics_port: 2\n"))
    assert err.line == 3
    assert "duplicate key 'metrics_port'" in str(err)


def test_yaml_merge_keys_still_work(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        base: &base {url: ws://a, reconnect_max_s: 3}
        """,
    )
    assert error(path).key_path == "base"  # unknown key, but the anchor itself parsed
    path = write(tmp_path, "peers:\n  - &p {hotkey: a}\n  - <<: *p\n    port: 5\n")
    assert load(path).peers == [Peer(hotkey="a"), Peer(hotkey="a", port=5)]


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    err = error(write(tmp_path, "- a\n- b\n"))
    assert "top level must be a mapping, got list" in str(err)
    assert "got str" in str(error(write(tmp_path, "just text\n")))


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    err = error(path)
    assert err.source == str(path)
    assert str(err) == f"{path}: file not found"


def test_unreadable_paths(tmp_path: Path) -> None:
    assert "cannot read" in str(error(tmp_path))  # a directory
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"miner:\n  url: caf\xe9\n")
    assert "not UTF-8" in str(error(bad))


# ------------------------------------------------------------------------------------------------
# Secrets


SECRET = "hunter2-s3cr3t"


def test_secret_values_are_not_echoed(tmp_path: Path) -> None:
    long_secret = SECRET * 10
    cases: list[tuple[str | None, dict[str, str]]] = [
        (f"miner:\n  enrollment_secret: [{SECRET}]\n", {}),
        (f"miner:\n  enrollment_secret: {long_secret}\n", {}),
        (f"api_token: {SECRET}\n", {}),
        (f'api_token: "{SECRET}\n', {}),  # syntax error: no source snippet
        (f"api_token: {{{SECRET}: 1}}\n", {}),
        (None, {"BYTELEAP_WORKER__API_TOKEN": SECRET}),
        (None, {"BYTELEAP_WORKER__API_TOKEN": f"[{SECRET}"}),
        (None, {"BYTELEAP_WORKER__MINER__ENROLLMENT_SECRET": long_secret}),
        (None, {"BYTELEAP_WORKER__PEERS": f"[{{hotkey: [{SECRET}]}}]"}),
    ]
    for index, (text, env) in enumerate(cases):
        path = write(tmp_path, text, f"case{index}.yaml") if text is not None else None
        err = error(path, env)
        assert SECRET not in str(err), str(err)
        assert SECRET not in repr(err.args)


class Auth(ConfigStruct, frozen=True, kw_only=True):
    password_kind: Literal["a", "b"] = "a"


class AuthRoot(ConfigStruct, frozen=True, kw_only=True):
    auth: Auth = Auth()


def test_secret_literal_values_are_not_echoed() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, AuthRoot, env_prefix="X", environ={"X__AUTH__PASSWORD_KIND": SECRET})
    assert SECRET not in str(info.value)
    assert "expected one of 'a', 'b'" in str(info.value)


def test_non_secret_values_are_shown(tmp_path: Path) -> None:
    assert "got 70000" in str(error(None, {"BYTELEAP_WORKER__METRICS_PORT": "70000"}))


class Db(ConfigStruct, frozen=True, kw_only=True):
    db_passwd: Annotated[str, Meta(max_length=8)] = ""
    smtp_passwd: int = 0


def test_passwd_values_are_not_echoed(tmp_path: Path) -> None:
    """Config errors hide values by the same rule as log redaction (``passwd`` included)."""
    errors: list[ConfigError] = []
    for text, env in [
        (f"db_passwd: {SECRET}\n", {}),
        (f"smtp_passwd: {SECRET}\n", {}),
        (None, {"X__SMTP_PASSWD": SECRET}),
        (None, {"X__DB_PASSWD": SECRET}),
    ]:
        path = write(tmp_path, text) if text is not None else None
        with pytest.raises(ConfigError) as info:
            load_config(path, Db, env_prefix="X", environ=env)
        errors.append(info.value)
    for err in errors:
        assert SECRET not in str(err), str(err)
    assert "expected int" in str(errors[1])


# ------------------------------------------------------------------------------------------------
# Properties


class Flat(ConfigStruct, frozen=True, kw_only=True):
    count: int = 0
    ratio: float = 1.0
    enabled: bool = False
    name: str = ""
    items: list[int] = msgspec.field(default_factory=list)


@settings(max_examples=100, deadline=None)
@given(
    count=st.integers(-(2**62), 2**62),
    ratio=st.floats(allow_nan=False, allow_infinity=False),
    enabled=st.booleans(),
    name=st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=20),
    items=st.lists(st.integers(-1000, 1000), max_size=5),
)
def test_env_values_round_trip(
    count: int, ratio: float, enabled: bool, name: str, items: list[int]
) -> None:
    env = {
        "F__COUNT": str(count),
        "F__RATIO": repr(ratio),
        "F__ENABLED": str(enabled).lower(),
        "F__NAME": name,
        "F__ITEMS": msgspec.json.encode(items).decode(),
    }
    cfg = load_config(None, Flat, env_prefix="F", environ=env)
    assert cfg == Flat(count=count, ratio=ratio, enabled=enabled, name=name, items=items)


def _schema_keys(t: mi.Type) -> set[str]:
    """Every field name anywhere in a schema (sections, list items, dict values)."""
    if isinstance(t, mi.StructType):
        return {f.encode_name for f in t.fields}.union(*(_schema_keys(f.type) for f in t.fields))
    if isinstance(t, mi.ListType | mi.DictType):
        return _schema_keys(t.item_type if isinstance(t, mi.ListType) else t.value_type)
    if isinstance(t, mi.UnionType):
        return set().union(*(_schema_keys(m) for m in t.types))
    return set()


# Keys of any level at any level, plus a few unknown ones: reaches unknown keys, wrong types,
# wrong sections, missing required keys (peers) and valid documents alike.
_KEYS = st.sampled_from(
    sorted(_schema_keys(mi.type_info(WorkerConfig)) | {"bogus", "ur1", "Miner", "port_"})
)
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.integers(0, 70_000)
    | st.floats()
    | st.text(max_size=10)
    | st.sampled_from(["debug", "auto", "ws://x", "5Fabc", "[1", "{a: 1}"])
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=4),
    max_leaves=16,
)
_TOP_KEYS = st.sampled_from(sorted(WorkerConfig.__struct_fields__))
_DOCUMENTS = st.dictionaries(_TOP_KEYS | _KEYS, _VALUES, max_size=6)


@settings(max_examples=300, deadline=None)
@given(
    content=st.one_of(
        _DOCUMENTS.map(lambda doc: ("mapping", doc)),
        st.text(max_size=200).map(lambda text: ("text", text)),
        st.binary(max_size=200).map(lambda data: ("bytes", data)),
    )
)
def test_arbitrary_file_content_raises_only_config_error(
    tmp_path_factory: pytest.TempPathFactory, content: tuple[str, Any]
) -> None:
    kind, value = content
    path = tmp_path_factory.mktemp("cfg") / "worker.yaml"
    if kind == "mapping":
        path.write_text(yaml.safe_dump(value, allow_unicode=True), encoding="utf-8")
    elif kind == "text":
        path.write_text(value, encoding="utf-8")
    else:
        path.write_bytes(value)
    try:
        cfg = load(path)
    except ConfigError as exc:
        assert exc.source == str(path)
        assert str(exc).startswith(str(path))
        if kind == "mapping" and exc.key_path:
            # the error names a key of the document (or one missing inside it)
            assert re.split(r"[.\[]", exc.key_path)[0] in value, exc.key_path
    else:
        assert isinstance(cfg, WorkerConfig)


def test_env_values_are_parsed_by_target_type() -> None:
    cfg = load_config(
        None,
        Flat,
        env_prefix="F",
        environ={"F__COUNT": "010", "F__RATIO": "1e-3", "F__ENABLED": "On", "F__NAME": "0123"},
    )
    assert (cfg.count, cfg.ratio, cfg.enabled, cfg.name) == (10, 0.001, True, "0123")
    with pytest.raises(ConfigError, match="expected int, got str"):
        load_config(None, Flat, env_prefix="F", environ={"F__COUNT": "12abc"})


def test_yaml_type_names_in_messages(tmp_path: Path) -> None:
    assert "expected str, got list" in str(error(write(tmp_path, "miner:\n  url: [a]\n")))
    assert "expected list, got mapping" in str(error(write(tmp_path, "peers: {a: 1}\n")))
