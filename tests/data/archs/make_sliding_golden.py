"""Writes sliding.npz: Hugging Face transformers' outputs of the tiny mistral and qwen2 models with a
sliding attention window shorter than the prompt (the other goldens here have none).

Needs torch and transformers (the tests do not): `python make_sliding_golden.py` in this folder.
- mistral: `sliding_window` 4 on every layer.
- qwen2: `use_sliding_window`, `sliding_window` 5, `max_window_layers` 1 (layer 0 full, layer 1 slides).
Each: `{name}_logits` [2, 12, 320] of one forward of golden.npz's input_ids, `{name}_greedy_ids`
(generate, 8 new tokens, greedy; rows padded with 0 after eos id 2), `{name}_config` (JSON of
the config changes).
"""

import json
import os

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = {
    "mistral": {"sliding_window": 4},
    "qwen2": {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1,
              "layer_types": ["full_attention", "sliding_attention"]},
}


def main() -> None:
    out = {}
    for name, changes in CASES.items():
        folder = os.path.join(HERE, name)
        config = AutoConfig.from_pretrained(folder, **changes)
        model = AutoModelForCausalLM.from_pretrained(folder, config=config, attn_implementation="eager")
        model.eval()
        ids = torch.tensor(np.load(os.path.join(folder, "golden.npz"))["input_ids"])
        with torch.no_grad():
            out[f"{name}_logits"] = model(ids).logits.numpy().astype(np.float32)
            greedy = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        out[f"{name}_greedy_ids"] = greedy[:, ids.shape[1]:].numpy()
        out[f"{name}_config"] = np.array(json.dumps(changes))
        print(name, "layer_types:", getattr(config, "layer_types", None), "window:", config.sliding_window)
    np.savez_compressed(os.path.join(HERE, "sliding.npz"), **out)


if __name__ == "__main__":
    main()
