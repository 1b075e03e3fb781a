import json

import pytest

from ellm import ModelArgs


def test_defaults_and_derived_values():
    a = ModelArgs(hidden_size=512, num_attention_heads=8, max_position_embeddings=4096)
    assert a.num_key_value_heads == 8 and a.resolved_head_dim == 64 and a.max_seq_len == 2048
    assert a.kv_dim() == 512 and a.dtype == "float32" and a.validate() is True
    assert ModelArgs(max_position_embeddings=512).max_seq_len == 512


def test_token_ids_become_lists():
    a = ModelArgs(bos_token_id=1, eos_token_id=[2, 3])
    assert a.bos_token_id == [1] and a.eos_token_id == [2, 3]
    with pytest.raises(TypeError, match="eos_token_id"):
        ModelArgs(eos_token_id="2")


def test_hf_config_with_unknown_keys_round_trips(tmp_path):
    cfg = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
           "torch_dtype": "bfloat16", "rope_parameters": {"rope_theta": 5e5, "rope_type": "default"},
           "architectures": ["LlamaForCausalLM"]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    a = ModelArgs.from_config_file(tmp_path / "config.json")
    assert a.rope_theta == 5e5 and a.dtype == "bfloat16" and a.extra == {"architectures": ["LlamaForCausalLM"]}
    assert a.to_dict()["architectures"] == ["LlamaForCausalLM"]
    assert ModelArgs.from_dict(a.to_dict()) == a


def test_meta_params_json(tmp_path):
    params = {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "multiple_of": 1024,
              "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "rope_theta": 500000.0, "vocab_size": 128256}
    (tmp_path / "params.json").write_text(json.dumps(params))
    a = ModelArgs.from_config_file(tmp_path / "params.json")
    assert (a.hidden_size, a.intermediate_size, a.num_key_value_heads) == (4096, 14336, 8)  # Llama 3 8B


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        ModelArgs.from_config_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        ModelArgs.from_config_file(tmp_path / "bad.json")
    (tmp_path / "eps.json").write_text(json.dumps({"rms_norm_eps": "small"}))
    with pytest.raises(ValueError, match="rms_norm_eps"):
        ModelArgs.from_config_file(tmp_path / "eps.json")
    with pytest.raises(ValueError, match="divisible by num_key_value_heads"):
        ModelArgs(num_attention_heads=9, num_key_value_heads=2, hidden_size=576).validate()
    with pytest.raises(ValueError, match="hidden_size"):
        ModelArgs(hidden_size=100, num_attention_heads=3).validate()
    with pytest.raises(ValueError, match="hidden_act"):
        ModelArgs(hidden_act="gelu").validate()
    with pytest.raises(ValueError, match="rope scaling"):
        ModelArgs(rope_scaling={"rope_type": "yarn", "factor": 4.0}).validate()
    with pytest.raises(ValueError, match="vocab_size"):
        ModelArgs(vocab_size=0).validate()


def test_both_engines_apply_the_one_list_of_config_rules():
    """config_rules.json is read by ModelArgs.validate and by the Rust engine: the same broken
    config is refused by both, with the same message."""
    import ellm
    from ellm.config import config_rules

    if not ellm.rust_available():
        pytest.skip("needs the Rust extension ellm._lowlevel, which is not built")
    from ellm import _lowlevel

    good = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8)
    rules = config_rules()
    broken = [{name: 0} for name in rules["positive"]]
    broken += [{a: 6, b: 4} for a, b in rules["divisible"]]
    broken += [{name: 7} for name, _ in rules["even"]]
    assert len(broken) == len(rules["positive"]) + len(rules["divisible"]) + len(rules["even"])
    for change in broken:
        args = ModelArgs(**{**good, **change})
        with pytest.raises(ValueError) as in_python:
            args.validate()
        config = ModelArgs(**good).engine_config()
        config.update(change)
        config["layer_windows"] = [0] * config["num_hidden_layers"]
        with pytest.raises(ValueError) as in_rust:
            _lowlevel.LlamaEngine(config)
        assert str(in_rust.value) == str(in_python.value), change
