"""Side-by-side timings of the kernels a packed prefill step and a decode step are made of, and of
the alternatives we could put in their place: what each change would buy, before building it.

    python bench/kernel_variants.py --json $OUT/kernel_variants.json

On full-size random-weight Molmo2-8B (bench/workloads.py), bf16, one GPU:

- the vision tower and the adapter apart, on 8 images of mixed sizes, with SDPA's flash,
  memory-efficient and cuDNN kernels, and under ``torch.compile``;
- Molmo2's RMSNorm (six elementwise kernels in float32) against torch's fused ``rms_norm`` kept
  to the same roundings, on a prefill step's 8,192 tokens and a decode step's 128 rows;
- the rotary embedding, SiLU-and-multiply, and the suffix attention's gathered-keys SDPA;
- separate q/k/v and gate/up GEMMs against one GEMM over their concatenated weights at 16, 128
  and 8,192 rows.

``--tiny`` checks the script on the CPU. Each variant runs in its own ``try``: one that fails
is reported with its error and the others still run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefill_profile import MIXED, timer  # noqa: E402
from workloads import build, noise_image  # noqa: E402

from molmo_backend.engine.prefill import image_features, prepare_image  # noqa: E402


def suffix_attention(model, device, dtype, ms) -> dict:
    """A packed step's prompt suffixes (24 rows x 25 tokens, each row's slot holding a
    1000-token image prefix), one layer: SDPA over the gathered slot keys (what the engine runs)
    against the variable-length kernel with every suffix token a sequence of its own."""
    from molmo_backend.engine import slot_attention

    text = model.config.text_config
    kv, dim, heads = text.num_key_value_heads, text.head_dim, text.num_attention_heads
    rows, count, prefix, length = 24, 25, 1000, 2560
    keys = torch.randn(rows + 1, length, kv, dim, device=device, dtype=dtype)
    values = torch.randn_like(keys)
    query = torch.randn(rows * count, heads, dim, device=device, dtype=dtype)
    dense = slot_attention.Dense.causal([(r * count, count, r + 1, prefix) for r in range(rows)], device)
    result = {
        "dense_ms": ms(
            lambda: slot_attention.dense_attention(query, keys, values, dense, dim**-0.5), repeat=20
        )
    }
    if device.type == "cuda":
        entries = [
            (r * count + i, 1, r + 1, prefix + i + 1, prefix + i) for r in range(rows) for i in range(count)
        ]
        seqs = slot_attention.Sequences.of(entries, length, heads // kv, device)
        flat_k, flat_v = keys.view(-1, kv, dim), values.view(-1, kv, dim)
        result["varlen_ms"] = ms(
            lambda: slot_attention.varlen_attention(query, flat_k, flat_v, seqs, dim**-0.5), repeat=20
        )
        got = slot_attention.varlen_attention(query, flat_k, flat_v, seqs, dim**-0.5)
        want = slot_attention.dense_attention(query, keys, values, dense, dim**-0.5)
        result["max_difference"] = (got.float() - want.float()).abs().max().item()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    model, processor, _ = build("tiny" if args.tiny else "8b", device, dtype)
    out: dict = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "command": " ".join(["python"] + sys.argv),
    }

    def record(name, fn):
        try:
            out[name] = fn()
        except Exception as exc:  # noqa: BLE001 - report and go on
            out[name] = f"failed: {exc!r}"[:300]
        print(name, out[name], flush=True)

    ms = timer(device)
    images = [
        prepare_image(processor, noise_image(s, i), device if device.type == "cuda" else None)
        for i, s in enumerate(MIXED)
    ]
    out["mixed_crops"] = sum(im.crops for im in images)
    out["mixed_patches_per_crop"] = images[0].patches
    out["mixed_image_tokens"] = sum(im.length for im in images)
    inner = model.model
    pixels = torch.cat([im.inputs["pixel_values"] for im in images]).to(device, dtype)

    with torch.inference_mode():
        record("image_features_8mixed_ms", lambda: ms(lambda: image_features(model, images, dtype)))
        record("vision_tower_8mixed_ms", lambda: ms(lambda: inner.vision_tower(pixels)))
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for name, backend in (
            ("flash", SDPBackend.FLASH_ATTENTION),
            ("efficient", SDPBackend.EFFICIENT_ATTENTION),
            ("cudnn", SDPBackend.CUDNN_ATTENTION),
            ("math", SDPBackend.MATH),
        ):

            def run(backend=backend):
                with sdpa_kernel([backend]):
                    return ms(lambda: inner.vision_tower(pixels))

            record(f"vision_tower_8mixed_{name}_ms", run)
        hidden = inner.vision_tower(pixels).last_hidden_state
        layer = inner.vision_tower.layers[0]
        record("vision_layer_ms", lambda: ms(lambda: layer(hidden, None), repeat=10))
        record("vision_mlp_ms", lambda: ms(lambda: layer.mlp(hidden), repeat=10))
        record("vision_layernorm_ms", lambda: ms(lambda: layer.layer_norm1(hidden), repeat=10))
        record(
            "vision_attention_ms",
            lambda: ms(lambda: layer.self_attn(layer.layer_norm1(hidden), attention_mask=None), repeat=10),
        )
        if not args.no_compile:

            def compiled_tower():
                tower = torch.compile(inner.vision_tower)
                started = time.perf_counter()
                tower(pixels)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                out["vision_tower_compile_s"] = round(time.perf_counter() - started, 1)
                return ms(lambda: tower(pixels))

            record("vision_tower_8mixed_compiled_ms", compiled_tower)

        text = model.config.text_config
        norm = inner.language_model.layers[0].input_layernorm
        for rows in (128, 8192):
            x = torch.randn(rows, text.hidden_size, device=device, dtype=dtype)
            record(f"rmsnorm_hf_{rows}_ms", lambda x=x: ms(lambda: norm(x), repeat=20))

            def fused(x=x):
                eps = norm.variance_epsilon
                shape = (x.shape[-1],)
                return ms(
                    lambda: norm.weight * torch.nn.functional.rms_norm(x.float(), shape, eps=eps).to(x.dtype),
                    repeat=20,
                )

            record(f"rmsnorm_fused_same_rounding_{rows}_ms", fused)
            record(
                f"rmsnorm_fused_{rows}_ms",
                lambda x=x: ms(
                    lambda: torch.nn.functional.rms_norm(
                        x, (x.shape[-1],), norm.weight, eps=norm.variance_epsilon
                    ),
                    repeat=20,
                ),
            )
            one_rounding = torch.nn.functional.rms_norm(
                x, (x.shape[-1],), norm.weight, eps=norm.variance_epsilon
            )
            out[f"rmsnorm_fused_max_difference_{rows}"] = (
                (one_rounding.float() - norm(x).float()).abs().max().item()
            )
            got = norm.weight * torch.nn.functional.rms_norm(
                x.float(), (x.shape[-1],), eps=norm.variance_epsilon
            ).to(x.dtype)
            out[f"rmsnorm_fused_equal_bits_{rows}"] = bool(torch.equal(got, norm(x)))
            gate = torch.randn(rows, text.intermediate_size, device=device, dtype=dtype)
            up = torch.randn_like(gate)
            record(
                f"silu_mul_{rows}_ms",
                lambda gate=gate, up=up: ms(lambda: torch.nn.functional.silu(gate) * up, repeat=20),
            )
            qkv = [text.num_attention_heads * text.head_dim] + [text.num_key_value_heads * text.head_dim] * 2
            for name, parts in (("qkv", qkv), ("gate_up", [text.intermediate_size] * 2)):
                weights = [torch.randn(p, text.hidden_size, device=device, dtype=dtype) for p in parts]
                joined = torch.cat(weights)
                record(
                    f"gemm_{name}_separate_{rows}_ms",
                    lambda weights=weights, x=x: ms(lambda: [x @ w.T for w in weights], repeat=20),
                )
                record(
                    f"gemm_{name}_joined_{rows}_ms",
                    lambda joined=joined, x=x: ms(lambda: x @ joined.T, repeat=20),
                )
                del weights, joined
            # rotary on a step's queries and keys
            from molmo_backend.engine.packed import apply_rotary

            q = torch.randn(1, text.num_attention_heads, rows, text.head_dim, device=device, dtype=dtype)
            k = torch.randn(1, text.num_key_value_heads, rows, text.head_dim, device=device, dtype=dtype)
            positions = torch.arange(rows, device=device)[None]
            cos, sin = inner.language_model.rotary_emb(x[None], positions)
            record(
                f"rotary_{rows}_ms",
                lambda q=q, k=k, cos=cos, sin=sin: ms(lambda: apply_rotary(q, k, cos, sin), repeat=20),
            )
        record("suffix_attention", lambda: suffix_attention(model, device, dtype, ms))
    print(json.dumps(out, indent=1), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
