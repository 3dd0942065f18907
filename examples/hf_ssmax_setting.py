"""SSMax in Hugging Face transformers by one setting, and SSMax's relatives found in shipped architectures.

1. A (tiny, random) Llama checkpoint is loaded with ``attn_implementation="attnpass_ssmax"``: the SSMax
   parameters exist at once (an optimizer made next trains them), start at ``1/log(train_len)``, are
   saved and restored by plain ``save_pretrained`` / ``from_pretrained``, and cached generation equals
   a full recompute.
2. Llama 4's attention temperature tuning and Ministral 3's ``llama_4_scaling`` (their default
   parameters) are named in attnpass's report with the parameters read back from the traced graph,
   and the Llama 4 tuning is fitted by the closest SSMax ``(s, b)``.

Run: ``python -m examples.hf_ssmax_setting`` (offline, a few seconds).
"""

from __future__ import annotations

import argparse
import math
import tempfile

import torch
import transformers as T

import attnpass
from attnpass.passes import relatives


def _llama_config() -> T.LlamaConfig:
    return T.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def one_setting(out: str) -> dict[str, float]:
    torch.manual_seed(0)
    T.LlamaForCausalLM(_llama_config()).save_pretrained(f"{out}/pretrained")  # stands in for a downloaded checkpoint
    model = T.AutoModelForCausalLM.from_pretrained(f"{out}/pretrained", attn_implementation="attnpass_ssmax")
    params = {n: p for n, p in model.named_parameters() if n.endswith("ssmax_s")}
    print(f"from_pretrained(..., attn_implementation='attnpass_ssmax'): {len(params)} SSMax parameters, "
          f"s = {next(iter(params.values()))[0].item():.5f} (1/log(256) = {1 / math.log(256):.5f})")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(3, 100, (4, 24), generator=torch.Generator().manual_seed(0))
    for step in range(3):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        print(f"  training step {step}: loss {loss.item():.4f}")
    model.save_pretrained(f"{out}/trained")
    loaded = T.AutoModelForCausalLM.from_pretrained(f"{out}/trained", attn_implementation="attnpass_ssmax").eval()
    restored = max((p - dict(loaded.named_parameters())[n]).abs().max().item() for n, p in params.items())
    print(f"  saved and loaded with plain save_pretrained/from_pretrained: trained s restored (max diff {restored:g}), "
          f"s now {[round(v, 4) for v in next(iter(params.values())).tolist()]}")
    prompt = ids[:2, :6]
    gen = loaded.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False, pad_token_id=0,
                          output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        full = loaded(gen.sequences, use_cache=False).logits[:, prompt.shape[1] - 1:-1]
    diff = (torch.stack(gen.logits, 1) - full).abs().max().item()
    print(f"  generate() with KV cache vs full recompute: {gen.sequences.shape[1] - 6} new tokens, max logit diff {diff:.2e}")
    return {"restored": restored, "decode_diff": diff}


def relatives_report() -> list[str]:
    from tests import relative_models as R

    lines = []
    for label, model in (("Llama 4 text (defaults)", R.llama4()), ("Ministral 3 (defaults)", R.ministral3())):
        rep = attnpass.find(model, (R.ids(),))
        for site in rep.sites:
            lines.append(f"{label} site {site.index}: q scaled by {site.relative.describe()}")
    rel = attnpass.find(R.llama4(), (R.ids(),)).sites[0].relative
    positions = relatives.fit_positions(rel)
    s, b, rms, worst = relatives.fit_ssmax(rel, positions)
    lines.append(f"closest SSMax to the Llama 4 tuning over positions 0..{len(positions) - 1}: s={s:.5f}, b={b:.5f} "
                 f"(rms error {rms:.4f}, max {worst:.4f})")
    for line in lines:
        print(line)
    return lines


def main(argv: list[str] | None = None) -> dict:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    T.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as out:
        numbers = one_setting(out)
    return {**numbers, "relatives": relatives_report()}


if __name__ == "__main__":
    main()
