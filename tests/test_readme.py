"""What README.md and docs/OPTIONS.md state about the code is what the code does: the scores
file's columns are the header ``AuditResult.save()`` writes, and every option in their tables is
a real keyword with the documented default (``inspect.signature``, the config dataclasses).
Seconds, CPU."""
from __future__ import annotations

import ast
import csv
import dataclasses
import inspect
import os
import re

import pytest
import torch

from helpers import gaussian_blobs, mlp
from lightning_influence import AuditResult, InfluenceCallback, audit
from lightning_influence.attribution import AttributionConfig
from lightning_influence.config import CurvatureConfig, TuningConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
OPTIONS = os.path.join(ROOT, "docs", "OPTIONS.md")
ROW = re.compile(r"^\|\s*`([A-Za-z_][A-Za-z0-9_]*)`\s*\|(.*)$")


def read(path: str) -> str:
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def section(text: str, heading: str) -> str:
    """The body under the ``## ...`` heading that starts with ``heading``, up to the next one."""
    parts = re.split(r"^## ", text, flags=re.M)
    found = [p for p in parts[1:] if p.startswith(heading)]
    assert len(found) == 1, f"expected one section '## {heading}...', found {len(found)}"
    return found[0]


def table(body: str) -> dict:
    """The first markdown table of ``body`` whose first cells are code names: ``{name: [other cells]}``."""
    rows, started = {}, False
    for line in body.splitlines():
        m = ROW.match(line.strip())
        if m:
            started = True
            name = m.group(1)
            assert name not in rows, f"{name} listed twice"
            rows[name] = [c.strip() for c in re.split(r"(?<!\\)\|", m.group(2))[:-1]]
        elif started and not line.startswith("|"):
            break
    assert rows, "no table rows found"
    return rows


def defaults(rows: dict) -> dict:
    """``{name: default}`` from a table whose second column is a code literal (`` `None` ``, `` `"auto"` ``)."""
    out = {}
    for name, cells in rows.items():
        m = re.fullmatch(r"`([^`]*)`", cells[0])
        assert m, f"{name}: the default column must be one code literal, got {cells[0]!r}"
        out[name] = ast.literal_eval(m.group(1))
    return out


def same(documented, actual) -> bool:
    return type(documented) is type(actual) and documented == actual


def signature_defaults(fn) -> dict:
    return {n: p.default for n, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


def field_defaults(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls)}


def check_defaults(rows: dict, real: dict, where: str) -> None:
    for name, value in defaults(rows).items():
        assert name in real, f"{where}: `{name}` is not a parameter"
        assert same(value, real[name]), f"{where}: `{name}` documented default {value!r}, the code has {real[name]!r}"


# --------------------------------------------------------------------------- the scores file

@pytest.fixture(scope="module")
def blobs():
    train, val = gaussian_blobs(48, 24, 4, seed=0)
    noisy = torch.zeros(48, dtype=torch.bool)
    noisy[:8] = True
    train.y[:8] = (train.y[:8] + 1) % 3
    return train, val, noisy


def saved_header(tmp_path, name: str, **options) -> list:
    path = tmp_path / name
    result = audit(mlp(4, 8, 3), *options.pop("data"), tuning={"steps": 2}, batch_size=16, **options)
    result.save(str(path))
    with open(path, newline="") as handle:
        return next(csv.reader(handle))


def test_readme_scores_file_columns_are_the_saved_header(tmp_path, blobs):
    documented = list(table(section(read(README), "The scores file")))
    assert documented == list(AuditResult.COLUMNS)
    train, val, noisy = blobs
    # a full audit (vm/fvm with noisy flags) writes every documented column, in the documented order
    assert saved_header(tmp_path, "full.csv", data=(train, val), noisy=noisy) == documented
    # rank_by="influence": the influence score is the score column, as the README says
    header = saved_header(tmp_path, "by_influence.csv", data=(train, val), noisy=noisy, rank_by="influence")
    assert header == [c for c in documented if c != "influence"]


# --------------------------------------------------------------------------- options and defaults

def test_readme_options_table_names_callback_keywords_with_their_defaults():
    rows = table(section(read(README), "Options"))
    assert len(rows) >= 10
    check_defaults(rows, signature_defaults(InfluenceCallback.__init__), "README options table")
    audit_keywords = signature_defaults(audit)
    for name in ("method", "solver", "params", "noisy", "top_k", "rank_by", "tuning", "batch_size"):
        assert name in rows, f"README options table lacks `{name}`"
        assert same(defaults(rows)[name], audit_keywords[name]), name  # "both audit() and InfluenceCallback"


def test_options_doc_lists_every_keyword_with_its_default():
    text = read(OPTIONS)
    callback, fn = signature_defaults(InfluenceCallback.__init__), signature_defaults(audit)
    both = table(section(text, "Options of both"))
    callback_only = table(section(text, "`InfluenceCallback` only"))
    audit_only = table(section(text, "`audit()` only"))
    check_defaults(both, callback, "docs/OPTIONS.md (both), InfluenceCallback")
    check_defaults(both, fn, "docs/OPTIONS.md (both), audit()")
    check_defaults(callback_only, callback, "docs/OPTIONS.md (callback only)")
    check_defaults(audit_only, fn, "docs/OPTIONS.md (audit() only)")
    assert set(both) | set(callback_only) == set(callback), "every InfluenceCallback keyword, once"
    assert set(both) | set(audit_only) == set(fn), "every audit() keyword, once"
    assert not set(callback_only) & set(fn) and not set(audit_only) & set(callback)
    for heading, cls in (("`TuningConfig`", TuningConfig), ("`CurvatureConfig`", CurvatureConfig),
                         ("`AttributionConfig`", AttributionConfig)):
        rows = table(section(text, heading))
        assert set(rows) == set(field_defaults(cls)), heading
        check_defaults(rows, field_defaults(cls), f"docs/OPTIONS.md {heading}")


# --------------------------------------------------------------------------- commands and links

def test_readme_test_command_is_what_ci_runs():
    tests = section(read(README), "Tests")
    assert "```bash\npython -m pytest -q\n```" in tests
    ci = [line.strip() for line in read(os.path.join(ROOT, ".ci", "run")).splitlines()]
    assert "python -m pytest -q" in ci and "bash scripts/setup.sh" in ci
    assert "bash scripts/setup.sh" in section(read(README), "Install")


@pytest.mark.parametrize("page", ["README.md", "docs/OPTIONS.md", "docs/EXAMPLES.md", "docs/ATTRIBUTION.md",
                                  "docs/TUNING.md", "docs/BENCHMARKS.md", "docs/SCALING.md", "docs/GUARANTEES.md"])
def test_relative_links_resolve(page):
    path = os.path.join(ROOT, page)
    for target in re.findall(r"\]\(([^)\s]+)\)", read(path)):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), target.split("#")[0]))
        assert os.path.exists(resolved), f"{page}: link to {target} does not resolve"
