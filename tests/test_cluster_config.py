"""Redis Cluster backends in the configuration: every accepted spelling, and the mistakes."""

from __future__ import annotations

import pytest

from sqlacache import ConfigError
from sqlacache.config import parse_backend


@pytest.mark.parametrize(
    "backend",
    [
        "redis://10.0.0.1:7000?cluster=true",
        "redis://10.0.0.1:7000/0?cluster=True",
        "redis://10.0.0.1:7000?cluster=1",
        {"url": "redis://10.0.0.1:7000", "cluster": True},
        {"startup_nodes": [("10.0.0.1", 7000), ("10.0.0.2", 7001)]},
        {"startup_nodes": ["redis://10.0.0.1:7000", "redis://10.0.0.2:7001"]},
        ["redis://10.0.0.1:7000", "redis://10.0.0.2:7001"],
    ],
)
def test_cluster_spellings_all_name_the_cluster(backend: object) -> None:
    config = parse_backend(backend)
    assert config.cluster is True
    assert config.startup_nodes[0] == ("10.0.0.1", 7000)
    assert "cluster" not in config.options


def test_startup_nodes_come_after_the_urls_own_node_without_duplicates() -> None:
    config = parse_backend(
        {"url": "redis://10.0.0.2:7001", "startup_nodes": [("10.0.0.1", 7000), ("10.0.0.2", 7001)]}
    )
    assert config.startup_nodes == (("10.0.0.2", 7001), ("10.0.0.1", 7000))


def test_a_plain_url_is_not_a_cluster() -> None:
    config = parse_backend("redis://10.0.0.1:6379/3")
    assert config.cluster is False and config.startup_nodes == ()
    assert parse_backend("redis://10.0.0.1:6379?cluster=false").cluster is False


def test_cluster_options_still_pass_to_redis() -> None:
    config = parse_backend("redis://h:7000?cluster=true&socket_timeout=0.1&max_connections=8")
    assert config.options == {"socket_timeout": 0.1, "max_connections": 8}


@pytest.mark.parametrize(
    ("backend", "culprit"),
    [
        ("redis://h:7000/2?cluster=true", "only database 0"),
        ({"startup_nodes": []}, "startup_nodes' is empty"),
        ({"startup_nodes": "h:7000"}, "list of (host, port)"),
        ({"startup_nodes": [("h", "port")]}, "no valid port"),
        ({"startup_nodes": [("h",)]}, "neither (host, port)"),
        ({"startup_nodes": [("h", 7000)], "cluster": False}, "drop 'cluster': False"),
        ("mem://?cluster=true", "mem:// lives in this process"),
        ({"cluster": True}, "non-empty 'url'"),
    ],
)
def test_cluster_mistakes_name_the_setting(backend: object, culprit: str) -> None:
    with pytest.raises(ConfigError, match=culprit.replace("(", r"\(").replace(")", r"\)")):
        parse_backend(backend)
