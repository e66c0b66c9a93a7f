"""A live policy edit survives a restart (cluster/policy_memory.py), Ray-free."""

from __future__ import annotations

from cluster import policy_memory


def test_restart_restores_the_applied_policy_and_says_where_from(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEETLM_STATE_DIR", str(tmp_path))
    store: dict = {}

    def get_live():
        return store.get("rec")

    def put(policy, source):
        store["rec"] = {"version": 1, "source": source, "policy": policy}
        return store["rec"]

    line = policy_memory.restore(get_live, put)
    assert line.startswith("autoscaling policy: built-in defaults") and str(tmp_path) in line
    assert store == {}

    applied = {"version": 3, "applied_at": 0.0, "source": "/ops/p.yaml", "policy": {"a": 1}}
    policy_memory.remember(applied)
    line = policy_memory.restore(get_live, put)  # a fresh cluster: nothing live
    assert "restored" in line and "/ops/p.yaml" in line
    assert store["rec"]["policy"] == {"a": 1} and store["rec"]["source"] == "/ops/p.yaml"

    line = policy_memory.restore(get_live, put)  # already live: left alone, named
    assert "already live" in line and "v1" in line


def test_a_corrupt_file_counts_as_none(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEETLM_STATE_DIR", str(tmp_path))
    policy_memory.policy_path().write_text("{not json")
    assert policy_memory.recalled() is None
