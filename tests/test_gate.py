"""The promotion gate's decision logic (pure; the registry side is covered in test_tracking / test_flows_servers).

Sign convention of eval.json: gain = bpb(base) - bpb(cpt) (new domain), forgetting = bpb(cpt) - bpb(base) (old
domain), each with a bootstrap 95% interval (``gain_ci95`` / ``forgetting_ci95``)."""

import json

import pytest

from cpt.layout import Layout
from cpt.ops import gate, tracking

PARAMS = {
    "ingest": {"sources": [
        {"name": "viwiki", "lang": "vi", "domain": "new", "role": "train"},
        {"name": "en_gutenberg", "lang": "en", "domain": "old", "role": "train"},
        {"name": "ntrex_vi", "lang": "vi", "domain": "new", "role": "eval"},
        {"name": "en_wikitext2", "lang": "en", "domain": "old", "role": "eval"},
        {"name": "xquad_en", "lang": "en", "domain": "old", "role": "eval"},
    ]},
    "gate": {"min_gain": 0.1, "max_forgetting": 0.05},
}
LANG = {"ntrex_vi": "vi", "heldout_vi": "vi", "en_wikitext2": "en", "xquad_en": "en"}


def score(bpb, nbytes=1000):
    return {"loss": bpb * 2, "ppl": 10.0, "bpb": bpb, "bytes": nbytes, "tokens": 300}


def eval_metrics(new_base=2.0, new_cpt=1.5, old_base=1.2, old_cpt=1.22, half=0.01, sources=None):
    """An eval.json: ntrex_vi + heldout_vi (new), en_wikitext2 (old); every interval +-``half`` around its value.
    ``sources``: {name: (base_bpb, cpt_bpb, nbytes)} overrides/extends."""
    table = {"ntrex_vi": (new_base, new_cpt, 1000), "heldout_vi": (new_base, new_cpt, 500),
             "en_wikitext2": (old_base, old_cpt, 1000), **(sources or {})}
    m = {"base": {}, "cpt": {}, "sources": {}, "gain": {}, "forgetting": {}, "gain_ci95": {}, "forgetting_ci95": {}}
    for name, (b, c, n) in table.items():
        new = LANG[name] == "vi"
        m["base"][name], m["cpt"][name] = score(b, n), score(c, n)
        kind, value = ("gain", b - c) if new else ("forgetting", c - b)
        m["sources"][name] = {"lang": LANG[name], "domain": "new" if new else "old", kind: value,
                              f"{kind}_ci95": [value - half, value + half]}
    for kind, domain in (("gain", "new"), ("forgetting", "old")):
        rows = [(m["base"][n]["bpb"], m["cpt"][n]["bpb"], m["base"][n]["bytes"]) for n, s in m["sources"].items()
                if s["domain"] == domain]
        b = sum(r[0] * r[2] for r in rows) / sum(r[2] for r in rows)
        c = sum(r[1] * r[2] for r in rows) / sum(r[2] for r in rows)
        lang = "vi" if domain == "new" else "en"
        value = b - c if kind == "gain" else c - b
        m[kind][lang], m[f"{kind}_ci95"][lang] = value, [value - half, value + half]
    return m


def test_promotes_when_every_source_and_language_is_within_budget():
    d = gate.decide(eval_metrics(), PARAMS)
    assert d["decision"] == "promote" and d["passed"] and not d["promoted"]  # promoted only once an alias is set
    assert set(d["per_source"]) == {"ntrex_vi", "heldout_vi", "en_wikitext2"} and set(d["per_lang"]) == {"vi", "en"}
    assert all(v["decision"] == "promote" for v in [*d["per_source"].values(), *d["per_lang"].values()])
    assert d["per_source"]["en_wikitext2"]["value"] == pytest.approx(0.02)
    assert d["vs_base"]["gain"] == pytest.approx(0.5)  # the pooled figure is kept, as information
    assert d["vs_champion"] == {"checked": False, "passed": True, "reasons": ["no champion yet"]}


