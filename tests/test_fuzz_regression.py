"""The fuzz targets of `fuzz/loaders.py` on their seeds and a few thousand mutations: a quick
regression run of the campaigns (the long ones run by hand, see that file)."""

import importlib.util
import os

import pytest

spec = importlib.util.spec_from_file_location("loaders", os.path.join(os.path.dirname(__file__), "..", "fuzz",
                                                                      "loaders.py"))
loaders = importlib.util.module_from_spec(spec)
spec.loader.exec_module(loaders)


@pytest.mark.parametrize("target,count", [("safetensors_header", 3000), ("config", 2000), ("tokenizer", 1000),
                                          ("gguf_model", 300)])
def test_mutated_inputs_raise_only_the_promised_errors(target, count):
    assert loaders.replay(target, count, seed=1) == count


def test_a_templates_own_refusal_is_a_value_error_and_a_broken_template_a_format_error():
    from ellm import ModelFormatError
    from ellm.tokenizer import _render_template

    refusing = "{% if messages[0].role != 'system' %}{{ raise_exception('a system message comes first') }}{% endif %}"
    with pytest.raises(ValueError, match="a system message comes first"):
        _render_template(refusing, [{"role": "user", "content": "hi"}], True)
    with pytest.raises(ModelFormatError, match="is not valid Jinja"):
        _render_template("{% for %}", [{"role": "user", "content": "hi"}], True)
