"""The promotion gate's decision logic (pure; the registry side is covered in test_tracking / test_flows_servers)."""

import json

import pytest

from cpt.ops import gate, tracking
from cpt.layout import Layout

PARAMS = {
    "ingest": {"sources": [
        {"name": "viwiki", "lang": "vi", "domain": "new", "role": "train"},
        {"name": "en_gutenberg", "lang": "en", "domain": "old", "role": "train"},
        {"name": "ntrex_vi", "lang": "vi", "domain": "new", "role": "eval"},
        {"name": "en_wikitext2", "lang": "en", "domain": "old", "role": "eval"},
    ]},
    "gate": {"min_gain": 0.1, "max_forgetting": 0.05},
}


def score(bpb, nbytes=1000):
    return {"loss": bpb * 2, "ppl": 10.0, "bpb": bpb, "bytes": nbytes, "tokens": 300}


def eval_metrics(new_base=2.0, new_cpt=1.5, old_base=1.2, old_cpt=1.22):
    return {
        "base": {"ntrex_vi": score(new_base), "en_wikitext2": score(old_base), "heldout_vi": score(new_base, 500)},
        "cpt": {"ntrex_vi": score(new_cpt), "en_wikitext2": score(old_cpt), "heldout_vi": score(new_cpt, 500)},
        "gain": {"vi": new_base - new_cpt}, "forgetting": {"en": old_cpt - old_base},
    }


def test_passes_when_gain_and_forgetting_within_thresholds():
    d = gate.decide(eval_metrics(), PARAMS)
    assert d["passed"] and not d["promoted"]  # promoted only once an alias is set
    assert d["vs_base"]["gain"] == pytest.approx(0.5)
    assert d["vs_base"]["forgetting"] == pytest.approx(0.02)
    assert d["sources"]["heldout_vi"]["domain"] == "new"  # eval's held-out group mapped via the language
    assert d["vs_champion"] == {"checked": False, "passed": True, "reasons": ["no champion yet"]}
    assert d["eval_gain"] == {"vi": 0.5}


@pytest.mark.parametrize("kw,reason", [
    ({"new_cpt": 1.95}, "new-domain gain 0.0500 bpb < min_gain 0.1"),
    ({"old_cpt": 1.3}, "old-domain forgetting 0.1000 bpb > max_forgetting 0.05"),
])
def test_fails_with_the_number_that_failed(kw, reason):
    d = gate.decide(eval_metrics(**kw), PARAMS)
    assert not d["passed"]
    assert d["reason"] == reason


def test_domain_bpb_is_byte_weighted():
    m = eval_metrics()
    m["cpt"]["heldout_vi"] = score(1.0, 3000)  # 3000 bytes at 1.0 + 1000 bytes at 1.5
    d = gate.decide(m, PARAMS)
    assert d["vs_base"]["candidate_bpb"]["new"] == pytest.approx((1.5 * 1000 + 1.0 * 3000) / 4000)


def test_champion_must_be_beaten_too():
    m = eval_metrics(new_cpt=1.5)
    champ = {"version": "3", "sources": {
        "ntrex_vi": {"domain": "new", "bytes": 1000, "bpb": 1.45},
        "heldout_vi": {"domain": "new", "bytes": 500, "bpb": 1.45},
        "en_wikitext2": {"domain": "old", "bytes": 1000, "bpb": 1.22},
    }}
    d = gate.decide(m, PARAMS, champion=champ)
    assert d["vs_base"]["passed"] and not d["passed"]
    assert d["vs_champion"]["checked"] and d["vs_champion"]["version"] == "3"
    assert d["vs_champion"]["gain"] == pytest.approx(-0.05)
    # a looser champion threshold lets a model that is as good as the champion through
    loose = {**PARAMS, "gate": {**PARAMS["gate"], "champion_min_gain": -0.1}}
    assert gate.decide(m, loose, champion=champ)["passed"]


def test_champion_scored_on_other_text_is_not_compared():
    champ = {"version": "1", "sources": {"ntrex_vi": {"domain": "new", "bytes": 999, "bpb": 0.1}}}
    d = gate.decide(eval_metrics(), PARAMS, champion=champ)
    assert not d["vs_champion"]["checked"] and d["passed"]
    assert "different eval sources" in d["vs_champion"]["reasons"][0]


def test_missing_eval_keys_give_a_clear_reason_not_a_crash():
    d = gate.decide({"gain": {"vi": 0.3}}, PARAMS)
    assert not d["passed"]
    assert any("no per-source 'base' block" in n for n in d["notes"])
    assert "no new-domain bpb" in d["reason"]
    m = eval_metrics()
    m["cpt"]["mystery"] = score(1.0)
    m["base"]["mystery"] = score(1.0)
    m["cpt"]["ntrex_vi"]["bpb"] = None
    d = gate.decide(m, PARAMS)
    assert any("mystery: domain unknown" in n for n in d["notes"])
    assert any("cpt/ntrex_vi: no finite 'bpb'" in n for n in d["notes"])


def test_run_with_tracking_off_writes_gate_json_and_says_why(tmp_path):
    layout = Layout(tmp_path)
    d = gate.run(PARAMS, layout, eval_metrics(), tracking.Tracker())
    on_disk = json.loads(layout.metrics_file("gate").read_text())
    assert on_disk["passed"] and not on_disk["promoted"]
    assert on_disk["vs_champion"]["reasons"] == ["tracking off: champion comparison skipped, nothing registered"]
    assert "tracking off, so no alias was set" in on_disk["reason"]
    assert d["version"] is None


class _DownRegistry(tracking.Tracker):
    """A tracker whose store is unreachable (what MlflowTracker raises then)."""

    active = True
    model_name = "cpt"

    def get_alias(self, name, alias):
        raise tracking.TrackingUnavailable("connection refused")

    def register_model(self, path, tags=None):
        raise tracking.TrackingUnavailable("connection refused")


def test_unreachable_registry_never_promotes_and_never_raises(tmp_path):
    layout = Layout(tmp_path)
    d = gate.run(PARAMS, layout, eval_metrics(), _DownRegistry())
    assert d["passed"] and not d["promoted"]
    assert "champion lookup failed" in d["vs_champion"]["reasons"][0]
    assert any("model registration failed" in n for n in d["notes"])


def test_params_yaml_documents_the_code_defaults(repo_root):
    from cpt.params import load_params

    params = load_params(repo_root / "params.yaml")
    assert params["gate"] == gate.DEFAULTS
    assert params["tracking"] == tracking.DEFAULTS
