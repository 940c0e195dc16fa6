"""The benchmark driver (benchmarks/run.py) runs end to end and writes a well-formed
table. A smoke test in --quick mode on ToyNet only: no timing is asserted (timings
belong in the benchmark's output, not in tests)."""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

RUN = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"

METHODS = ["conv2d_im2col", "extract_features", "nearest_neighbors", "pca", "gradient_saliency", "guided_backprop",
           "occlusion_map", "shapley_values", "grad_cam", "guided_grad_cam", "fgsm", "pgd",
           "class_visualization_step", "deepdream_step", "total_variation",
           "directional_derivatives + tcav_score", "train_cav", "tcav_test"]
PEERS = ["F.conv2d", "torch.cdist+topk", "sklearn PCA(full)", "Captum Saliency", "Captum GuidedBackprop",
         "Captum Occlusion", "Captum ShapleyValueSampling",
         "Captum LayerGradCam", "pytorch-grad-cam GradCAM", "Captum GuidedGradCam", "torchattacks FGSM",
         "torchattacks PGD", "Captum TCAV (fixed CAV)"]


def _driver():
    name = "_bench_run_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, RUN)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


def _seconds(cell: str) -> float:
    return float(cell[:-1]) * 1e-6 if cell.endswith("µ") else float(cell)


@pytest.mark.slow  # about 12 s on an idle 2-core machine: imports Captum, pytorch-grad-cam, torchattacks
def test_quick_bench_writes_a_well_formed_table(tmp_path, capsys):
    out = tmp_path / "bench.md"
    with torch.random.fork_rng(devices=[]):
        assert _driver().main(["--quick", "--models", "toynet", "--skip-notebooks", "--out", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert text in capsys.readouterr().out  # printed as written
    header = "| topic | method | case | ours s | peer | peer s | min s | ours/peer | ours/min | n | notes |"
    lines = text.splitlines()
    start = lines.index(header)
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == 11, line
        rows.append(cells)
    assert {r[1] for r in rows} == set(METHODS)
    assert {r[4] for r in rows} - {"—"} == set(PEERS)
    for topic, method, case, ours, peer, peer_s, min_s, by_peer, by_min, n, note in rows:
        assert "toynet" in case or not re.search(r"lite0", case), case
        assert _seconds(ours) > 0
        assert (peer == "—") == (peer_s == "—") == (by_peer == "—"), (method, peer)
        if peer != "—":
            assert _seconds(peer_s) > 0 and float(by_peer) > 0
        if min_s != "—":
            assert _seconds(min_s) > 0 and float(by_min) > 0
        assert n == "1"
        # each peer configured to compute what ours computes gives the same result
        assert "results differ" not in note and "scores differ" not in note, (method, peer, note)
    every_method_has_a_yardstick = {r[1] for r in rows if r[4] != "—" or r[6] != "—"}
    assert every_method_has_a_yardstick == set(METHODS)
    checked = {r[4] for r in rows if "same" in r[10]}
    assert {"Captum Saliency", "Captum GuidedBackprop", "Captum Occlusion", "Captum ShapleyValueSampling",
            "Captum LayerGradCam", "torchattacks FGSM", "Captum TCAV (fixed CAV)"} <= checked


def test_bench_rejects_an_unknown_model(capsys):
    with pytest.raises(SystemExit):
        _driver().main(["--quick", "--models", "resnet", "--skip-notebooks"])
    assert "unknown models ['resnet']" in capsys.readouterr().err
