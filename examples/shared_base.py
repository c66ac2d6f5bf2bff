"""Two models that share a base (as transfer-learned models do), saved as .keras files.

    python examples/shared_base.py DIR   # writes DIR/model_a.keras and DIR/model_b.keras

Both run the same two layers (`shared_1`, `shared_2`, same weights) and differ in their last layer.
Split each at `shared_2` and host the base once; both heads call it.
"""

import sys
from pathlib import Path

import keras


def build(directory: str) -> tuple[Path, Path]:
    keras.utils.set_random_seed(7)
    features = keras.Input((8,), name="features")
    shared_1 = keras.layers.Dense(32, activation="relu", name="shared_1")
    shared_2 = keras.layers.Dense(16, activation="relu", name="shared_2")
    base = shared_2(shared_1(features))
    model_a = keras.Model(features, keras.layers.Dense(1, name="head_a")(base), name="model_a")
    model_b = keras.Model(features, keras.layers.Dense(3, activation="softmax", name="head_b")(base), name="model_b")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    model_a.save(out / "model_a.keras")
    model_b.save(out / "model_b.keras")
    return out / "model_a.keras", out / "model_b.keras"


if __name__ == "__main__":
    for path in build(sys.argv[1] if len(sys.argv) > 1 else "/tmp/shared"):
        print(path)
