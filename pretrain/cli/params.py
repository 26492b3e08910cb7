"""`pretrain params`: parameter counts of the model presets."""

from __future__ import annotations



def register(sub) -> None:
    p = sub.add_parser("params", help="parameter counts of the model presets")
    p.set_defaults(func=run)


def run(args) -> int:
    # the command's libraries (torch and up) load when it runs, so that `pretrain --help` starts without them
    from models import PRESETS, Llama, ModelConfig

    print(f"{'preset':<11}{'params':>16}{'non-embedding':>16}  shape")
    for name in PRESETS:
        cfg = ModelConfig.from_preset(name)
        model = Llama.meta(cfg)
        print(f"{name:<11}{model.num_params():>16,}{model.num_params(exclude_embeddings=True):>16,}  "
              f"d{cfg.d_model} L{cfg.n_layers} h{cfg.n_heads} kv{cfg.n_kv_heads} ffn{cfg.ffn_hidden} V{cfg.vocab_size}")
    return 0
