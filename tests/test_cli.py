"""The `deferredseg` command end to end on tiny synthetic data, resume, and 2-rank DDP."""

import json
import os
import subprocess
import sys

import pytest
import torch
from _runs import ROOT, STEPS, TINY, one_thread, run_main, weights

from deferredseg.cli import ci95, main
from deferredseg.train.checkpoint import load_checkpoint, save_checkpoint
from deferredseg.train.evaluation import evaluate
from deferredseg.train.methods import METHODS, REGISTRY


def run_cli(*args, expect=0):
    proc = subprocess.run(
        [sys.executable, "-m", "deferredseg", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == expect, proc.stdout + proc.stderr
    return proc


def test_train_then_evaluate_writes_checkpoints_log_metrics_and_figures(tmp_path, two_stage_run):
    out = two_stage_run[0]  # 2 epochs of the base segmentor, 3 of the heads
    for name in ("last.pt", "best.pt", "log.jsonl", "base/best.pt", "base/log.jsonl"):
        assert (out / name).is_file(), name
    # two-stage: the base segmentor's two epochs, then the heads untrained and after each epoch
    base = [
        json.loads(line)["event"] for line in (out / "base" / "log.jsonl").read_text().splitlines()
    ]
    assert base.count("epoch") == 2 and "step" in base
    events = [json.loads(line)["event"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert events.count("epoch") == 4 and "step" in events and "best" in events
    ck = load_checkpoint(out / "best.pt")
    assert ck["config"]["epochs"] == 2 and ck["num_experts"] == 5

    ev = tmp_path / "eval"
    assert (
        main(
            ["evaluate", "--checkpoint", str(out / "best.pt"), "--out", str(ev), "--budget", "0.2"]
        )
        == 0
    )
    m = json.loads((ev / "metrics.json").read_text())
    for key in (
        "system_dice",
        "model_dice",
        "deferral_rate",
        "expert_share",
        "system_iou",
        "system_sensitivity",
        "system_hd95",
        "model_hd95",
        "expert_region_dice",
        "model_region_dice",
        "deferral_components_per_image",
        "risk_coverage",
        "risk_coverage_auc",
    ):
        assert key in m, key
    assert list(m["expert_share"]) == m["expert_names"] and len(m["expert_names"]) == 5
    if m["deferral_rate"] > 0:
        assert sum(m["expert_share"].values()) == pytest.approx(1.0)
    import matplotlib.image as mpimg

    assert len(m["figures"]) == 3
    for fig in m["figures"]:
        img = mpimg.imread(fig)
        assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50


def test_config_file_yaml_and_json_with_command_line_winning(tmp_path):
    from deferredseg.cli import build_parser, config_from_args

    (tmp_path / "c.yaml").write_text(
        "epochs: 7\nbatch-size: 3\nlambda_coherence: 0.5\nmethod: no-balance\n"
    )
    (tmp_path / "c.json").write_text(json.dumps({"epochs": 5, "lr": 0.01}))
    p = build_parser()
    cfg = config_from_args(
        p.parse_args(["train", "--config", str(tmp_path / "c.yaml"), "--epochs", "2"])
    )
    assert (cfg.epochs, cfg.batch_size, cfg.lambda_coherence, cfg.method) == (
        2,
        3,
        0.5,
        "no-balance",
    )
    cfg = config_from_args(p.parse_args(["train", "--config", str(tmp_path / "c.json")]))
    assert (cfg.epochs, cfg.lr) == (5, 0.01)


@pytest.mark.parametrize(
    "args,words",
    [
        (["train", "--layout", "nifti"], "invalid choice"),
        (["train", "--epochs", "zero"], "invalid int value"),
        (["train", "--epochs", "0"], "epochs must be >= 1"),
        (["train", "--layout", "multirater"], "needs --data"),
        (["train", "--config", "/nonexistent.yaml"], "does not exist"),
        (["train", "--seeds", "1,x"], "comma-separated"),
        (["evaluate", "--out", "x"], "--checkpoint"),
        (["fly"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(args, words, capsys):
    code, _, err = run_main(args, capsys)
    assert code == 2 and words in err, err


def test_bad_config_key_and_missing_checkpoint(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("epochz: 3\n")
    code, _, err = run_main(["train", "--config", tmp_path / "c.yaml"], capsys)
    assert code == 2 and "unknown option(s) ['epochz']" in err
    code, _, err = run_main(
        ["evaluate", "--checkpoint", tmp_path / "nope.pt", "--out", tmp_path], capsys
    )
    assert code == 2 and "nope.pt" in err


def test_help_is_there_for_every_command(capsys):
    for cmd in ([], ["train"], ["evaluate"], ["demo"]):
        code, out, _ = run_main(cmd + ["--help"], capsys)
        assert code == 0 and "usage: deferredseg" in out
    assert "--expert-profile" in run_main(["train", "--help"], capsys)[1]


@pytest.mark.slow
def test_the_command_list_needs_no_torch_and_has_no_markup():
    """``deferredseg --help`` builds the command list from the standard library alone (its
    time: benchmarks/bench_help.py); the text is plain, without RST markup."""
    code = (
        "import sys\n"
        "from deferredseg.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('torch imported' if 'torch' in sys.modules else 'no torch')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("no torch"), proc.stdout
    for name in ("train", "evaluate", "demo", "predict", "serve", "merge", "review-demo"):
        assert f"\n    {name} " in proc.stdout, name
    assert "``" not in proc.stdout


def test_train_help_is_grouped_with_rare_options_last(capsys):
    code, out, _ = run_main(["train", "--help"], capsys)
    assert code == 0 and "``" not in out
    headings = [line[:-1] for line in out.splitlines() if line.endswith(":") and " " != line[0]]
    wanted = ["data", "model", "objective", "schedule", "routing", "output", "rarely used"]
    assert [h for h in headings if h in wanted] == wanted, headings
    rare = out.index("\nrarely used:")
    for flag in ("--grad-accum", "--gate-sparsity", "--workers", "--balance-low"):
        assert out.index(f"\n  {flag} ") > rare, flag
    for flag in ("--layout", "--epochs", "--out", "--budget", "--lambda-gate"):
        assert out.index(f"\n  {flag} ") < rare, flag


@pytest.mark.slow
def test_module_entry_point_and_console_script():
    proc = run_cli("--help")
    assert "usage: deferredseg" in proc.stdout
    assert run_cli("train", "--epochs", "0", expect=2).stderr.count("epochs must be >= 1") == 1
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["deferredseg"] == "deferredseg.cli:main"


@pytest.mark.slow
def test_demo_quick_prints_the_table(tmp_path, capsys):
    code, out, err = run_main(["demo", "--quick", "--out", tmp_path / "demo"], capsys)
    assert code == 0, err
    assert "| model alone |" in out and "| DeferredSeg (model + experts) |" in out
    assert "workload per expert" in out and "fragmentation" in out
    assert (tmp_path / "demo" / "eval" / "metrics.json").is_file()


def test_two_stage_resumed_in_stage_one_reaches_the_same_weights(tmp_path, two_stage_run):
    """The session's two-stage run is the reference; the same settings stopped in stage 1
    (8 training images, batch 4: 2 steps an epoch, step 3 is inside epoch 2) and resumed."""
    full, settings = two_stage_run[0], ["--epochs", "2", *TINY, "--head-epochs", "3"]
    part = tmp_path / "part"
    assert main(["train", "--out", str(part), *settings, "--max-steps", "3"]) == 0
    assert (part / "base" / "last.pt").is_file() and (part / "best.pt").is_file()
    assert load_checkpoint(part / "base" / "last.pt")["global_step"] == 3
    assert main(["train", "--out", str(part), "--resume", *settings]) == 0
    a, b = weights(full / "best.pt"), weights(part / "best.pt")
    assert a.keys() == b.keys() and any(k.startswith("routing_heads.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_max_steps_bounds_each_stage_and_leaves_a_usable_best_pt(tmp_path, capsys):
    out = tmp_path / "dash"
    args = ["train", "--out", out, *TINY, "--epochs", "3", "--head-epochs", "3", "--max-steps", "2"]
    code, stdout, _ = run_main(args, capsys)
    assert code == 0
    assert (out / "best.pt").is_file() and (out / "base" / "best.pt").is_file()
    steps = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in steps if r["event"] == "step") == 2  # stage 2 bounded too
    last = stdout.strip().splitlines()[-1]
    assert last == f"run folder: {out} (best.pt, last.pt, log.jsonl)", stdout
    code, _, err = run_main(
        ["evaluate", "--checkpoint", out / "best.pt", "--out", out / "eval", "--no-figures"],
        capsys,
    )
    assert code == 0 and (out / "eval" / "metrics.json").is_file(), err
    # a joint run stopped before any epoch ended: best.pt too; the last line lists what exists
    joint = tmp_path / "joint"
    code, stdout, _ = run_main(
        [
            "train",
            "--out",
            joint,
            "--training",
            "joint",
            "--method",
            "model-only",
            "--max-steps",
            "1",
            *TINY,
        ],
        capsys,
    )
    assert code == 0 and (joint / "best.pt").is_file()
    assert "stopped at step 1" in stdout


def test_resume_after_a_stop_mid_epoch_reaches_the_same_weights(tmp_path, joint_reference):
    part = tmp_path / "part"
    with one_thread():  # as the reference was trained (see _runs.STEPS)
        # 2 micro-batches per step, 2 steps per epoch: step 3 stops inside epoch 2
        assert main(["train", "--out", str(part), *STEPS, "--max-steps", "3"]) == 0
        ck = load_checkpoint(part / "last.pt")
        assert (ck["epoch"], ck["step_in_epoch"], ck["global_step"]) == (1, 1, 3)
        assert main(["train", "--out", str(part), "--resume", *STEPS]) == 0
    a, b = weights(joint_reference / "last.pt"), weights(part / "last.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_checkpoints_are_atomic_and_safe_to_load(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(2)}})
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind

    class Boom:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        save_checkpoint(path, {"model": {"w": torch.zeros(2)}, "x": Boom()})
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))  # old one intact
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
    torch.save({"model": {}, "obj": object()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="cannot be read safely"):
        load_checkpoint(tmp_path / "evil.pt")


def test_multi_seed_summary_with_confidence_intervals(tmp_path, capsys):
    out = tmp_path / "seeds"
    args = ["train", "--out", out, *TINY, "--epochs", "1", "--head-epochs", "1", "--seeds", "1,2"]
    code, text, _ = run_main(args, capsys)
    assert code == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["seeds"] == [1, 2] and s["system_dice"]["n"] == 2
    assert (out / "seed_1" / "best.pt").is_file() and (
        out / "seed_2" / "eval" / "metrics.json"
    ).is_file()
    # the interval is labelled: its half-width and its ends
    d = s["system_dice"]
    assert "ci95" not in d and d["ci95_halfwidth"] is not None
    assert d["ci95_low"] == pytest.approx(d["mean"] - d["ci95_halfwidth"])
    assert "95% CI half-width" in text
    # each run says its seed; every seed trains and tests on one split
    assert "seed 1 (1 of 2, split of seed 1)" in text and "seed 2 (2 of 2, split of seed 1)" in text
    from deferredseg.train.builders import build_data
    from deferredseg.train.config import TrainConfig

    ids = []
    for seed in (1, 2):
        conf = load_checkpoint(out / f"seed_{seed}" / "best.pt")["config"]
        assert conf["seed"] == seed and conf["split_seed"] == 1
        ids.append(build_data(TrainConfig.from_dict(conf), "test").info.ids)
    assert ids[0] == ids[1]
    a = build_data(TrainConfig(num_images=12, seed=1), "test").info.ids
    b = build_data(TrainConfig(num_images=12, seed=2), "test").info.ids
    c = build_data(TrainConfig(num_images=12, seed=2, split_seed=1), "test").info.ids
    assert a != b and a == c  # --split-seed asks for a split of its own


def test_ci95_by_hand():
    s = ci95([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == 1.0
    assert s["ci95"] == pytest.approx(4.302652729911275 / 3**0.5)  # t_{0.975, 2}
    assert ci95([]) == {"mean": None, "std": None, "ci95": None, "n": 0}


@pytest.mark.parametrize("method", [m for m in METHODS if m != "deferredseg"])
def test_every_baseline_trains_and_evaluates(tmp_path, method):
    out = tmp_path / method
    assert main(["train", "--out", str(out), "--epochs", "1", "--method", method, *TINY]) == 0
    m = evaluate(out / "best.pt", budget=0.1, figures=False, with_hd95=False)
    assert m["method"] == method
    if not REGISTRY[method].defers:  # model-only
        assert m["deferral_rate"] == 0.0 and m["system_dice"] == m["model_dice"]
    else:
        assert 0.0 < m["deferral_rate"] < 0.5


# ----------------------------------------------------------------------------- DDP


def _ddp_worker(rank, init_file, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from deferredseg.losses import DeferredSegLoss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = _tiny_model()
        ddp = DDP(model)
        x, t, m = _global_batch()
        sl = slice(2 * rank, 2 * rank + 2)
        crit = DeferredSegLoss(1, 3, backend="reference", sync_balance=True)
        loss = crit(ddp(x[sl]), t[sl], m[sl])
        loss.backward()
        torch.save(
            {
                "loss": loss.detach(),
                "balance": crit.last_terms["balance"],
                "grads": {n: p.grad for n, p in model.named_parameters()},
            },
            os.path.join(out_dir, f"ddp{rank}.pt"),
        )
        # Both ranks are done with the group before either tears it down.
        dist.barrier()
        del ddp, loss
    finally:
        dist.destroy_process_group()
    # The results are on disk. Leave without the interpreter's teardown: in about one
    # full-suite run in four a rank aborted there ("terminate called without an active
    # exception", gloo's threads meeting static destructors), after its work was done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _tiny_model():
    from deferredseg.models import DeferredSegmentor

    return DeferredSegmentor.from_monai(
        "UNet",
        num_classes=1,
        num_experts=3,
        features=4,
        net_kwargs={"channels": (4, 8), "strides": (2,)},
    )


def _global_batch():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 1, 16, 16, generator=g)
    t = (torch.rand(4, 16, 16, generator=g) > 0.6).long()
    m = torch.where(torch.rand(4, 3, 16, 16, generator=g) < 0.1, 1 - t[:, None], t[:, None])
    return x, t, m


@pytest.mark.slow
def test_two_cpu_ranks_equal_one_process_on_the_global_batch(tmp_path):
    import torch.multiprocessing as mp

    from deferredseg.losses import DeferredSegLoss

    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    model = _tiny_model()
    x, t, m = _global_batch()
    crit = DeferredSegLoss(1, 3, backend="reference")
    loss = crit(model(x), t, m)
    loss.backward()
    r0 = torch.load(tmp_path / "ddp0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "ddp1.pt", weights_only=True)
    # the balance term is the global one on every rank; the loss averaged over ranks is the
    # global loss
    torch.testing.assert_close(r0["balance"], crit.last_terms["balance"])
    torch.testing.assert_close(r1["balance"], crit.last_terms["balance"])
    torch.testing.assert_close((r0["loss"] + r1["loss"]) / 2, loss.detach())
    for n, p in model.named_parameters():
        torch.testing.assert_close(r0["grads"][n], p.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(r1["grads"][n], p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_torchrun_two_ranks_train_end_to_end(tmp_path):
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_port=29533",
            "-m",
            "deferredseg",
            "train",
            "--out",
            str(out),
            "--epochs",
            "1",
            "--device",
            "cpu",
            *TINY,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "best.pt").is_file() and (out / "last.pt").is_file()
    # rank 0 alone prints: one final table, one folder line, one stage-2 marker
    assert proc.stdout.count("| system (model + experts) |") == 1, proc.stdout
    assert proc.stdout.count("run folder:") == 1 and proc.stdout.count("stage 2 of 2") == 1
    lines = (out / "base" / "log.jsonl").read_text().splitlines()  # stage 1, the DDP loop
    steps = [json.loads(line) for line in lines if json.loads(line)["event"] == "step"]
    # 8 training images over 2 ranks with batch 4: one step per epoch, logged once (rank 0)
    assert len(steps) == 1
    stage2 = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert sum(r["event"] == "best" for r in stage2) == 1  # the heads: written once, by rank 0
