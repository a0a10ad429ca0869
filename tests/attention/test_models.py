"""dplr inside real models: tiny, randomly initialised transformers models, no downloads.

Each model runs twice on the same tokens: once with its own pure-torch
token recurrence in place of its chunked linear-attention function (the
definition, as the model library writes it) and once with dplr in that
place.  Everything else in the model is shared, so the logits agree to the
rounding of float32 in the two attention computations: 1e-4 relative (a
wrong head mapping, decay or state hand-over changes them at O(1)).

The replaced function normalises q and k with its own ``x / sqrt(|x|^2 + 1e-6)``;
the stand-ins below apply that same function first and call dplr without its
own normalisation, so that both runs compute the same layer.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import Qwen3NextConfig, Qwen3NextForCausalLM  # noqa: E402
from transformers.models.qwen3_next import modeling_qwen3_next as qwen  # noqa: E402
from transformers.utils import logging  # noqa: E402

import dplr  # noqa: E402

#: float32 logits of the two runs agree to this, relative to their largest entry.
RTOL = 1e-4
VOCAB = 64


@pytest.fixture(autouse=True)
def _quiet_fallback_warnings():
    """The library warns once that it falls back to its torch functions; that is the point."""
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    yield
    logging.set_verbosity(level)


def rel_err(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ------------------------------------------------------------------------ Qwen3-Next
def qwen3_next(key_heads: int, value_heads: int):
    """Two layers (gated delta rule, then softmax attention), a mixture of 4 experts."""
    config = Qwen3NextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        layer_types=["linear_attention", "full_attention"], num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, linear_num_key_heads=key_heads,
        linear_num_value_heads=value_heads, linear_key_head_dim=8, linear_value_head_dim=6,
        linear_conv_kernel_dim=4, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=16, shared_expert_intermediate_size=16, decoder_sparse_step=1,
        max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen3NextForCausalLM(config).eval()
    with torch.no_grad():  # decays spread over [e^-16, 1) per token, like trained gates
        for layer in model.model.layers:
            if hasattr(layer, "linear_attn"):
                layer.linear_attn.A_log.uniform_(-4.0, 2.0)
    return model


def dplr_stand_in(rule, l2norm, chunk_size):
    """A stand-in for a model's (gated or Kimi) delta attention functions, calling ``rule``."""

    def attention(query, key, value, g, beta, initial_state=None, output_final_state=False,
                  use_qk_l2norm_in_kernel=False, **kwargs):  # fmt: skip
        if use_qk_l2norm_in_kernel:
            query, key = l2norm(query), l2norm(key)
        return rule(
            query, key, value, g, beta, initial_state=initial_state,
            output_final_state=output_final_state, chunk_size=chunk_size,
        )  # fmt: skip

    return attention


def dplr_gated(chunk_size):
    """The Qwen3-Next stand-in: dplr.gated_delta_rule."""
    return dplr_stand_in(dplr.gated_delta_rule, qwen.l2norm, chunk_size)


def use_qwen_functions(monkeypatch, fn) -> None:
    """Route both the chunked (prefill) and the recurrent (decode) calls of the layer to fn."""
    monkeypatch.setattr(qwen, "torch_chunk_gated_delta_rule", fn)
    monkeypatch.setattr(qwen, "torch_recurrent_gated_delta_rule", fn)


def cached_logits(model, ids, steps: int):
    """Logits of a prefill of ``ids`` with a cache, then of ``steps`` cached one-token steps."""
    with torch.no_grad():
        out = model(ids, use_cache=True)
        logits, cache = [out.logits], out.past_key_values
        for t in range(steps):
            step = ((ids[:, -1:] + 7 * t + 1) % VOCAB).contiguous()
            out = model(step, cache=cache, use_cache=True)
            logits.append(out.logits)
            cache = out.past_key_values
    return logits


def qwen_logits(monkeypatch, model, fn, ids, steps: int):
    """:func:`cached_logits` with the Qwen3-Next layers calling ``fn``."""
    use_qwen_functions(monkeypatch, fn)
    return cached_logits(model, ids, steps)


@pytest.mark.parametrize(
    ("heads", "length", "chunk_size"),
    [
        ((2, 2), 21, None),
        ((2, 2), 21, 8),
        ((2, 2), 80, None),
        ((2, 4), 21, None),
        ((2, 4), 80, None),
    ],
)
def test_qwen3_next_logits(monkeypatch, heads, length, chunk_size):
    """Prefill (the recurrence or the chunked algorithm, chosen or forced) and 3 decode steps.

    ``heads`` = (key heads, value heads): (2, 4) is grouped, each key head
    serving two value heads, as in the released model.
    """
    model = qwen3_next(*heads)
    ids = torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(1))
    want = qwen_logits(monkeypatch, model, qwen.torch_recurrent_gated_delta_rule, ids, 3)
    got = qwen_logits(monkeypatch, model, dplr_gated(chunk_size), ids, 3)
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        assert rel_err(a, b) < RTOL, f"step {step}"


