"""Settings validation, merging and the count rule."""

from __future__ import annotations

import pytest

from vllm_script.config import (
    ScriptSettings,
    SettingsError,
    kept_count,
    parse_server_settings,
    resolve_request_settings,
)


def test_unset_means_no_pruning():
    assert parse_server_settings(None) is None
    assert resolve_request_settings(None, None) is None


def test_request_overrides_server_keys():
    server = parse_server_settings({"method": "script", "budget": 64, "tau": 0.3})
    merged = resolve_request_settings(server, {"budget": 128})
    assert (merged.method, merged.budget, merged.tau) == ("script", 128, 0.3)


def test_request_can_turn_pruning_off_or_on():
    server = parse_server_settings({"budget": 64})
    assert resolve_request_settings(server, {"method": "none"}) is None
    assert resolve_request_settings(None, {"budget": 32}).budget == 32


def test_server_settings_accept_json_string():
    assert parse_server_settings('{"budget": 16}').budget == 16


@pytest.mark.parametrize(
    ("raw", "named", "allowed"),
    [
        ({"budget": 0}, "'script.budget': 0", "an integer >= 1"),
        ({"budget": 2.5}, "'script.budget': 2.5", "an integer >= 1"),
        ({"budget": True}, "'script.budget': True", "an integer >= 1"),
        ({"method": "fastv"}, "'script.method': 'fastv'", "one of"),
        ({"theta": 1.0}, "'script.theta': 1.0", "[0, 1)"),
        ({"tau": "x"}, "'script.tau': 'x'", "[-1, 1]"),
        ({"relevance": "attn"}, "'script.relevance': 'attn'", "'llm'"),
        ({"budgets": 3}, "unknown key 'script.budgets'", "allowed keys"),
        (["budget"], "must be an object", "list"),
        ({"method": ["script"]}, "'script.method': ['script']", "one of"),
        ({"method": {"a": 1}}, "'script.method': {'a': 1}", "one of"),
        ({"relevance": ["llm"]}, "'script.relevance': ['llm']", "'llm'"),
        ({"reference": "arxiv"}, "'script.reference': 'arxiv'", "['paper', 'code']"),
        ({"gamma": 20.5}, "'script.gamma': 20.5", "[0, 20]"),
        ({"gamma": 10**400}, "'script.gamma'", "[0, 20]"),
        ({"theta": 10**400}, "'script.theta'", "[0, 1)"),
    ],
    ids=[
        "budget=0",
        "budget-float",
        "budget-bool",
        "method",
        "theta",
        "tau-type",
        "relevance",
        "unknown-key",
        "not-object",
        "method-list",
        "method-dict",
        "relevance-list",
        "reference",
        "gamma-above-20",
        "gamma-huge-int",
        "theta-huge-int",
    ],
)
def test_bad_settings_name_key_value_and_allowed(raw, named, allowed):
    for parse in (parse_server_settings, lambda r: resolve_request_settings(None, r)):
        with pytest.raises(SettingsError) as err:
            parse(raw)
        assert named in str(err.value) and allowed in str(err.value)


def test_request_budget_above_server_max_is_refused():
    server = parse_server_settings({"budget": 64, "max_budget": 192})
    assert resolve_request_settings(server, {"budget": 192}).budget == 192
    with pytest.raises(SettingsError, match=r"'script.budget': 193.*\[1, 192\]"):
        resolve_request_settings(server, {"budget": 193})


@pytest.mark.parametrize(
    ("key", "value"),
    [("max_budget", 10), ("clip_path", "/x"), ("backend", "torch"), ("request_kwargs", "all")],
)
def test_server_only_keys_refused_per_request(key, value):
    with pytest.raises(SettingsError, match=f"{key}.*server-wide"):
        resolve_request_settings(None, {key: value})


@pytest.mark.parametrize(
    ("raw", "allowed"),
    [
        ({"backend": "triton"}, "['auto', 'torch']"),
        ({"backend": ["torch"]}, "['auto', 'torch']"),
        ({"request_kwargs": "none"}, "['script-only', 'all']"),
    ],
    ids=["backend", "backend-list", "request-kwargs"],
)
def test_bad_server_only_keys_name_the_allowed_values(raw, allowed):
    with pytest.raises(SettingsError) as err:
        parse_server_settings(raw)
    assert f"'script.{next(iter(raw))}'" in str(err.value) and allowed in str(err.value)


def test_edges_of_allowed_ranges_are_accepted():
    s = resolve_request_settings(
        None, {"theta": 0.9999999999999999, "gamma": 20, "tau": -1, "gsp_ratio": 1}
    )
    assert (s.theta, s.gamma, s.tau, s.gsp_ratio) == (0.9999999999999999, 20.0, -1.0, 1.0)
    assert resolve_request_settings(None, {"theta": 0, "gamma": 0, "tau": 1}).gamma == 0.0
    server = parse_server_settings({"backend": "torch", "request_kwargs": "all"})
    assert (server.backend, server.request_kwargs) == ("torch", "all")
    assert resolve_request_settings(None, {"reference": "code"}).reference == "code"


@pytest.mark.parametrize(
    ("n", "budget", "kept"),
    [(576, 64, 64), (576, 576, 576), (576, 1000, 576), (1, 1, 1), (2880, 320, 320)],
)
def test_kept_count(n, budget, kept):
    assert kept_count(n, ScriptSettings(budget=budget)) == kept


def test_kept_count_without_pruning_keeps_all():
    assert kept_count(576, None) == 576
    assert kept_count(576, ScriptSettings(method="none", budget=4)) == 576


def test_settings_json_round_trip():
    s = ScriptSettings(method="qcsp", budget=7, theta=0.25)
    assert ScriptSettings.from_json(s.to_json()) == s
