"""Real base families on tiny locally built models: the fused loss equals the model's own loss (logit scaling
included), tied-head calibration leaves the input rows alone, MFU counts N the PaLM way, fp16 training is refused."""

import pytest
import torch
import torch.nn.functional as F

from cpt.training.loss import CausalLMLoss

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def _model(family: str):
    from transformers import CohereConfig, CohereForCausalLM, GraniteConfig, GraniteForCausalLM, LlamaConfig, \
        LlamaForCausalLM

    torch.manual_seed(0)
    if family == "llama_tied":
        return LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=True))
    if family == "granite":
        return GraniteForCausalLM(GraniteConfig(**SMALL, logits_scaling=4.0, embedding_multiplier=3.0,
                                                residual_multiplier=0.5, attention_multiplier=0.3))
    if family == "cohere":
        return CohereForCausalLM(CohereConfig(**SMALL, logit_scale=0.0625, tie_word_embeddings=True))
    raise ValueError(family)


@pytest.mark.parametrize("family", ["llama_tied", "granite", "cohere"])
def test_fused_loss_equals_the_models_own_loss(family, one_torch_thread):
    model = _model(family).eval()
    x = torch.randint(0, 96, (2, 16))
    y = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        ref = F.cross_entropy(model(input_ids=x).logits.flatten(0, 1).float(), y.flatten(), reduction="none")
        core = CausalLMLoss(model, chunk_size=7)
        assert core.fused  # the fast path, not the logits fallback
        total, losses = core(x, y)
    torch.testing.assert_close(losses.flatten(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(total, ref.sum(), rtol=1e-5, atol=1e-4)


def test_tied_head_calibration_leaves_the_input_rows_at_their_init(one_torch_thread):
    from cpt.training.embeddings import calibrate_new_logits

    model = _model("llama_tied")
    base_vocab = 64  # rows 64..95 play the new tokens
    before = model.get_input_embeddings().weight.detach().clone()
    blocks = torch.randint(0, base_vocab, (2, 16))
    report = calibrate_new_logits(model, blocks, base_vocab, target_mass=0.01)
    assert torch.equal(model.get_input_embeddings().weight, before)  # not one input row moved
    assert report["new_logit_shift"] == 0.0 and "tied" in report["calibration_skipped"]


@pytest.mark.parametrize("tied", [True, False])
def test_mfu_counts_non_embedding_parameters_plus_the_head(tied):
    from cpt.training import flops
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=tied))
    total = flops.count_params(model)
    rows = SMALL["vocab_size"] * SMALL["hidden_size"]
    # PaLM convention: the input embedding is a lookup (not counted), the lm_head a matmul (counted, tied or not)
    assert flops.matmul_params(model) == (total if tied else total - rows)


def test_fp16_training_is_refused_without_a_grad_scaler():
    from cpt.errors import ConfigError
    from cpt.stages import train

    with pytest.raises(ConfigError, match="fp16"):
        train.config({"train": {"dtype": "fp16"}})