def test_qwen3_next_stand_in_is_called(monkeypatch):
    """The layer really calls the replaced function (else the comparison proves nothing)."""
    model = qwen3_next(2, 2)
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        o, s = dplr_gated(None)(*args, **kwargs)
        return 2 * o, s

    want = qwen_logits(monkeypatch, model, qwen.torch_recurrent_gated_delta_rule,
                       torch.arange(10)[None], 1)  # fmt: skip
    got = qwen_logits(monkeypatch, model, broken, torch.arange(10)[None], 1)
    assert len(calls) == 2
    assert rel_err(got[0], want[0]) > 100 * RTOL


# ------------------------------------------------------------------------ Kimi Linear
def kimi_linear():
    """Two layers (Kimi delta attention, then latent softmax attention), dense then MoE MLP."""
    from transformers import KimiLinearConfig, KimiLinearForCausalLM

    config = KimiLinearConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        layer_types=["linear_attention", "full_attention"], mlp_layer_types=["dense", "sparse"],
        num_attention_heads=2, num_key_value_heads=2, head_dim=16, kv_lora_rank=16,
        q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
        linear_num_heads=2, linear_head_dim=8, linear_conv_kernel_dim=4, num_experts=4,
        num_experts_per_token=2, moe_intermediate_size=16, num_shared_experts=1,
        max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = KimiLinearForCausalLM(config).eval()
    with torch.no_grad():  # per-channel log decays from about -10 to -0.01 per token
        gate = model.model.layers[0].self_attn.forget_gate
        gate.dt_bias.uniform_(-4.0, 2.0)
        gate.A_log.uniform_(-1.0, 1.5)
    return model


def use_kimi_functions(monkeypatch, fn) -> None:
    from transformers.models.kimi_linear import modeling_kimi_linear as kimi

    monkeypatch.setattr(kimi, "chunk_kimi_delta_attention", fn)
    monkeypatch.setattr(kimi, "recurrent_kimi_delta_attention", fn)


def dplr_channel_recurrence(query, key, value, g, beta, initial_state=None,
                            output_final_state=False, use_qk_l2norm_in_kernel=False,
                            **kwargs):  # fmt: skip
    """KDA (one decay per key channel) by dplr's compiled token recurrence."""
    from transformers.models.kimi_linear import modeling_kimi_linear as kimi

    from dplr.attention._recurrent import recurrent_forward

    if use_qk_l2norm_in_kernel:
        query, key = kimi.l2norm(query), kimi.l2norm(key)
    o, s = recurrent_forward(True, query, key, value, beta, g, initial_state, None,
                             query.shape[-1] ** -0.5, False)  # fmt: skip
    return o, (s if output_final_state else None)


def dplr_kda(chunk_size):
    """The Kimi Linear stand-in: dplr.kda."""
    from transformers.models.kimi_linear import modeling_kimi_linear as kimi

    return dplr_stand_in(dplr.kda, kimi.l2norm, chunk_size)


def kimi_logits(monkeypatch, model, fn, ids, steps: int):
    """:func:`cached_logits` with the Kimi Linear layers calling ``fn``."""
    use_kimi_functions(monkeypatch, fn)
    return cached_logits(model, ids, steps)


def test_kimi_linear_logits_channel_decay(monkeypatch):
    """Prefill of 21 tokens and 3 cached decode steps with per-channel decay."""
    from transformers.models.kimi_linear import modeling_kimi_linear as kimi

    model = kimi_linear()
    ids = torch.randint(0, VOCAB, (2, 21), generator=torch.Generator().manual_seed(2))
    want = kimi_logits(monkeypatch, model, kimi.recurrent_kimi_delta_attention, ids, 3)
    got = kimi_logits(monkeypatch, model, dplr_channel_recurrence, ids, 3)
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        assert rel_err(a, b) < RTOL, f"step {step}"


@pytest.mark.parametrize(("length", "chunk_size"), [(21, None), (21, 8), (80, None), (80, 16)])
def test_kimi_linear_logits_with_dplr_kda(monkeypatch, length, chunk_size):
    """dplr.kda in place of the model's KDA functions: prefill (the compiled
    recurrence, or the chunked algorithm when a chunk size is given) and 3
    cached decode steps, against the model's own token recurrence, with
    per-channel decays down to about e^-10 per token."""
    from transformers.models.kimi_linear import modeling_kimi_linear as kimi

    model = kimi_linear()
    ids = torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(3))
    want = kimi_logits(monkeypatch, model, kimi.recurrent_kimi_delta_attention, ids, 3)
    got = kimi_logits(monkeypatch, model, dplr_kda(chunk_size), ids, 3)
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        assert rel_err(a, b) < RTOL, f"step {step}"
