"""HookRegistry on the bundled model, both backends."""

import numpy as np
import pytest

from ellm import HookRegistry, ops

from conftest import BACKENDS


def capture(model, names, ids):
    reg = HookRegistry()
    seen = {}
    for n in names:
        reg.register_hook(n, lambda name, t, layer: seen.setdefault(name, (t, layer)))
    model.set_hook_registry(reg)
    try:
        logits = model.forward(ids)
    finally:
        model.set_hook_registry(None)
    return seen, logits


@pytest.mark.parametrize("b", BACKENDS)
def test_layer0_and_final_norm_match_golden(models, golden, b):
    for i in range(4):
        ids = [golden[f"case{i}_input_ids"].tolist()]
        seen, logits = capture(models[b], ["layer0_output", "final_norm", "logits"], ids)
        assert seen["layer0_output"][1] == 0 and seen["final_norm"][1] == -1
        assert np.abs(seen["layer0_output"][0][0] - golden[f"case{i}_hidden_layer0"]).max() < 1e-3
        assert np.abs(seen["final_norm"][0][0] - golden[f"case{i}_hidden_final_norm"]).max() < 1e-3
        np.testing.assert_array_equal(seen["logits"][0], logits)


@pytest.mark.parametrize("b", BACKENDS)
def test_q_after_proj_is_layernorm_times_q_proj(models, state_dict, golden, b):
    ids = [golden["case0_input_ids"].tolist()]
    seen, _ = capture(models[b], ["layer0_input_layernorm", "layer0_q_after_proj"], ids)
    xn = seen["layer0_input_layernorm"][0]
    q = seen["layer0_q_after_proj"][0]
    assert q.shape == (1, len(ids[0]), 9, 64)
    by_hand = ops.linear(xn, state_dict["model.layers.0.self_attn.q_proj.weight"]).reshape(q.shape)
    assert np.abs(by_hand - q).max() < 1e-4


def test_backends_agree_and_every_point_fires(models, golden):
    ids = [golden["case0_input_ids"].tolist()]
    got = {}
    for b in BACKENDS:
        got[b], _ = capture(models[b], ["*"], ids)
        assert set(got[b]) == set(models[b].hook_points())
    for name, (t, layer) in got["rust"].items():
        ref, ref_layer = got["numpy"][name]
        assert t.shape == ref.shape and layer == ref_layer, name
        assert np.abs(t - ref).max() < 1e-2 * max(1.0, np.abs(ref).max()), name


def test_patterns_order_replacement_removal():
    reg = HookRegistry()
    calls = []
    reg.register_hook("layer0_*", lambda n, t, i: calls.append(("a", n)))
    reg.register_hook("layer*_attention_output", lambda n, t, i: calls.append(("b", n)))
    reg.call_hook("layer0_attention_output", np.zeros(1), 0)
    assert calls == [("a", "layer0_attention_output"), ("b", "layer0_attention_output")]
    calls.clear()
    reg.register_hook("layer0_*", lambda n, t, i: calls.append(("c", n)))
    reg.call_hook("layer0_output", np.zeros(1), 0)
    assert calls == [("c", "layer0_output")]
    assert reg.remove_hook("layer0_*") and not reg.remove_hook("layer0_*")
    assert reg.names() == ["layer*_attention_output"] and reg.has_hooks()
    reg.clear()
    assert not reg.has_hooks()
    with pytest.raises(TypeError):
        reg.register_hook("x", 42)


@pytest.mark.parametrize("b", BACKENDS)
def test_raising_callback_reaches_the_caller_and_model_keeps_working(models, golden, b):
    m = models[b]
    ids = [golden["case0_input_ids"].tolist()]
    expected = m.forward(ids)

    class Boom(Exception):
        pass

    def explode(name, t, layer):
        raise Boom(f"stop at {name}")

    reg = HookRegistry()
    reg.register_hook("layer3_mlp_output", explode)
    m.set_hook_registry(reg)
    try:
        with pytest.raises(Boom, match="stop at layer3_mlp_output") as info:
            m.generate(ids, 4, temperature=0)
        assert "explode" in str(info.traceback[-1])
    finally:
        m.set_hook_registry(None)
    np.testing.assert_array_equal(m.forward(ids), expected)


@pytest.mark.parametrize("b", BACKENDS)
def test_kept_arrays_stay_intact_and_prefix(models, golden, b):
    m = models[b]
    kept = []
    reg = HookRegistry()
    reg.register_hook("small_layer0_output", lambda n, t, i: kept.append(t))
    m.set_hook_registry(reg, prefix="small")
    try:
        m.generate([golden["case0_input_ids"].tolist()], 3, temperature=0)
    finally:
        m.set_hook_registry(None)
    copies = [k.copy() for k in kept]
    m.forward([[5, 6, 7]])
    assert len(kept) == 3 and kept[0].shape[1] == 5 and kept[1].shape[1] == 1
    for k, c in zip(kept, copies):
        np.testing.assert_array_equal(k, c)


def test_registry_shared_between_models(models, golden):
    reg = HookRegistry()
    names = []
    reg.register_hook("*_embed_tokens", lambda n, t, i: names.append(n))
    models["rust"].set_hook_registry(reg, prefix="r")
    models["numpy"].set_hook_registry(reg, prefix="n")
    try:
        for b in BACKENDS:
            models[b].forward([[1, 2]])
    finally:
        for b in BACKENDS:
            models[b].set_hook_registry(None)
    assert names == ["r_embed_tokens", "n_embed_tokens"]


def test_both_engines_name_their_points_from_one_list_each():
    """The Rust engine's names (rust/model/hook_points.rs) are Python's (ellm.hooks), in order."""
    import ellm
    from ellm import hooks

    if not ellm.rust_available():
        pytest.skip("needs the Rust extension ellm._lowlevel, which is not built")
    from ellm import _lowlevel

    assert _lowlevel.hook_points() == (list(hooks.MODEL_POINTS), list(hooks.LAYER_POINTS))
    assert hooks.hook_point_names(1) == ["embed_tokens"] + [f"layer0_{p}" for p in hooks.LAYER_POINTS] + [
        "final_norm", "logits"]
