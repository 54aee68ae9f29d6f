"""The option and layout declarations are the one source: the docs, the command line,
the resume policy and the loss options are generated from them and stay in step.

Regenerate the docs after changing a declaration:

    python -m deferredseg.train.config --write-doc docs/configuration.md
    python -m deferredseg.data.layouts --write-doc docs/data.md
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

import deferredseg_kernels as kernels
from deferredseg._docgen import section, update_section
from deferredseg.data import layouts
from deferredseg.train import config
from deferredseg.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def test_the_option_tables_of_the_configuration_doc_are_current():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert section(doc, config.DOC_SECTION) == config.options_markdown(), (
        "docs/configuration.md's option tables are stale: run "
        "python -m deferredseg.train.config --write-doc docs/configuration.md"
    )
    for name in FIELDS:  # every option has its row
        assert f"\n| `{name}` | `--{name.replace('_', '-')}` |" in doc, name


def test_the_layout_table_of_the_data_doc_is_current():
    doc = (ROOT / "docs" / "data.md").read_text()
    assert section(doc, layouts.DOC_SECTION) == layouts.layouts_markdown(), (
        "docs/data.md's table of layouts is stale: run "
        "python -m deferredseg.data.layouts --write-doc docs/data.md"
    )


def test_the_regenerate_commands_check_and_write(tmp_path, capsys):
    doc = tmp_path / "configuration.md"
    doc.write_text(
        "# x\n\n<!-- generated: options (see below) -->\nold\n<!-- end generated: options -->\n"
        "tail\n"
    )
    assert config.main(["--check", str(doc)]) == 1
    assert "not current" in capsys.readouterr().out
    assert config.main(["--write-doc", str(doc)]) == 0
    assert config.main(["--check", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("# x\n") and text.endswith("tail\n") and "| `lambda_gate` |" in text
    assert not update_section(doc, config.DOC_SECTION, config.options_markdown())
    with pytest.raises(ValueError, match="no generated section 'layouts'"):
        section(text, "layouts")


def test_every_option_is_declared_with_help_group_and_resume_rule():
    groups = [title for title, _ in config.GROUPS]
    for f in FIELDS.values():
        meta = f.metadata
        assert meta["help"].strip(), f.name
        assert meta["group"] in groups, f.name
        assert meta["resume"] in config.RESUME_RULES, f.name
        if meta["choices"] is not None and f.default is not None:
            assert f.default in meta["choices"], f"{f.name}: default not among its choices"
    grouped = [f.name for _, _, fields in config.option_groups() for f in fields]
    assert sorted(grouped) == sorted(FIELDS)
    with pytest.raises(ValueError, match="option group must be one of"):
        config.option(1, help="x", group="nowhere")
    with pytest.raises(ValueError, match="option resume must be one of"):
        config.option(1, help="x", group="data", resume="sometimes")


def test_choices_come_from_the_layers_that_define_them():
    from deferredseg import metrics, policy
    from deferredseg.train import datacheck, methods

    owners = {
        "surrogate": kernels.SURROGATES,
        "gate_target": kernels.GATE_TARGETS,
        "balance": kernels.BALANCES,
        "coherence": kernels.COHERENCES,
        "backend": kernels.BACKENDS,
        "route_mode": policy.MODES,
        "expert_choice": policy.EXPERT_CHOICES,
        "selection": metrics.SELECTIONS,
        "method": methods.METHODS,
        "layout": layouts.LAYOUTS,
    }
    for name, owned in owners.items():
        assert FIELDS[name].metadata["choices"] == tuple(owned), name
    assert config.LAYOUTS is layouts.LAYOUTS
    assert config.SURROGATES is kernels.SURROGATES and config.BALANCES is kernels.BALANCES
    assert datacheck.FILE_LAYOUTS is layouts.FILE_LAYOUTS
    from deferredseg.data import LAYOUTS

    assert LAYOUTS is layouts.LAYOUTS


def test_the_loss_options_are_the_fields_marked_loss_and_reach_the_loss():
    from deferredseg.train.methods import _criterion

    marked = {n for n, f in FIELDS.items() if f.metadata["loss"]}
    # every field named like a loss option is marked, and only those (and the backend)
    assert marked == (set(FIELDS) & set(kernels.OPTION_NAMES)) | {"backend"}
    cfg = TrainConfig(
        gate_sparsity=0.2,
        gate_mse=0.3,
        coherence="l2",
        balance="band",
        balance_low=[0.0, 0.0, 0.1],
        balance_high=[1.0, 1.0, 0.9],
        lambda_coherence=0.25,
        surrogate="softmax",
        gate_target="router",
        backend="reference",
    )
    opts = cfg.loss_options()
    assert set(opts) == marked
    criterion = _criterion(cfg, 2, False)
    assert criterion.backend == "reference"
    for name, value in opts.items():
        if name == "backend":
            continue
        got = getattr(criterion.options, name)
        assert (list(got) if isinstance(got, tuple) else got) == value, name
    # an optional option left unset is not passed: the loss keeps its own default
    assert "balance_low" not in TrainConfig().loss_options()
    # a method's zeroed weights win over the configuration
    zeroed = _criterion(dataclasses.replace(cfg, method="no-coherence"), 2, False)
    assert zeroed.options.lambda_coherence == 0.0


def test_the_resume_policy_and_the_command_line_read_the_declarations():
    from deferredseg.train import rundir

    fixed = {n for n, f in FIELDS.items() if f.metadata["resume"] == "fixed"}
    free = {n for n, f in FIELDS.items() if f.metadata["resume"] in ("free", "this-run")}
    assert rundir.FIXED_ON_RESUME == fixed and rundir.FREE_ON_RESUME == free
    assert {"layout", "method", "num_classes", "backbone", "seed"} <= fixed
    assert {"epochs", "device", "out", "max_steps", "resume"} <= free
    diffs = rundir.config_differences(
        TrainConfig().to_dict(), TrainConfig(epochs=3, lr=0.1, seed=4).to_dict()
    )
    assert diffs == ["lr", "seed"]


def test_train_help_lists_every_option_with_its_help_and_choices(capsys):
    from deferredseg.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for name, f in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        assert f"{flag} " in out, flag
        words = " ".join(f.metadata["help"].split())
        assert words[:30] in out, (name, words[:30])
        if f.metadata["choices"] is not None:
            assert "{" + ",".join(map(str, f.metadata["choices"])) + "}" in out, name


def test_methods_do_not_import_the_configuration():
    """train/config.py imports train/methods.py (the method names); never the reverse."""
    tree = ast.parse((ROOT / "deferredseg" / "train" / "methods.py").read_text())
    imported = [
        node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module is not None
    ]
    assert not [m for m in imported if m.endswith("config")], imported


def test_a_layout_record_drives_the_dataset_builder():
    from deferredseg.data import build_dataset

    for name, layout in layouts.REGISTRY.items():
        assert layout.files == (name in layouts.FILE_LAYOUTS)
        assert layout.raters or layout.default_profile is not None, name
    ds = build_dataset("synthetic", num_images=6, image_size=32)
    assert ds.info.target == layouts.REGISTRY["synthetic"].default_target == "label"
    assert ds.info.num_experts == 5  # the default profile: the five structured experts
    with pytest.raises(ValueError, match="layout must be one of"):
        layouts.get_layout("nifti")
