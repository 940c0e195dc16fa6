"""Benchmark of notebook 07 (TCAV), standalone:

    python benchmarks/tcav.py [--repeat 3] [--threads 2]

1. ``tcav_test`` with 5 random sets of 40 images on ToyNet (40 zebra scenes, 40 stripes
   images), at several layers: the issue's budget is 5 s on a 2-core CPU. The time is
   split into what scikit-learn's LogisticRegression fits take (2 R = 10 CAVs) and the
   rest (activations, one backward pass, the t-test).
2. ``tcav_score(directional_derivatives(...))`` against Captum's TCAV for the same,
   fixed CAV (a Captum ``Classifier`` that returns it): equal scores, and the time of
   each (Captum also reads and writes the concept activations on disk).

Timings are medians of ``--repeat`` runs after a warm-up, on this machine, in this run.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch


def timed(fn, repeat):
    fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def data(n=40, sets=5):
    from cs_helpers.toyworld import CLASS_NAMES, concept_images, toyworld

    world = toyworld(5 * n + 20, seed=1)
    zebras = world.images[world.labels == CLASS_NAMES.index("zebra")][:n]
    stripes = concept_images("stripes", n, seed=2)
    randoms = [concept_images("random", n, seed=10 + i) for i in range(sets)]
    return zebras, stripes, randoms, CLASS_NAMES.index("zebra")


def bench_tcav_test(model, repeat):
    from cs_helpers.reference import tcav as ref

    zebras, stripes, randoms, zebra = data()
    print("\ntcav_test, ToyNet, 40 zebra scenes, 40 stripes, 5 random sets of 40 (budget: 5 s)")
    print(f"{'layer':8s} {'D':>7s} {'total (s)':>10s} {'10 fits (s)':>12s} {'rest (s)':>9s}  score  p-value")
    for layer in ("relu1", "pool1", "relu2", "pool2", "relu3"):
        result = {}

        def run():
            result.update(ref.tcav_test(model, layer, zebra, zebras, stripes, randoms))

        total = timed(run, repeat)
        acts = [ref._activations(model, layer, x) for x in [stripes] + randoms]
        fits = timed(lambda: [ref.train_cav(acts[a], acts[b]) for a, b in
                              [(0, i + 1) for i in range(5)] + [(i + 1, (i + 1) % 5 + 1) for i in range(5)]], repeat)
        print(f"{layer:8s} {acts[0].shape[1]:7d} {total:10.2f} {fits:12.2f} {total - fits:9.2f}  "
              f"{result['score']:.2f}  {result['p_value']:.2g}")


def captum_tcav(model, layer, cav, concept, random, folder, model_id="model"):
    """A function ``run(images, target) -> float``: the sign-count TCAV score of Captum's
    ``TCAV`` for one fixed CAV (a Captum ``Classifier`` that returns it) with the
    concept and random images as its experimental set, saving into ``folder`` (which
    Captum reuses as a cache of activations and CAVs)."""
    from captum.concept import TCAV, Concept
    from captum.concept._utils.classifier import Classifier

    class FixedCav(Classifier):
        def __init__(self):
            pass

        def train_and_eval(self, dataloader, **kwargs):
            return {"accs": torch.tensor(1.0)}

        def weights(self):
            return torch.stack([cav, -cav])

        def classes(self):
            return [0, 1]

    tcav = TCAV(model, [layer], model_id=model_id, classifier=FixedCav(), save_path=folder)
    experiment = [Concept(0, "concept", torch.utils.data.DataLoader(concept, batch_size=len(concept))),
                  Concept(1, "random", torch.utils.data.DataLoader(random, batch_size=len(random)))]

    def run(images, target):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scores = tcav.interpret(images, experimental_sets=[experiment], target=target)
        return float(scores["0-1"][layer]["sign_count"][0])

    return run


def bench_captum(model, repeat):
    from cs_helpers.reference import tcav as ref

    zebras, stripes, randoms, zebra = data(sets=1)
    print("\nTCAV score of one fixed CAV on 40 zebra scenes: ours vs Captum's TCAV (sign_count)")
    print(f"{'layer':8s} {'ours':>6s} {'Captum':>7s} {'ours (s)':>9s} {'Captum (s)':>11s} {'ratio':>6s}")
    for layer in ("relu1", "pool2", "relu3"):
        cav = ref.train_cav(ref._activations(model, layer, stripes), ref._activations(model, layer, randoms[0]))
        ours_value = ref.tcav_score(ref.directional_derivatives(model, layer, zebras, zebra, cav))
        ours = timed(lambda: ref.tcav_score(ref.directional_derivatives(model, layer, zebras, zebra, cav)), repeat)
        box = {}

        def captum_run():
            with tempfile.TemporaryDirectory() as folder:
                box["value"] = captum_tcav(model, layer, cav, stripes, randoms[0], folder)(zebras, zebra)

        theirs = timed(captum_run, repeat)
        print(f"{layer:8s} {ours_value:6.3f} {box['value']:7.3f} {ours:9.4f} {theirs:11.4f} {ours / theirs:6.2f}"
              + ("" if ours_value == box["value"] else "   MISMATCH"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from cs_helpers.models import load_model

    model = load_model("toynet", device="cpu")
    print(f"torch {torch.__version__}, {args.threads} threads, CPU")
    bench_tcav_test(model, args.repeat)
    bench_captum(model, args.repeat)


if __name__ == "__main__":
    main()
