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


def test_server_only_keys_refused_per_request():
    with pytest.raises(SettingsError, match="max_budget.*server-wide"):
        resolve_request_settings(None, {"max_budget": 10})


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