def test_the_worst_source_decides_not_the_pooled_figure():
    # the demo's shape: WikiText-2 forgot 0.136 bpb, a bigger English set improved, the pooled figure looks fine
    m = eval_metrics(sources={"xquad_en": (3.28, 3.10, 3000)}, old_base=3.11, old_cpt=3.246)
    d = gate.decide(m, PARAMS)
    assert d["vs_base"]["forgetting"] < PARAMS["gate"]["max_forgetting"]  # pooled: would have passed
    assert d["decision"] == "refuse" and not d["passed"]
    assert d["per_source"]["en_wikitext2"]["decision"] == "refuse"
    assert d["per_source"]["xquad_en"]["decision"] == "promote"
    assert "en_wikitext2: forgetting +0.1360: upper bound +0.1460 > max_forgetting 0.05" in d["reason"]


def test_the_gate_decides_on_the_interval_bounds():
    # forgetting 0.04 is within 0.05, but its upper bound 0.07 is not, and the interval is narrower than the budget
    d = gate.decide(eval_metrics(old_cpt=1.24, half=0.02), PARAMS)
    assert d["per_source"]["en_wikitext2"]["decision"] == "refuse" and d["decision"] == "refuse"
    # gain 0.12 >= 0.1, but its lower bound 0.10 - 0.03 is not: the interval is wider than min_gain -> undecided
    d = gate.decide(eval_metrics(new_cpt=1.88, half=0.06), {**PARAMS, "gate": {"min_gain": 0.1, "max_forgetting": 1}})
    assert d["per_lang"]["vi"]["decision"] == "undecided" and d["decision"] == "undecided"
    assert "undecided: too little eval text" in d["per_lang"]["vi"]["reason"]


def test_too_little_eval_text_is_undecided_never_a_pass():
    d = gate.decide(eval_metrics(old_cpt=1.23, half=0.08), PARAMS)  # 0.03 +- 0.08: wider than the 0.05 budget
    v = d["per_source"]["en_wikitext2"]
    assert v["decision"] == "undecided" and v["ci95"] == pytest.approx([-0.05, 0.11])
    assert d["decision"] == "undecided" and not d["passed"]
    assert "undecided: too little eval text" in d["reason"]


def test_numbers_without_an_interval_are_undecided():
    m = eval_metrics()
    del m["sources"], m["gain_ci95"], m["forgetting_ci95"]
    d = gate.decide(m, PARAMS)
    assert d["decision"] == "undecided" and "no interval" in d["reason"]


def test_champion_must_be_beaten_too():
    m = eval_metrics(new_cpt=1.5)
    champ = {"version": "3", "sources": {
        "ntrex_vi": {"domain": "new", "bytes": 1000, "bpb": 1.45},
        "heldout_vi": {"domain": "new", "bytes": 500, "bpb": 1.45},
        "en_wikitext2": {"domain": "old", "bytes": 1000, "bpb": 1.22},
    }}
    d = gate.decide(m, PARAMS, champion=champ)
    assert d["per_source"]["ntrex_vi"]["decision"] == "promote" and d["decision"] == "refuse"
    assert d["vs_champion"]["checked"] and d["vs_champion"]["version"] == "3"
    assert d["vs_champion"]["gain"] == pytest.approx(-0.05)
    loose = {**PARAMS, "gate": {**PARAMS["gate"], "champion_min_gain": -0.1}}
    assert gate.decide(m, loose, champion=champ)["decision"] == "promote"


def test_a_champion_scored_on_other_text_is_never_skipped():
    champ = {"version": "1", "sources": {"ntrex_vi": {"domain": "new", "bytes": 999, "bpb": 0.1}}}
    d = gate.decide(eval_metrics(), PARAMS, champion=champ)
    assert d["decision"] == "refuse" and not d["passed"] and not d["vs_champion"]["checked"]
    assert "refusing to promote unchecked" in d["reason"]
    # re-scored on the candidate's eval set, it compares
    rescored = {n: {"domain": s["domain"], "bytes": s["bytes"], "bpb": s["cpt_bpb"] + 0.2}
                for n, s in d["sources"].items()}
    d = gate.decide(eval_metrics(), PARAMS, champion=champ, champion_scores=rescored)
    assert d["vs_champion"]["checked"] and d["vs_champion"]["how"] == "re-scored on this eval set"
    assert d["decision"] == "promote"


