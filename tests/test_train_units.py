"""Unit tests of the train stage's building blocks: replay sampler, shard reading, fused loss, embeddings init,
LR phases, optimizer groups."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cpt.errors import ConfigError, DataError
from cpt.training.data import ReplaySampler, ShardSplit, open_shards
from cpt.training.embeddings import extend_embeddings, is_tied
from cpt.training.loss import CausalLMLoss, linear_cross_entropy


def _split(name: str, n_blocks: int, block: int = 5, offset: int = 0) -> ShardSplit:
    arr = (np.arange(n_blocks * block) + offset).astype(np.uint32).reshape(n_blocks, block)
    return ShardSplit(name, None, arr, n_blocks * block, n_blocks * block * 3)  # type: ignore[arg-type]


# ---- data ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.3, 0.5, 1.0])
def test_replay_ratio_holds_in_every_step(ratio):
    s = ReplaySampler(_split("new", 7), _split("old", 5, offset=10_000), ratio, seed=1)
    batch = 8
    for step in range(20):
        _, is_old = s.batch(step * batch, batch)
        assert math.floor(batch * ratio) <= int(is_old.sum()) <= math.ceil(batch * ratio)
    _, is_old = s.batch(0, 1000)
    assert int(is_old.sum()) == math.floor(1000 * ratio)


def test_sampler_is_deterministic_covers_each_epoch_and_reads_the_right_domain():
    new, old = _split("new", 7), _split("old", 5, offset=10_000)
    a = ReplaySampler(new, old, 0.25, seed=3)
    b = ReplaySampler(new, old, 0.25, seed=3)
    blocks_a, is_old = a.batch(0, 28)
    blocks_b, _ = b.batch(0, 28)
    assert torch.equal(blocks_a, blocks_b)
    # any later window equals the same window read from a fresh sampler: the position is one integer
    assert torch.equal(ReplaySampler(new, old, 0.25, seed=3).batch(13, 5)[0], blocks_a[13:18])
    assert (blocks_a[is_old] >= 10_000).all() and (blocks_a[~is_old] < 10_000).all()
    # 21 new samples = 3 epochs of 7 blocks: each epoch is a permutation of all blocks
    new_rows = blocks_a[~is_old][:, 0].tolist()
    for e in range(3):
        assert sorted(new_rows[7 * e : 7 * e + 7]) == [5 * i for i in range(7)]
    assert ReplaySampler(new, old, 0.25, seed=4).batch(0, 28)[0].tolist() != blocks_a.tolist()


def test_sampler_refuses_missing_replay_data():
    with pytest.raises(DataError, match="old/train has no blocks"):
        ReplaySampler(_split("new", 3), None, 0.25, seed=0)
    ReplaySampler(_split("new", 3), None, 0.0, seed=0)  # no replay: no old data needed


def test_open_shards_checks_the_contract(tmp_path):
    (tmp_path / "new").mkdir()
    np.arange(12, dtype="<u2").tofile(tmp_path / "new" / "train.bin")
    meta = {"dtype": "uint16", "block_size": 4, "vocab_size": 50, "eos_id": 0,
            "splits": {"new/train": {"tokens": 12, "blocks": 3, "bytes": 30}}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    shards = open_shards(tmp_path)
    split = shards.split("new/train")
    assert split.n_blocks == 3 and split.rows(np.array([2])).tolist() == [[8, 9, 10, 11]]
    assert split.bytes_per_token == 2.5
    np.arange(10, dtype="<u2").tofile(tmp_path / "new" / "train.bin")
    with pytest.raises(DataError, match="not a whole number of 4-token blocks"):
        open_shards(tmp_path)
    np.arange(12, dtype="<u2").tofile(tmp_path / "new" / "train.bin")
    meta["splits"]["old/val"] = {"tokens": 0}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="old/val.bin: listed in"):
        open_shards(tmp_path)


# ---- loss ----------------------------------------------------------------------------------------------------------

def test_linear_cross_entropy_matches_full_logits_in_value_and_gradient():
    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (37,))
    total, per_token = linear_cross_entropy(h, w, t, chunk_size=8)  # 5 chunks, the last one short
    (total * 0.5).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy(h @ w.t(), t, reduction="none")
    (ref.sum() * 0.5).backward()
    torch.testing.assert_close(per_token, ref.detach())
    torch.testing.assert_close(total, ref.sum().detach())
    torch.testing.assert_close(gh, h.grad)
    torch.testing.assert_close(gw, w.grad)


@pytest.mark.parametrize("tied", [False, True])
def test_causal_lm_loss_equals_hf_loss(tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied))
    x = torch.randint(0, 96, (3, 9))
    core = CausalLMLoss(model, chunk_size=10)
    assert core.fused
    total, per_token = core(x[:, :-1], x[:, 1:])
    total.backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(input_ids=x[:, :-1]).logits  # the model's own full-logits path
    ref = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
    (ref * x[:, 1:].numel()).backward()
    torch.testing.assert_close(total / per_token.numel(), ref)
    for n, p in model.named_parameters():
        torch.testing.assert_close(fused_grads[n], p.grad, atol=1e-5, rtol=1e-4)


# ---- embeddings ----------------------------------------------------------------------------------------------------

def _model(tied: bool, vocab: int = 100):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied))


NEW = {"base_vocab": 100, "vocab": 103, "added": [
    {"id": 100, "piece": "ab", "text": "ab", "base_ids": [3, 7]},
    {"id": 101, "piece": "c", "text": "c", "base_ids": [42]},
    {"id": 102, "piece": "?", "text": "?", "base_ids": []},  # nothing usable: falls back to the mean
]}


@pytest.mark.parametrize("tied", [False, True])
def test_subtoken_mean_init_pads_to_64_and_keeps_old_rows(tied):
    model = _model(tied)
    emb0 = model.get_input_embeddings().weight.detach().clone()
    head0 = model.get_output_embeddings().weight.detach().clone()
    report = extend_embeddings(model, NEW, "subtoken_mean")
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    assert emb.shape[0] == 128 and head.shape[0] == 128 and model.config.vocab_size == 128
    assert is_tied(model) == tied and report["tied"] == tied and report["init_fallback"] == 1
    assert torch.equal(emb[:100], emb0) and torch.equal(head[:100], head0)
    torch.testing.assert_close(emb[100], emb0[[3, 7]].mean(0))
    torch.testing.assert_close(emb[101], emb0[42])
    torch.testing.assert_close(emb[102], emb0.mean(0))
    torch.testing.assert_close(emb[127], emb0.mean(0))  # padding row
    if not tied:  # the untied head gets its own subtoken means, from its own rows
        torch.testing.assert_close(head[100], head0[[3, 7]].mean(0))
        assert not torch.equal(head[100], emb[100])


def test_untied_head_reinitialised_by_resize_is_restored(monkeypatch):
    """The known bug class: a resize that re-initialises the untied head's old rows. We simulate it and check that
    extend_embeddings notices and restores them."""
    model = _model(tied=False)
    head0 = model.get_output_embeddings().weight.detach().clone()
    original = type(model).resize_token_embeddings

    def buggy(self, *a, **k):
        out = original(self, *a, **k)
        torch.nn.init.normal_(self.get_output_embeddings().weight)
        return out

    monkeypatch.setattr(type(model), "resize_token_embeddings", buggy)
    report = extend_embeddings(model, NEW, "subtoken_mean")
    assert report["old_rows_restored"]
    assert torch.equal(model.get_output_embeddings().weight[:100], head0)


def test_mean_and_random_inits_and_bad_ids():
    m = _model(False)
    emb0 = m.get_input_embeddings().weight.detach().clone()
    extend_embeddings(m, NEW, "mean")
    torch.testing.assert_close(m.get_input_embeddings().weight[100], emb0.mean(0))
    r1, r2 = _model(False), _model(False)
    extend_embeddings(r1, NEW, "random", seed=5)
    extend_embeddings(r2, NEW, "random", seed=5)
    assert torch.equal(r1.get_input_embeddings().weight, r2.get_input_embeddings().weight)
    with pytest.raises(ConfigError):
        extend_embeddings(_model(False), NEW, "zeros")
    with pytest.raises(DataError, match="outside"):
        extend_embeddings(_model(False), {**NEW, "added": [{"id": 5, "base_ids": [1]}]})


# ---- schedule phases and optimizer groups --------------------------------------------------------------------------

def test_lr_phases_and_config_validation():
    from cpt.stages.train import config
    from cpt.training.schedule import lr_for

    cfg = config({"train": {"steps": 100, "lr": 1.0, "min_lr": 0.1, "warmup": 0.1, "embed_only_steps": 20}})
    lrs = [lr_for(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)  # phase 1: 2 warmup steps of 20
    assert lrs[19] < 0.2  # phase 1 decays to min_lr before the full model starts
    assert lrs[20] == pytest.approx(1.0 / 8) and lrs[27] == pytest.approx(1.0)  # phase 2 re-warms over 8 steps
    assert lrs[99] == pytest.approx(0.1, abs=1e-3)
    wsd = config({"train": {"steps": 100, "lr": 1.0, "min_lr": 0.0, "warmup": 0.0, "schedule": "wsd",
                            "decay_fraction": 0.2}})
    assert lr_for(79, wsd) == 1.0 and lr_for(90, wsd) == pytest.approx(0.5)
    for bad in ({"replay_ratio": 1.5}, {"steps": 0}, {"schedule": "linear"}, {"lr_typo": 1}, {"min_lr": 5.0}):
        with pytest.raises(ConfigError):
            config({"train": bad})


def test_embed_only_phase_leaves_the_body_exactly_unchanged():
    from cpt.training.optim import EMBED, build_optimizer, set_lr
    from cpt.training.step import train_step

    model = _model(False)
    core = CausalLMLoss(model)
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), embed_lr_mult=0.5)
    set_lr(opt, 1e-2)
    assert {g["name"]: g["lr"] for g in opt.param_groups}[EMBED] == pytest.approx(5e-3)
    body0 = {n: p.detach().clone() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n}
    emb0 = model.get_input_embeddings().weight.detach().clone()
    x = torch.randint(0, 100, (2, 9))
    clip = [p for g in opt.param_groups for p in g["params"]]
    train_step(core, opt, [(x[:, :-1], x[:, 1:])], device=torch.device("cpu"), amp_dtype=None, grad_clip=1.0,
               clip_params=clip, embed_only=True)
    for n, p in model.named_parameters():
        if n in body0:
            assert torch.equal(p, body0[n]), n
            assert not opt.state.get(p), n  # no Adam moments either
    assert not torch.equal(model.get_input_embeddings().weight, emb0)


def test_params_yaml_train_section_equals_the_code_defaults(repo_root):
    from cpt.params import load_params
    from cpt.stages.train import DEFAULTS, config

    assert config(load_params(repo_root / "params.yaml")) == DEFAULTS


def test_training_path_imports_without_the_data_and_ops_stack():
    """The GPU box has only torch + transformers + tokenizers + sentencepiece + safetensors + numpy + pyyaml + tqdm.
    (transformers itself is imported lazily in the stage; blocking its optional extras here would only test how
    transformers reacts to a package that is installed but refuses to import.)"""
    from training_stack import run_without_data_and_ops_stack

    proc = run_without_data_and_ops_stack(
        "import cpt.stages.train, cpt.training.checkpoint, cpt.training.distributed, cpt.training.flops\n"
        "import cpt.stages.sft, cpt.sft.pipeline\nprint('ok')\n"  # the sft stage runs on the GPU box too
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_calibration_caps_the_new_rows_mass_and_keeps_their_order():
    from cpt.training.embeddings import calibrate_new_logits

    model = _model(False)
    # a "trained" base: 60 steps on text that never uses ids 70..99, so it learns never to predict them
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        batch = torch.randint(0, 70, (8, 17), generator=gen)
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    x = torch.randint(0, 70, (4, 16), generator=gen)
    extend_embeddings(model, {"base_vocab": 100, "vocab": 160,
                              "added": [{"id": 100 + i, "base_ids": [i, i + 1]} for i in range(60)]})
    head0 = model.lm_head.weight.detach().clone()

    @torch.no_grad()
    def new_share():
        logits = model(input_ids=x).logits
        return float(torch.softmax(logits, -1)[..., 100:].sum(-1).mean()), logits[..., 100:160].argsort(-1)

    share0, order0 = new_share()
    report = calibrate_new_logits(model, x, base_vocab=100, target_mass=0.01)
    share1, order1 = new_share()
    assert share0 > 0.2 and report["new_mass_before"] == pytest.approx(share0, rel=1e-4)
    assert share1 <= 0.0101 and report["new_logit_shift"] > 0
    assert torch.equal(model.lm_head.weight[:100], head0[:100])  # old rows untouched
    assert torch.equal(order0, order1)  # at every position the new tokens keep their order among themselves
