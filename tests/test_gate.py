"""The promotion gate's decision logic (pure; the registry side is covered in test_tracking / test_flows_servers).

Sign convention of eval.json: gain = bpb(base) - bpb(cpt) (new domain), forgetting = bpb(cpt) - bpb(base) (old
domain), each with a bootstrap 95% interval (``gain_ci95`` / ``forgetting_ci95``)."""

import json
import math

import pytest

from cpt.evaluation import record
from cpt.io import write_json
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


def eval_metrics(new_base=2.0, new_cpt=1.5, old_base=1.2, old_cpt=1.22, half=0.01, sources=None, documents=10):
    """An eval.json: ntrex_vi + heldout_vi (new), en_wikitext2 (old); every interval +-``half`` around its value,
    resampled over ``documents`` documents per source. ``sources``: {name: (base_bpb, cpt_bpb, nbytes)}."""
    table = {"ntrex_vi": (new_base, new_cpt, 1000), "heldout_vi": (new_base, new_cpt, 500),
             "en_wikitext2": (old_base, old_cpt, 1000), **(sources or {})}
    m = {"base": {}, "cpt": {}, "sources": {}, "gain": {}, "forgetting": {}, "gain_ci95": {}, "forgetting_ci95": {}}
    for name, (b, c, n) in table.items():
        new = LANG[name] == "vi"
        m["base"][name], m["cpt"][name] = score(b, n), score(c, n)
        kind, value = ("gain", b - c) if new else ("forgetting", c - b)
        m["sources"][name] = {"lang": LANG[name], "domain": "new" if new else "old", kind: value,
                              f"{kind}_ci95": [value - half, value + half], "documents": documents}
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
    assert d["vs_champion"] == {"checked": False, "passed": True, "decision": "promote", "reasons": ["no champion yet"]}
    assert [c["decision"] for c in d["checks"]] == ["promote"] * 5  # 3 sources + 2 languages, one list of checks


def test_the_worst_source_decides_not_the_pooled_figure():
    # the demo's shape: WikiText-2 forgot 0.136 bpb, a bigger English set improved, the pooled figure looks fine
    m = eval_metrics(sources={"xquad_en": (3.28, 3.10, 3000)}, old_base=3.11, old_cpt=3.246)
    d = gate.decide(m, PARAMS)
    assert d["vs_base"]["forgetting"] < PARAMS["gate"]["max_forgetting"]  # pooled: would have passed
    assert d["decision"] == "refuse" and not d["passed"]
    assert d["per_source"]["en_wikitext2"]["decision"] == "refuse"
    assert d["per_source"]["xquad_en"]["decision"] == "promote"
    assert ("vs base: source en_wikitext2: forgetting +0.1360, 95% interval [+0.1260, +0.1460]: wholly above "
            "max_forgetting 0.05") in d["reason"]


def test_the_gate_decides_on_the_interval_bounds():
    # forgetting 0.04 is within 0.05, but its interval [0.02, 0.06] straddles it: undecided, never a pass
    d = gate.decide(eval_metrics(old_cpt=1.24, half=0.02), PARAMS)
    assert d["per_source"]["en_wikitext2"]["decision"] == "undecided" and d["decision"] == "undecided"
    assert "straddles max_forgetting 0.05" in d["per_source"]["en_wikitext2"]["reason"]
    # gain 0.12 >= 0.1, but its lower bound 0.06 is not: undecided
    d = gate.decide(eval_metrics(new_cpt=1.88, half=0.06), {**PARAMS, "gate": {"min_gain": 0.1, "max_forgetting": 1}})
    assert d["per_lang"]["vi"]["decision"] == "undecided" and d["decision"] == "undecided"
    # the whole interval above the budget: refused, however wide it is
    d = gate.decide(eval_metrics(old_cpt=1.60, half=0.1), PARAMS)
    assert d["per_source"]["en_wikitext2"]["decision"] == "refuse" and d["decision"] == "refuse"


def test_an_interval_that_straddles_its_budget_is_undecided_never_a_pass():
    d = gate.decide(eval_metrics(old_cpt=1.23, half=0.08), PARAMS)  # 0.03 +- 0.08 straddles the 0.05 budget
    v = d["per_source"]["en_wikitext2"]
    assert v["decision"] == "undecided" and v["ci95"] == pytest.approx([-0.05, 0.11])
    assert d["decision"] == "undecided" and not d["passed"]
    assert "undecided: forgetting +0.0300, 95% interval [-0.0500, +0.1100] straddles max_forgetting 0.05" in d["reason"]


def test_numbers_without_an_interval_are_undecided():
    m = eval_metrics()
    del m["sources"], m["gain_ci95"], m["forgetting_ci95"]
    d = gate.decide(m, PARAMS)
    assert d["decision"] == "undecided" and "no interval" in d["reason"]


CFG = {"scorer": 2, "max_length": 1024, "stride": 768, "batch_size": 8, "unit_bytes": 4096, "device": "cpu",
       "dtype": "fp32"}