class _Registry(tracking.Tracker):
    """A registry whose champion was scored on other text; its model folder can (or cannot) be downloaded."""

    active = True
    model_name = "cpt"

    def __init__(self, folder=None):
        self.folder, self.aliases = folder, []

    def get_alias(self, name, alias):
        return {"version": "4", "run_id": "r", "sources": {"ntrex_vi": {"domain": "new", "bytes": 7, "bpb": 1.0}}}

    def download_model(self, champion):
        if self.folder is None:
            raise tracking.TrackingUnavailable("artifact store unreachable")
        return self.folder

    def register_model(self, path, tags=None, **kwargs):
        return "5"

    def set_alias(self, name, alias, version):
        self.aliases.append((alias, version))


def test_run_rescores_a_champion_it_cannot_compare(tmp_path):
    seen = []

    def rescore(folder):
        seen.append(folder)
        return {n: {"domain": d, "bytes": b, "bpb": bpb + 0.3} for n, d, b, bpb in
                [("ntrex_vi", "new", 1000, 1.5), ("heldout_vi", "new", 500, 1.5), ("en_wikitext2", "old", 1000, 1.22)]}

    registry = _Registry(tmp_path / "champion")
    d = gate.run(PARAMS, Layout(tmp_path), eval_metrics(), registry, rescore=rescore)
    assert seen == [tmp_path / "champion"]
    assert d["vs_champion"]["checked"] and d["promoted"] and registry.aliases == [("champion", "5")]
    on_disk = json.loads(Layout(tmp_path).metrics_file("gate").read_text())
    assert on_disk["decision"] == "promote" and on_disk["vs_champion"]["checked"]
    assert set(on_disk["per_source"]) == {"ntrex_vi", "heldout_vi", "en_wikitext2"}


def test_run_refuses_when_the_champion_cannot_be_rescored(tmp_path):
    registry = _Registry(None)
    d = gate.run(PARAMS, Layout(tmp_path), eval_metrics(), registry, rescore=lambda folder: {})
    assert d["decision"] == "refuse" and not d["promoted"] and registry.aliases == []
    assert not d["vs_champion"]["checked"]
    assert "artifact store unreachable" in d["reason"] and "refusing to promote unchecked" in d["reason"]


def test_missing_eval_keys_give_a_clear_reason_not_a_crash():
    d = gate.decide({"gain": {"vi": 0.3}}, PARAMS)
    assert d["decision"] == "refuse" and not d["passed"]
    assert any("no per-source 'base' block" in n for n in d["notes"])
    assert "no source scored by both base and cpt" in d["reason"]
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
    assert on_disk["passed"] and not on_disk["promoted"] and on_disk["decision"] == "promote"
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


def test_gate_section_of_the_report_is_rewritten_in_place(tmp_path):
    from cpt.ops import verdict

    report = tmp_path / "report.md"
    report.write_text(f"# r\n\n## Promotion gate\n\n{verdict.START}\n(pending)\n{verdict.END}\n\nafter\n")
    d = gate.decide(eval_metrics(old_cpt=1.3), PARAMS)
    assert verdict.write_into(report, d)
    text = report.read_text()
    assert "**Decision: refuse**" in text and "(pending)" not in text and text.endswith("after\n")
    # cpt's one sign: forgetting > 0 = forgotten (the report used "delta = -forgetting" here before)
    assert ("| source | en_wikitext2 | old | forgetting | +0.1000 | [+0.0900, +0.1100] | upper bound <= 0.05 | refuse |"
            in text)


def test_params_yaml_documents_the_code_defaults(repo_root):
    from cpt.params import load_params

    params = load_params(repo_root / "params.yaml")
    assert params["gate"] == gate.DEFAULTS
    assert params["tracking"] == tracking.DEFAULTS
