"""The quick tier of the fuzzer (tests/fuzzing.py): a few dozen mutated inputs per reader, each run through
the command that reads it. Every case must end in exit 0 on a still-valid file or exit 2 with one
``quantkit: error:`` line: no traceback, crash, hang or memory blow-up, and no input file changed. The long
tier (10,000 cases per reader) is ``python tests/fuzzing.py run``."""

from __future__ import annotations

import pytest
from fuzzing import TARGETS, fuzz, prepare

CASES = 40  # per reader; case k of a reader is always the same mutation


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp("fuzz-src"))


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_reader_survives_mutations(target, source_dir):
    r = fuzz(target, CASES, seed=0, source_dir=source_dir, timeout=60)
    shown = [f"case {f['i']}: {f['verdict']}: {f.get('detail', '')[-600:]}" for f in r["failures"][:3]]
    assert not r["failures"], "\n".join(shown)
    assert sum(r["counts"].values()) == CASES
    assert r["counts"].get("refused", 0) > 0  # the mutations do reach the reader's checks