def records(shift=None, config=CFG, units=20):
    """Per-unit records (cpt.evaluation.record) of the sources of ``eval_metrics``: ``units`` units of 100 bytes, two
    per document, bpb = the source's cpt bpb + a little per-unit spread + ``shift[name]``."""
    table = {"ntrex_vi": ("new", "vi", 1.5), "heldout_vi": ("new", "vi", 1.5), "en_wikitext2": ("old", "en", 1.22)}
    out = {}
    for name, (domain, lang, bpb) in table.items():
        unit_bpb = [bpb + 0.01 * ((i * 7) % 5 - 2) + (shift or {}).get(name, 0.0) for i in range(units)]
        out[name] = record.entry(name, lang, domain, [f"{name} text {i}" for i in range(units)],
                                 [i // 2 for i in range(units)], [b * math.log(2) * 100 for b in unit_bpb],
                                 [100] * units, config)
    return out


def test_champion_must_be_beaten_too_source_by_source():
    m = eval_metrics(new_cpt=1.5)
    champ = {"version": "3", "sources": records({"ntrex_vi": -0.05, "heldout_vi": -0.05})}  # the champion: 0.05 better
    d = gate.decide(m, PARAMS, champion=champ, candidate=records())
    assert d["per_source"]["ntrex_vi"]["decision"] == "promote" and d["decision"] == "refuse"
    c = d["vs_champion"]
    assert c["checked"] and c["version"] == "3" and c["how"].startswith("its stored per-unit scores")
    assert c["gain"] == pytest.approx(-0.05) and c["per_source"]["ntrex_vi"]["value"] == pytest.approx(-0.05)
    assert c["per_source"]["ntrex_vi"]["decision"] == "refuse" and c["per_source"]["ntrex_vi"]["documents"] == 10
    assert c["per_lang"]["vi"]["ci95"] == pytest.approx([-0.05, -0.05])  # paired: the shared spread cancels
    assert "vs champion v3: source ntrex_vi: gain -0.0500" in d["reason"]
    loose = {**PARAMS, "gate": {**PARAMS["gate"], "champion_min_gain": -0.1}}
    assert gate.decide(m, loose, champion=champ, candidate=records())["decision"] == "promote"


def test_a_champion_scored_on_other_text_is_never_skipped():
    legacy = {"version": "1", "sources": {"ntrex_vi": {"domain": "new", "bytes": 2000, "bpb": 0.1}}}
    d = gate.decide(eval_metrics(), PARAMS, champion=legacy, candidate=records())
    assert d["decision"] == "refuse" and not d["passed"] and not d["vs_champion"]["checked"]
    assert "refusing to promote unchecked" in d["reason"]
    # re-scored on the candidate's units, it compares
    rescored = records({n: 0.2 for n in ("ntrex_vi", "heldout_vi")})
    d = gate.decide(eval_metrics(), PARAMS, champion=legacy, champion_scores=rescored, candidate=records())
    assert d["vs_champion"]["checked"] and d["vs_champion"]["how"] == "re-scored on this eval set"
    assert d["decision"] == "promote"


def test_stored_champion_scores_count_only_under_the_same_content_hash_not_the_same_bytes():
    # same sources, same byte counts; another window (max_length/stride) or other text of the same length: the
    # stored numbers are another measurement (the old gate compared byte counts only and reused them)
    for other in (records(config={**CFG, "max_length": 512, "stride": 256}), records(config={**CFG, "dtype": "bf16"})):
        assert all(other[n]["bytes"] == records()[n]["bytes"] for n in other)
        ok, why = record.matches(records(), other)
        assert not ok and "content hash differs" in why
        d = gate.decide(eval_metrics(), PARAMS, champion={"version": "2", "sources": other}, candidate=records())
        assert not d["vs_champion"]["checked"] and d["decision"] == "refuse"
    swapped = records()
    swapped["en_wikitext2"] = record.entry("en_wikitext2", "en", "old", [f"other text {i:2d}" for i in range(20)],
                                           [i // 2 for i in range(20)], swapped["en_wikitext2"]["units"]["nll"],
                                           [100] * 20, CFG)
    assert not record.matches(records(), swapped)[0]
    assert record.matches(records(), records())[0]


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
        self.folder.mkdir(parents=True)  # a fresh copy, as MlflowTracker.download_model makes one
        (self.folder / "model.safetensors").write_bytes(b"\0" * 1024)
        return self.folder

    def register_model(self, path, tags=None, **kwargs):
        return "5"

    def set_alias(self, name, alias, version):
        self.aliases.append((alias, version))


def test_run_rescores_a_champion_it_cannot_compare_and_deletes_the_copy(tmp_path):
    seen = []

    def rescore(folder):
        seen.append((folder, folder.exists()))
        return records({n: 0.3 for n in ("ntrex_vi", "heldout_vi")})

    layout = Layout(tmp_path)
    write_json(gate.sources_path(layout), records())  # what the eval stage writes
    registry = _Registry(tmp_path / "cpt-champion-v4-x" / "model")
    d = gate.run(PARAMS, layout, eval_metrics(), registry, rescore=rescore)
    assert seen == [(tmp_path / "cpt-champion-v4-x" / "model", True)]
    assert not (tmp_path / "cpt-champion-v4-x").exists()  # the downloaded champion is deleted after use
    assert d["vs_champion"]["checked"] and d["promoted"] and registry.aliases == [("champion", "5")]
    on_disk = json.loads(layout.metrics_file("gate").read_text())
    assert on_disk["decision"] == "promote" and on_disk["vs_champion"]["checked"]
    assert set(on_disk["per_source"]) == {"ntrex_vi", "heldout_vi", "en_wikitext2"}
    assert set(on_disk["vs_champion"]["per_source"]) == {"ntrex_vi", "heldout_vi", "en_wikitext2"}


def test_run_refuses_when_the_champion_cannot_be_rescored(tmp_path):
    layout = Layout(tmp_path)
    write_json(gate.sources_path(layout), records())
    registry = _Registry(None)
    d = gate.run(PARAMS, layout, eval_metrics(), registry, rescore=lambda folder: {})
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
    assert ("| source | en_wikitext2 | old | forgetting | +0.1000 | [+0.0900, +0.1100] | 10 | upper bound <= 0.05 "
            "| refuse |" in text)


def test_params_yaml_documents_the_code_defaults(repo_root):
    from cpt.params import load_params

    params = load_params(repo_root / "params.yaml")
    assert params["gate"] == gate.DEFAULTS
    assert params["tracking"] == tracking.DEFAULTS
