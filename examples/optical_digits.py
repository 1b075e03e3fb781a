"""Noise-aware training on scikit-learn's bundled digits: a 64-128-10 optical network on the
lumina_nano_v1 profile, trained once plainly (quantized, no noise) and once with NAT, then
evaluated clean and under the chip's noise."""

import sys

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from ellm.optical import NoiseAwareTrainer


def main(epochs: int = 30, seed: int = 0) -> dict:
    digits = load_digits()
    X = (digits.data / 16.0).astype(np.float32)
    X_train, X_test, y_train, y_test = train_test_split(X, digits.target, test_size=0.25, random_state=seed,
                                                        stratify=digits.target)
    results = {}
    for name, nat in (("plain", False), ("NAT", True)):
        trainer = NoiseAwareTrainer([64, 128, 10], "lumina_nano_v1", noise_aware=nat, seed=seed)
        trainer.fit(X_train, y_train, epochs=epochs, batch_size=32)
        results[name] = trainer.evaluate(X_test, y_test, noisy=True, trials=10)
    print(f"{'training':<10} {'clean accuracy':>15} {'noisy accuracy':>15} {'robustness':>11}")
    for name, r in results.items():
        print(f"{name:<10} {r['clean_accuracy']:>15.3f} {r['noisy_accuracy']:>15.3f} {r['robustness']:>11.3f}")
    return results


if __name__ == "__main__":
    main(epochs=int(sys.argv[1]) if len(sys.argv) > 1 else 30)
