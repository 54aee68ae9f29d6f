"""`deferredseg demo`: train DeferredSeg on a benchmark where routing matters and show what it does.

Writes a small data set of the hard synthetic benchmark (faint, tiny and blurred
objects, look-alikes, varying noise) labelled by panel C: three readers, each
competent on different content (small lesions, large lesions, faint contrast),
so that no single expert is best everywhere. Trains the default configuration
(two-stage: the base segmentor, then the routing heads on its frozen
features), picks the deferral threshold on the validation split for a 10%
budget, and prints for the test split, at that same budget, the model alone,
confidence deferral to the best single expert and DeferredSeg, with each
expert's workload, the fragmentation of the deferral regions and the paths of
the figures.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from .data.benchmark import write_benchmark
from .train.config import TrainConfig
from .train.evaluation import evaluate
from .train.loop import train

BUDGET = 0.10


def demo_config(
    out: str, epochs: Optional[int], device: str, seed: int, quick: bool
) -> TrainConfig:
    data = Path(out) / "data"
    common = dict(
        layout="multirater",
        data=str(data),
        target="label",
        split_file=str(data / "split.json"),
        out=str(Path(out) / "train"),
        device=device,
        seed=seed,
        budget=BUDGET,
        overwrite=True,
    )  # a repeated demo moves the old run aside
    if quick:
        return TrainConfig(
            epochs=epochs or 1,
            head_epochs=2,
            features=8,
            head_channels=8,
            batch_size=8,
            progress=False,
            **common,
        )
    return TrainConfig(
        epochs=epochs or 12, head_epochs=8, features=16, batch_size=8, lr=3e-3, **common
    )


def run_demo(
    out: str = "deferredseg-demo",
    epochs: Optional[int] = None,
    device: str = "cpu",
    seed: int = 0,
    quick: bool = False,
) -> int:
    cfg = demo_config(out, epochs, device, seed, quick)
    cases, size = (30, 32) if quick else (250, 48)
    t0 = time.perf_counter()
    info = write_benchmark(cfg.data, "C", num_cases=cases, size=size, seed=seed)
    print(
        f"data: {cases} hard synthetic {size}x{size} images, panel C (each reader competent on "
        f"different content); on the test split the best single expert has Dice "
        f"{info['best_expert_dice']:.3f}, the per-pixel oracle {info['oracle_dice']:.3f}"
    )
    print(
        f"training DeferredSeg ({cfg.backbone}, two-stage: {cfg.epochs} epochs for the base "
        "segmentor, "
        f"{cfg.head_epochs} for the routing heads) on {device} ..."
    )
    train(cfg)
    t_train = time.perf_counter() - t0
    m = evaluate(
        Path(cfg.out) / "best.pt", out=str(Path(out) / "eval"), budget=BUDGET, device=device
    )
    conf = evaluate(
        Path(cfg.out) / "base" / "best.pt",
        budget=BUDGET,
        device=device,
        figures=False,
        with_hd95=True,
        overrides={"method": "confidence"},
    )
    t_all = time.perf_counter() - t0

    def f(v, spec=".4f"):
        return "n/a" if v is None else format(v, spec)

    print(
        f"\ntest split ({m['images']} images), thresholds chosen on the validation split for a "
        f"{BUDGET:.0%} deferral budget:\n"
    )
    print(f"| prediction | Dice | HD95 ({m.get('hd95_unit') or 'px'}) | deferral rate |")
    print("|---|---|---|---|")
    print(f"| model alone | {f(m['model_dice'])} | {f(m['model_hd95'], '.2f')} | 0 |")
    print(
        f"| confidence deferral to the best single expert | {f(conf['system_dice'])} | "
        f"{f(conf['system_hd95'], '.2f')} | {conf['deferral_rate']:.3f} |"
    )
    print(
        f"| DeferredSeg (model + experts) | {f(m['system_dice'])} | {f(m['system_hd95'], '.2f')} "
        f"| {m['deferral_rate']:.3f} |"
    )
    chosen = m["policy"]["chosen"] or m["policy"]["expert_choice"]
    who = "the best single expert" if chosen == "best" else "the expert the routing heads choose"
    print(
        f"\ndeferred pixels go to {who} (expert_choice={m['policy']['expert_choice']}: chosen on "
        "the validation split)"
    )
    print(
        "workload per expert (share of the deferred pixels): "
        + ", ".join(f"{n} {s:.1%}" for n, s in m["expert_share"].items())
    )
    print(
        f"the deferral score ranks the model's wrong pixels with AUROC "
        f"{f(m.get('auroc_model_wrong_score'), '.3f')} (the segmentation head's own uncertainty: "
        f"{f(m.get('auroc_model_wrong_uncertainty'), '.3f')})"
    )
    print(
        f"fragmentation: {f(m['deferral_components_per_image'], '.1f')} connected deferral "
        f"regions per image; risk-coverage AUC {f(m['risk_coverage_auc'])}"
    )
    print("\nfigures: " + ", ".join(m.get("figures", [])))
    print(f"metrics: {Path(out) / 'eval' / 'metrics.json'}; checkpoints and log: {cfg.out}")
    print(f"time: training {t_train:.0f} s, total {t_all:.0f} s")
    return 0
