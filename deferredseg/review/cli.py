"""The review subcommands of ``deferredseg``: predict, serve, merge, review-demo.

``add_review_commands(sub)`` registers them on the main parser's subparsers;
each sets ``args.run``, the function that carries it out (returns the exit code).

This module is imported to build ``deferredseg --help``: it imports no torch. What
each command runs (and torch, MONAI, starlette with it) is imported when the command
runs, in its ``_run_*`` function; this is deliberate, for the start-up time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_review_commands", "COMMAND_HELP"]

#: The one-line help of each review command (``deferredseg --help`` lists them without
#: building their options).
COMMAND_HELP = {
    "predict": "segment new images, route their pixels, make review tasks",
    "serve": "the review web application for the experts",
    "merge": "final masks and the review report",
    "review-demo": "the whole loop on synthetic data: train, predict, review, merge",
}
COMMANDS = tuple(COMMAND_HELP)


def _sizes(text: str):
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive sizes, got {text!r}")
    return vals


def add_review_commands(sub) -> None:
    from deferredseg_kernels import BACKENDS  # torch: only when the options are built

    p = sub.add_parser(
        "predict",
        help=COMMAND_HELP["predict"],
        description="Segment every image of --images with a trained checkpoint, "
        "route each pixel to the model or an expert, and write the model's "
        "masks, the deferral probabilities, the assignment maps and the "
        "review tasks (review.db, manifest.jsonl) to --out. Rerunning "
        "skips the images already done.",
    )
    p.add_argument("--checkpoint", required=True, help="a best.pt written by train")
    p.add_argument("--images", required=True, help="folder of .png, .npy, .nii or .nii.gz images")
    p.add_argument("--out", required=True, help="output folder (also the review folder)")
    p.add_argument("--threshold", type=float, help="gate threshold (default: the checkpoint's)")
    p.add_argument(
        "--budget",
        type=float,
        help="deferral budget: the threshold at which the model "
        "defers this fraction of the validation pixels (overrides the checkpoint's)",
    )
    p.add_argument(
        "--window",
        type=_sizes,
        help="sliding-window size, e.g. 64,64 (default: the training image size)",
    )
    p.add_argument(
        "--overlap", type=float, default=0.25, help="overlap of the windows (default: 0.25)"
    )
    p.add_argument(
        "--sw-batch-size", type=int, default=4, help="windows per forward pass (default: 4)"
    )
    p.add_argument("--batch-size", type=int, default=4, help="images of one shape per forward pass")
    p.add_argument(
        "--min-size",
        type=int,
        default=4,
        help="smallest region sent to an expert, in pixels (default: 4)",
    )
    p.add_argument(
        "--merge-distance",
        type=int,
        default=2,
        help="regions of one expert closer than this many pixels become one task (default: 2)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--backend",
        default="auto",
        choices=BACKENDS,
        help="routing kernels (default: the best available here)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_predict)

    s = sub.add_parser(
        "serve",
        help=COMMAND_HELP["serve"],
        description="Serve the review page of a predicted folder: each expert opens a "
        "personal link and reviews their own tasks; / shows the overview. "
        "Binds to 127.0.0.1; another --host requires tokens (printed once), best with "
        "--ssl-certfile/--ssl-keyfile so they do not travel in clear text.",
    )
    s.add_argument("out", help="a folder written by predict")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    s.add_argument("--port", type=int, default=8765, help="port (default: %(default)s)")
    s.add_argument(
        "--require-tokens",
        action="store_true",
        help="require the per-expert tokens on 127.0.0.1 too",
    )
    s.add_argument(
        "--new-tokens",
        action="store_true",
        help="replace every token, which this run then requires (prints the new links)",
    )
    s.add_argument(
        "--ssl-certfile", help="TLS certificate (PEM) to serve https, for serving off loopback"
    )
    s.add_argument("--ssl-keyfile", help="its private key (PEM)")
    s.add_argument(
        "--max-upload-kib", type=int, default=4096, help="largest answer accepted, in KiB"
    )
    s.set_defaults(run=_run_serve)

    m = sub.add_parser(
        "merge",
        help=COMMAND_HELP["merge"],
        description="Write the final mask of every image (the model's labels where it "
        "kept the pixel, the experts' answers where they were deferred) "
        "to OUT/final/ and the report to OUT/report.json and report.md.",
    )
    m.add_argument("out", help="a folder written by predict")
    m.set_defaults(run=_run_merge)

    d = sub.add_parser(
        "review-demo",
        help=COMMAND_HELP["review-demo"],
        description="Train on synthetic data, predict on new images, serve the review "
        "application, let simulated experts answer through its HTTP API "
        "(--simulate-experts), merge, and print model-only against merged Dice.",
    )
    d.add_argument(
        "--out", default="deferredseg-review-demo", help="output folder (default: %(default)s)"
    )
    d.add_argument(
        "--simulate-experts",
        action="store_true",
        help="answer the tasks with simulated experts through the HTTP API",
    )
    d.add_argument("--quick", action="store_true", help="a tiny run (for tests)")
    d.add_argument("--images", type=int, default=None, help="new images to predict")
    d.add_argument("--device", default="cpu")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(run=_run_demo)


def _run_predict(args: argparse.Namespace) -> int:
    from ..predict import describe_routing
    from .intake import predict

    s = predict(
        args.checkpoint,
        args.images,
        args.out,
        threshold=args.threshold,
        budget=args.budget,
        window=args.window,
        overlap=args.overlap,
        sw_batch_size=args.sw_batch_size,
        batch_size=args.batch_size,
        min_size=args.min_size,
        merge_distance=args.merge_distance,
        device=args.device,
        backend=args.backend,
        progress=not args.no_progress,
    )
    r = s.routing
    print(
        f"predicted {len(s.done)} image(s), skipped {len(s.skipped)} already done, "
        f"{len(s.failed)} failed; {s.tasks} review task(s); {describe_routing(r)}; "
        f"wrote {args.out}"
    )
    for f, err in s.failed:
        print(f"  failed: {f}: {err}", file=sys.stderr)
    return 1 if s.failed else 0


def _run_serve(args: argparse.Namespace) -> int:
    from .server import serve

    return serve(
        args.out,
        host=args.host,
        port=args.port,
        require_tokens=args.require_tokens,
        new_tokens=args.new_tokens,
        max_upload=args.max_upload_kib * 1024,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
    )


def _run_merge(args: argparse.Namespace) -> int:
    from .merge import merge

    rep = merge(args.out)
    done = sum(1 for i in rep["images"] if i["complete"])
    open_tasks = sum(len(i["unanswered_tasks"]) for i in rep["images"])
    print(
        f"merged {len(rep['images'])} image(s) ({done} fully reviewed; {open_tasks} unanswered "
        f"task(s) kept the model's labels) into {Path(args.out) / 'final'}; report "
        f"{Path(args.out) / 'report.md'}"
    )
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_review_demo

    return run_review_demo(
        out=args.out,
        simulate_experts=args.simulate_experts,
        quick=args.quick,
        num_images=args.images,
        device=args.device,
        seed=args.seed,
    )
