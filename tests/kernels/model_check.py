"""Model-level kernel check for a GPU machine whose transformers cannot build Gemma 4.

    python tests/kernels/model_check.py make DIR    # here: tiny checkpoints, converted, + reference logits
    python tests/kernels/model_check.py check DIR   # there: kernels on vs off vs transformers

`check` (CHECK_KERNELS=all, the default: every kernel; =1: the set the model uses) asserts, per tiny parity checkpoint (float32): greedy tokens with kernels on equal
kernels off; logits with kernels on (full forward, and cached prefill + single-token decode
past the sliding window) stay within 1e-4 of transformers'; a left-padded batch decodes as its
rows alone.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parents[1]))
os.environ.setdefault("MLX_ENABLE_TF32", "0")

PROMPT, FIRST, TOLERANCE, NEW_TOKENS = 23, 9, 1e-4, 24


def make(root: Path):
    import torch

    import hf_checkpoints
    import mlx_gemma4

    for name in hf_checkpoints.VARIANTS:
        model = hf_checkpoints.write_checkpoint(name, root / f"{name}-hf")
        mlx_gemma4.convert(root / f"{name}-hf", root / name, dtype="float32")
        vocab = hf_checkpoints.VARIANTS[name]["text"]["vocab_size"]
        ids = np.random.RandomState(7).randint(3, vocab, size=(1, PROMPT))
        with torch.no_grad():
            logits = model(torch.tensor(ids)).logits.numpy()
        np.savez(root / f"{name}.npz", ids=ids, logits=logits)
        print("made", name)


def _load(path, kernels: bool):
    import mlx_gemma4

    os.environ["MLX_GEMMA4_KERNELS"] = os.environ.get("CHECK_KERNELS", "all") if kernels else "0"
    model = mlx_gemma4.load_model(path)
    assert model.ops.uses_kernels == kernels, "kernel selection did not follow MLX_GEMMA4_KERNELS"
    return model


def check(root: Path) -> bool:
    import mlx.core as mx

    from mlx_gemma4 import generate_tokens

    ok = True
    for npz in sorted(root.glob("*.npz")):
        name = npz.stem
        data = np.load(npz)
        ids, reference = data["ids"], data["logits"]
        on, off = _load(root / name, True), _load(root / name, False)
        tokens_on = list(generate_tokens(on, ids[0, :11].tolist(), max_tokens=NEW_TOKENS, stop_ids=[]))
        tokens_off = list(generate_tokens(off, ids[0, :11].tolist(), max_tokens=NEW_TOKENS, stop_ids=[]))
        full = np.array(on(mx.array(ids)))
        cache = on.make_cache()
        steps = [np.array(on(mx.array(ids[:, :FIRST]), cache))]
        steps += [np.array(on(mx.array(ids[:, t : t + 1]), cache)) for t in range(FIRST, PROMPT)]
        cached = np.concatenate(steps, axis=1)
        full_err, cached_err = np.abs(full - reference).max(), np.abs(cached - reference).max()
        # Left padding: row 1 is row 0's last 15 tokens behind 8 pad slots; decode 10 more.
        long, short = ids[0, :23], ids[0, 8:23]
        batch = np.stack([long, np.concatenate([np.zeros(8, dtype=long.dtype), short])])
        cache = on.make_cache(left_padding=[0, 8])
        padded = [np.array(on(mx.array(batch), cache))]
        follow = ids[0, :10]
        for token in follow:
            padded.append(np.array(on(mx.array([[int(token)], [int(token)]]), cache)))
        padded = np.concatenate(padded, axis=1)
        alone = np.array(on(mx.array(np.concatenate([short, follow])[None])))[0]
        pad_err = np.abs(padded[1, 8:] - alone).max()
        passed = tokens_on == tokens_off and max(full_err, cached_err, pad_err) <= TOLERANCE
        ok &= passed
        print(f"{name:12s} greedy on==off {tokens_on == tokens_off}  |logits - transformers| full {full_err:.2e} "
              f"cached {cached_err:.2e}  left-padded row vs alone {pad_err:.2e}  {'PASS' if passed else 'FAIL'}")
    return ok


if __name__ == "__main__":
    verb, root = sys.argv[1], Path(sys.argv[2])
    if verb == "make":
        root.mkdir(parents=True, exist_ok=True)
        make(root)
    else:
        sys.exit(0 if check(root) else 1)
