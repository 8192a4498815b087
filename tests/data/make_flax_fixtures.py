"""Write the Flax test files of ``tests/test_flax_reader.py`` with the real Flax and JAX (run once; the outputs are
committed, so the tests run without Flax):

    python tests/data/make_flax_fixtures.py      # needs flax and jax (CPU is enough)

- ``flax_state.npz``: the reference arrays, written by numpy, keys ``state/<map path>`` (``/``-joined) for a
  TrainState-like tree and ``bf16/<map path>`` for the bfloat16 file (its values widened to float32, exactly);
- ``flax_state.msgpack``: ``flax.serialization.to_bytes`` of that tree, held as JAX arrays, with
  ``MAX_CHUNK_SIZE = 4096`` so that the 12 kB Dense kernel is stored as a chunked array;
- ``flax_bf16.msgpack``: ``to_bytes`` of ``{"params": {"Dense_0": {"kernel": <bfloat16 JAX array>}}}``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def reference_state() -> dict:
    """The tree of the state file, numpy arrays (heavy-tailed weights, so that power-law fits succeed)."""
    rng = np.random.default_rng(0)
    heavy = lambda *shape: (rng.standard_t(3, shape) / np.sqrt(shape[-2])).astype(np.float32)  # noqa: E731
    return {"params": {"Dense_0": {"kernel": heavy(64, 48), "bias": np.zeros(48, np.float32)},
                       "Conv_0": {"kernel": heavy(3, 3, 8, 24), "bias": np.zeros(24, np.float32)},
                       "Embed_0": {"embedding": heavy(300, 32).astype(np.float16)},
                       "attn": {"query": {"kernel": heavy(32, 4, 8)}}},
            "step": 3, "opt_state": {"0": {"mu": {"Dense_0": {"kernel": np.ones((64, 48), np.float32)}}}}}


def flatten(tree: dict, prefix: str) -> dict[str, np.ndarray]:
    out = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}/{name}"))
        else:
            out[f"{prefix}/{name}"] = np.asarray(value)
    return out


def main() -> None:
    import flax
    import jax
    import jax.numpy as jnp
    from flax import serialization

    state = reference_state()
    rng = np.random.default_rng(1)
    bf16 = jnp.asarray(rng.standard_t(3, (64, 48)) / 8.0, dtype=jnp.bfloat16)
    as_jax = jax.tree_util.tree_map(lambda x: jnp.asarray(x) if isinstance(x, np.ndarray) else x, state)
    serialization.MAX_CHUNK_SIZE = 4096  # the Dense kernel (12 kB) becomes a chunked array
    (HERE / "flax_state.msgpack").write_bytes(serialization.to_bytes(as_jax))
    (HERE / "flax_bf16.msgpack").write_bytes(serialization.to_bytes({"params": {"Dense_0": {"kernel": bf16}}}))
    np.savez(HERE / "flax_state.npz", **flatten(state, "state"),
             **{"bf16/params/Dense_0/kernel": np.asarray(bf16.astype(jnp.float32))},
             written_by=np.array(f"flax {flax.__version__}, jax {jax.__version__}"))
    print(f"wrote flax_state.msgpack, flax_bf16.msgpack, flax_state.npz with flax {flax.__version__}, "
          f"jax {jax.__version__}")


if __name__ == "__main__":
    main()
